// Plain C++ interface between the torch-facing operator code (rcu_ops.cpp) and the CUTLASS kernels
// (rcu_conv_*.cu). Nothing here includes torch or CUTLASS, so each side compiles without the other's
// (heavy) headers.
#pragma once

#include <cuda_runtime_api.h>

namespace dpt_fast {

enum class RcuDType { kFloat16 = 0, kBFloat16 = 1 };

// One 3x3, stride 1, padding 1, C -> C convolution over an NHWC tensor, in the RCU's two flavours.
// Every pointer is 16-byte aligned and densely packed: activations NHWC, weights KRSC (= a
// channels_last [K, C, 3, 3] tensor), bias [K]. All in the same element type.
struct RcuConvProblem {
  int n = 0, h = 0, w = 0, c = 0;     // input [n, h, w, c]; output [n, h, w, c] (K == C)
  const void* input = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  const void* residual1 = nullptr;    // conv2 only: x
  const void* residual2 = nullptr;    // conv2 only: the optional extra addend (nullptr: none)
  void* output = nullptr;
};

// Largest tensor (in bytes) one launch may address; callers split the batch below it.
constexpr long long kRcuMaxTensorBytes = (1LL << 31) - 1;

// Returns nullptr when (n, h, w, c) can run, else a static message saying why not.
const char* rcu_conv_check(RcuDType dtype, int n, int h, int w, int c);

// conv1: output = relu(conv(relu(input), weight) + bias). ReLU of the input happens on the operand
// fragments inside the mainloop, bias and ReLU in the epilogue.
// Returns nullptr after a launch (launch errors stay pending for C10_CUDA_KERNEL_LAUNCH_CHECK), or a
// static message when the kernel could not be set up.
const char* rcu_conv1(RcuDType dtype, const RcuConvProblem& p, cudaStream_t stream);

// conv2: output = conv(input, weight) + bias + residual1 (+ residual2), all in the epilogue.
const char* rcu_conv2(RcuDType dtype, const RcuConvProblem& p, cudaStream_t stream);

// Per-dtype entry points (one translation unit each, so they compile in parallel).
const char* rcu_conv1_f16(const RcuConvProblem& p, cudaStream_t stream);
const char* rcu_conv2_f16(const RcuConvProblem& p, cudaStream_t stream);
const char* rcu_conv_check_f16(int n, int h, int w, int c);
const char* rcu_conv1_bf16(const RcuConvProblem& p, cudaStream_t stream);
const char* rcu_conv2_bf16(const RcuConvProblem& p, cudaStream_t stream);
const char* rcu_conv_check_bf16(int n, int h, int w, int c);

inline const char* rcu_conv_check(RcuDType dtype, int n, int h, int w, int c) {
  return dtype == RcuDType::kFloat16 ? rcu_conv_check_f16(n, h, w, c) : rcu_conv_check_bf16(n, h, w, c);
}
inline const char* rcu_conv1(RcuDType dtype, const RcuConvProblem& p, cudaStream_t stream) {
  return dtype == RcuDType::kFloat16 ? rcu_conv1_f16(p, stream) : rcu_conv1_bf16(p, stream);
}
inline const char* rcu_conv2(RcuDType dtype, const RcuConvProblem& p, cudaStream_t stream) {
  return dtype == RcuDType::kFloat16 ? rcu_conv2_f16(p, stream) : rcu_conv2_bf16(p, stream);
}

}  // namespace dpt_fast
