// The CUDA side of `dpt_fast::residual_conv_unit`: torch operators that run the fused CUTLASS
// convolutions of rcu_conv_*.cu.
//
//   dpt_fast::_rcu_fused_forward(x, w1, b1, w2, b2, extra?) -> out
//       out = x + conv2(relu(conv1(relu(x)) + b1)) + b2 [+ extra], as two kernels:
//       conv1 (ReLU prologue, bias + ReLU epilogue) and conv2 (bias + x [+ extra] epilogue).
//   dpt_fast::_rcu_fused_conv1(x, w1, b1) -> relu(conv1(relu(x)) + b1)
//       the hidden activation alone (channels_last), used by the backward to recompute it.
//
// Both are registered for the CUDA dispatch key only; dpt_fast/ops/rcu.py decides when to call them
// (CUDA tensors, fp16/bf16, channels a multiple of 8) and falls back to the reference otherwise.
// The output has the strides torch.empty_like(x) gives: channels_last for a channels_last x. An x
// that is not channels_last is converted once (and the result copied back to x's layout).
#include <algorithm>
#include <cstdint>
#include <optional>

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

at::Tensor rcu_fused_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                             const at::Tensor& b2, const std::optional<at::Tensor>& extra) {
  constexpr const char* op = "dpt_fast::_rcu_fused_forward";
  check_common(x, w1, b1, op);
  TORCH_CHECK(w2.sizes() == w1.sizes(), op, ": weight2 must have weight1's shape ", w1.sizes(), ", got ", w2.sizes());
  TORCH_CHECK(b2.sizes() == b1.sizes(), op, ": bias2 must have bias1's shape ", b1.sizes(), ", got ", b2.sizes());
  TORCH_CHECK(w2.device() == x.device() && b2.device() == x.device(), op, ": weights and biases must be on x's device");
  if (extra.has_value()) {
    TORCH_CHECK(extra->sizes() == x.sizes(), op, ": extra must have x's shape ", x.sizes(), ", got ", extra->sizes());
    TORCH_CHECK(extra->device() == x.device(), op, ": extra must be on x's device ", x.device());
  }

  c10::cuda::CUDAGuard device_guard(x.device());
  const at::ScalarType dtype = x.scalar_type();
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;

  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t chunk = images_per_launch(x, op);
  const int64_t image_bytes = c * h * w * x.element_size();

  at::Tensor xc = dense_channels_last(x, dtype);
  at::Tensor w1c = dense_channels_last(w1, dtype);
  at::Tensor w2c = dense_channels_last(w2, dtype);
  at::Tensor b1c = dense_vector(b1, dtype);
  at::Tensor b2c = dense_vector(b2, dtype);
  std::optional<at::Tensor> ec;
  if (extra.has_value()) ec = dense_channels_last(*extra, dtype);
  const bool direct = out.is_contiguous(kChannelsLast) && aligned16(out);
  at::Tensor oc = direct ? out : at::empty(x.sizes(), x.options().memory_format(kChannelsLast));
  at::Tensor hidden = at::empty({chunk, c, h, w}, x.options().memory_format(kChannelsLast));

  const RcuDType dt = rcu_dtype(x);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  for (int64_t n0 = 0; n0 < n; n0 += chunk) {
    const int64_t nb = std::min(chunk, n - n0);
    const int64_t off = n0 * image_bytes;

    RcuConvProblem p1;
    p1.n = static_cast<int>(nb);
    p1.h = static_cast<int>(h);
    p1.w = static_cast<int>(w);
    p1.c = static_cast<int>(c);
    p1.input = offset(xc, off);
    p1.weight = w1c.data_ptr();
    p1.bias = b1c.data_ptr();
    p1.output = hidden.data_ptr();
    throw_if(rcu_conv1(dt, p1, stream), op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    RcuConvProblem p2 = p1;
    p2.input = hidden.data_ptr();
    p2.weight = w2c.data_ptr();
    p2.bias = b2c.data_ptr();
    p2.residual1 = offset(xc, off);
    p2.residual2 = ec.has_value() ? offset(*ec, off) : nullptr;
    p2.output = offset_mut(oc, off);
    throw_if(rcu_conv2(dt, p2, stream), op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!direct) out.copy_(oc);
  return out;
}

at::Tensor rcu_fused_conv1(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1) {
  constexpr const char* op = "dpt_fast::_rcu_fused_conv1";
  check_common(x, w1, b1, op);
  c10::cuda::CUDAGuard device_guard(x.device());
  const at::ScalarType dtype = x.scalar_type();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(kChannelsLast));
  if (x.numel() == 0) return out;

  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t chunk = images_per_launch(x, op);
  const int64_t image_bytes = c * h * w * x.element_size();
  at::Tensor xc = dense_channels_last(x, dtype);
  at::Tensor w1c = dense_channels_last(w1, dtype);
  at::Tensor b1c = dense_vector(b1, dtype);

  const RcuDType dt = rcu_dtype(x);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  for (int64_t n0 = 0; n0 < n; n0 += chunk) {
    const int64_t nb = std::min(chunk, n - n0);
    const int64_t off = n0 * image_bytes;
    RcuConvProblem p;
    p.n = static_cast<int>(nb);
    p.h = static_cast<int>(h);
    p.w = static_cast<int>(w);
    p.c = static_cast<int>(c);
    p.input = offset(xc, off);
    p.weight = w1c.data_ptr();
    p.bias = b1c.data_ptr();
    p.output = offset_mut(out, off);
    throw_if(rcu_conv1(dt, p, stream), op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace
}  // namespace dpt_fast

TORCH_LIBRARY_FRAGMENT(dpt_fast, m) {
  m.def("_rcu_fused_forward(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? extra) -> Tensor");
  m.def("_rcu_fused_conv1(Tensor x, Tensor w1, Tensor b1) -> Tensor");
}

TORCH_LIBRARY_IMPL(dpt_fast, CUDA, m) {
  m.impl("_rcu_fused_forward", &dpt_fast::rcu_fused_forward);
  m.impl("_rcu_fused_conv1", &dpt_fast::rcu_fused_conv1);
}
