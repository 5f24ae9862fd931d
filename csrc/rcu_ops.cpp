// The CUDA side of `dpt_fast::residual_conv_unit`: torch operators that run the fused CUTLASS
// convolutions of rcu_conv_*.cu.
//
//   dpt_fast::_rcu_fused_forward(x, w1, b1, w2, b2, extra?) -> out
//       out = x + conv2(relu(conv1(relu(x)) + b1)) + b2 [+ extra], as two kernels:
//       conv1 (ReLU prologue, bias + ReLU epilogue) and conv2 (bias + x [+ extra] epilogue).
//   dpt_fast::_rcu_fused_conv1(x, w1, b1) -> relu(conv1(relu(x)) + b1)
//       the hidden activation alone (channels_last): the training forward's first kernel, and the
//       backward's recompute when no hidden activation was saved.
//   dpt_fast::_rcu_fused_conv2(hidden, x, w2, b2, extra?) -> out
//       out = conv2(hidden) + b2 + x [+ extra]: the training forward's second kernel (it keeps hidden
//       for the backward).
//
// All are registered for the CUDA dispatch key only; dpt_fast/ops/rcu.py decides when to call them
// (CUDA tensors, fp16/bf16, channels a multiple of 8) and falls back to the reference otherwise.
// The output has the strides torch.empty_like(x) gives: channels_last for a channels_last x. An x
// that is not channels_last is converted once (and the result copied back to x's layout).
#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rcu_conv.h"

namespace dpt_fast {
namespace {

constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

// A dense channels_last, 16-byte aligned tensor of the given dtype holding t's values (t itself
// when it already is one).
at::Tensor dense_channels_last(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor u = t.scalar_type() == dtype ? t : t.to(dtype);
  if (u.is_contiguous(kChannelsLast) && aligned16(u)) return u;
  at::Tensor c = at::empty(u.sizes(), u.options().memory_format(kChannelsLast));
  c.copy_(u);
  return c;
}

at::Tensor dense_vector(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor u = t.scalar_type() == dtype ? t : t.to(dtype);
  if (u.is_contiguous() && aligned16(u)) return u;
  at::Tensor c = at::empty(u.sizes(), u.options());
  c.copy_(u);
  return c;
}

RcuDType rcu_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kHalf ? RcuDType::kFloat16 : RcuDType::kBFloat16;
}

void check_common(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": the fused kernel supports float16 and bfloat16, got ", x.scalar_type());
  const int64_t c = x.size(1);
  TORCH_CHECK(c % 8 == 0, op, ": the fused kernel needs a channel count that is a multiple of 8, got ", c);
  TORCH_CHECK(w1.dim() == 4 && w1.size(0) == c && w1.size(1) == c && w1.size(2) == 3 && w1.size(3) == 3, op,
              ": weight must be [C, C, 3, 3] with C = ", c, ", got ", w1.sizes());
  TORCH_CHECK(b1.dim() == 1 && b1.size(0) == c, op, ": bias must be [C] with C = ", c, ", got ", b1.sizes());
  TORCH_CHECK(w1.device() == x.device() && b1.device() == x.device(), op,
              ": weights and biases must be on x's device ", x.device());
  TORCH_CHECK(x.size(2) <= INT32_MAX && x.size(3) <= INT32_MAX && c <= INT32_MAX, op, ": dimensions too large");
}

// Images per launch so that no tensor a launch addresses reaches 2^31 bytes.
int64_t images_per_launch(const at::Tensor& x, const char* op) {
  const int64_t image_bytes = x.size(1) * x.size(2) * x.size(3) * x.element_size();
  TORCH_CHECK(image_bytes <= kRcuMaxTensorBytes, op, ": one image of ", image_bytes,
              " bytes exceeds the kernel's 2^31-byte limit; use the reference backend for it");
  return std::max<int64_t>(1, std::min<int64_t>(x.size(0), kRcuMaxTensorBytes / image_bytes));
}

void throw_if(const char* why, const char* op) {
  TORCH_CHECK(why == nullptr, op, ": ", why == nullptr ? "" : why);
}

const void* offset(const at::Tensor& t, int64_t bytes) {
  return static_cast<const char*>(t.data_ptr()) + bytes;
}

void* offset_mut(const at::Tensor& t, int64_t bytes) {
  return static_cast<char*>(t.data_ptr()) + bytes;
}

void check_extra(const at::Tensor& x, const std::optional<at::Tensor>& extra, const char* op) {
  if (extra.has_value()) {
    TORCH_CHECK(extra->sizes() == x.sizes(), op, ": extra must have x's shape ", x.sizes(), ", got ", extra->sizes());
    TORCH_CHECK(extra->device() == x.device(), op, ": extra must be on x's device ", x.device());
  }
}

// The one batch loop of every operator here: calls launch(problem, byte_offset) once per chunk of at
// most images_per_launch(x) images, problem holding the chunk's (n, h, w, c) and no pointers yet;
// byte_offset is the chunk's first image in any [N, C, H, W] activation of x's dtype.
template <typename Launch>
void for_each_chunk(const at::Tensor& x, const char* op, Launch&& launch) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t chunk = images_per_launch(x, op);
  const int64_t image_bytes = c * h * w * x.element_size();
  for (int64_t n0 = 0; n0 < n; n0 += chunk) {
    RcuConvProblem p;
    p.n = static_cast<int>(std::min(chunk, n - n0));
    p.h = static_cast<int>(h);
    p.w = static_cast<int>(w);
    p.c = static_cast<int>(c);
    launch(p, n0 * image_bytes);
  }
}

// conv1 of one chunk: output = relu(conv(relu(input), w1) + b1).
void launch_conv1(RcuConvProblem p, const void* input, const at::Tensor& w1c, const at::Tensor& b1c, void* output,
                  RcuDType dt, cudaStream_t stream, const char* op) {
  p.input = input;
  p.weight = w1c.data_ptr();
  p.bias = b1c.data_ptr();
  p.output = output;
  throw_if(rcu_conv1(dt, p, stream), op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// conv2 of one chunk: output = conv(input, w2) + b2 + residual1 (+ residual2).
void launch_conv2(RcuConvProblem p, const void* input, const at::Tensor& w2c, const at::Tensor& b2c,
                  const void* residual1, const void* residual2, void* output, RcuDType dt, cudaStream_t stream,
                  const char* op) {
  p.input = input;
  p.weight = w2c.data_ptr();
  p.bias = b2c.data_ptr();
  p.residual1 = residual1;
  p.residual2 = residual2;
  p.output = output;
  throw_if(rcu_conv2(dt, p, stream), op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The output as torch.empty_like(x) lays it out, and the dense channels_last tensor the kernel writes
// (the output itself when it is one; copy it back with finish_output).
std::pair<at::Tensor, at::Tensor> output_like(const at::Tensor& x) {
  at::Tensor out = at::empty_like(x);
  const bool direct = out.is_contiguous(kChannelsLast) && aligned16(out);
  return {out, direct ? out : at::empty(x.sizes(), x.options().memory_format(kChannelsLast))};
}

void finish_output(at::Tensor& out, const at::Tensor& written) {
  if (!written.is_same(out)) out.copy_(written);
}

cudaStream_t current_stream(const at::Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
}

at::Tensor rcu_fused_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                             const at::Tensor& b2, const std::optional<at::Tensor>& extra) {
  constexpr const char* op = "dpt_fast::_rcu_fused_forward";
  check_common(x, w1, b1, op);
  check_common(x, w2, b2, op);  // weight2 and bias2: the same shapes and device as weight1 and bias1
  check_extra(x, extra, op);

  c10::cuda::CUDAGuard device_guard(x.device());
  const at::ScalarType dtype = x.scalar_type();
  at::Tensor out, oc;
  std::tie(out, oc) = output_like(x);
  if (x.numel() == 0) return out;

  at::Tensor xc = dense_channels_last(x, dtype);
  at::Tensor w1c = dense_channels_last(w1, dtype);
  at::Tensor w2c = dense_channels_last(w2, dtype);
  at::Tensor b1c = dense_vector(b1, dtype);
  at::Tensor b2c = dense_vector(b2, dtype);
  std::optional<at::Tensor> ec;
  if (extra.has_value()) ec = dense_channels_last(*extra, dtype);
  // one chunk's hidden activation, reused by every chunk (the kernels run in stream order)
  const int64_t chunk = images_per_launch(x, op);
  at::Tensor hidden = at::empty({chunk, x.size(1), x.size(2), x.size(3)}, x.options().memory_format(kChannelsLast));

  const RcuDType dt = rcu_dtype(x);
  cudaStream_t stream = current_stream(x);
  for_each_chunk(x, op, [&](const RcuConvProblem& p, int64_t off) {
    launch_conv1(p, offset(xc, off), w1c, b1c, hidden.data_ptr(), dt, stream, op);
    launch_conv2(p, hidden.data_ptr(), w2c, b2c, offset(xc, off), ec.has_value() ? offset(*ec, off) : nullptr,
                 offset_mut(oc, off), dt, stream, op);
  });
  finish_output(out, oc);
  return out;
}

at::Tensor rcu_fused_conv1(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1) {
  constexpr const char* op = "dpt_fast::_rcu_fused_conv1";
  check_common(x, w1, b1, op);
  c10::cuda::CUDAGuard device_guard(x.device());
  const at::ScalarType dtype = x.scalar_type();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(kChannelsLast));
  if (x.numel() == 0) return out;

  at::Tensor xc = dense_channels_last(x, dtype);
  at::Tensor w1c = dense_channels_last(w1, dtype);
  at::Tensor b1c = dense_vector(b1, dtype);
  const RcuDType dt = rcu_dtype(x);
  cudaStream_t stream = current_stream(x);
  for_each_chunk(x, op, [&](const RcuConvProblem& p, int64_t off) {
    launch_conv1(p, offset(xc, off), w1c, b1c, offset_mut(out, off), dt, stream, op);
  });
  return out;
}

at::Tensor rcu_fused_conv2(const at::Tensor& hidden, const at::Tensor& x, const at::Tensor& w2, const at::Tensor& b2,
                           const std::optional<at::Tensor>& extra) {
  constexpr const char* op = "dpt_fast::_rcu_fused_conv2";
  check_common(x, w2, b2, op);
  check_extra(x, extra, op);
  TORCH_CHECK(hidden.sizes() == x.sizes(), op, ": hidden must have x's shape ", x.sizes(), ", got ", hidden.sizes());
  TORCH_CHECK(hidden.device() == x.device(), op, ": hidden must be on x's device ", x.device());
  TORCH_CHECK(hidden.scalar_type() == x.scalar_type(), op, ": hidden must have x's dtype ", x.scalar_type(),
              ", got ", hidden.scalar_type());

  c10::cuda::CUDAGuard device_guard(x.device());
  const at::ScalarType dtype = x.scalar_type();
  at::Tensor out, oc;
  std::tie(out, oc) = output_like(x);
  if (x.numel() == 0) return out;

  at::Tensor hc = dense_channels_last(hidden, dtype);
  at::Tensor xc = dense_channels_last(x, dtype);
  at::Tensor w2c = dense_channels_last(w2, dtype);
  at::Tensor b2c = dense_vector(b2, dtype);
  std::optional<at::Tensor> ec;
  if (extra.has_value()) ec = dense_channels_last(*extra, dtype);

  const RcuDType dt = rcu_dtype(x);
  cudaStream_t stream = current_stream(x);
  for_each_chunk(x, op, [&](const RcuConvProblem& p, int64_t off) {
    launch_conv2(p, offset(hc, off), w2c, b2c, offset(xc, off), ec.has_value() ? offset(*ec, off) : nullptr,
                 offset_mut(oc, off), dt, stream, op);
  });
  finish_output(out, oc);
  return out;
}

}  // namespace
}  // namespace dpt_fast

TORCH_LIBRARY_FRAGMENT(dpt_fast, m) {
  m.def("_rcu_fused_forward(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? extra) -> Tensor");
  m.def("_rcu_fused_conv1(Tensor x, Tensor w1, Tensor b1) -> Tensor");
  m.def("_rcu_fused_conv2(Tensor hidden, Tensor x, Tensor w2, Tensor b2, Tensor? extra) -> Tensor");
}

TORCH_LIBRARY_IMPL(dpt_fast, CUDA, m) {
  m.impl("_rcu_fused_forward", &dpt_fast::rcu_fused_forward);
  m.impl("_rcu_fused_conv1", &dpt_fast::rcu_fused_conv1);
  m.impl("_rcu_fused_conv2", &dpt_fast::rcu_fused_conv2);
}
