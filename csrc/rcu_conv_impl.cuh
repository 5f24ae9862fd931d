// CUTLASS (2.x API, SM80 tensor-op mma.sync) implicit-GEMM 3x3 convolutions with the residual conv
// unit's elementwise work fused in:
//
//   conv1: h   = relu(conv(relu(x), w1) + b1)    ReLU on the A-operand fragments in the mainloop,
//                                                 bias + ReLU in the epilogue
//   conv2: out = conv(h, w2) + b2 + x [+ extra]   bias + one or two residual sources in the epilogue
//
// Built from CUTLASS's stock pieces (DefaultMmaCore, the Optimized NHWC fprop tile iterators, the
// multistage implicit-GEMM mainloop, EpilogueWithBroadcast) plus three small parts of our own:
//   * ReluAWarpMma: the warp-level MMA whose A-operand shared-memory iterator applies ReLU to each
//     fragment as it is loaded for mma.sync (the multistage mainloop takes that iterator from the
//     warp MMA type). Padding and out-of-bounds elements arrive as zeros (cp.async zero-fill), relu(0) = 0.
//   * RcuEpilogueOp: the elementwise epilogue functor: relu(acc + bias) or acc + bias + r1 (+ r2).
//   * RcuConvKernel: ImplicitGemmConvolutionWithFusedEpilogue without split-K, with a second
//     residual source passed to EpilogueWithBroadcast's dual-source path (the stock conv kernel
//     only wires one source).
//
// The same code is compiled for sm_80 and sm_90a (on Hopper it runs as mma.sync, not wgmma).
#pragma once

#include <atomic>
#include <type_traits>

#include "cutlass/cutlass.h"
#include "cutlass/array.h"
#include "cutlass/numeric_types.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass/device_kernel.h"
#include "cutlass/layout/tensor.h"
#include "cutlass/tensor_ref.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/threadblock/default_mma_core_sm80.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cutlass/conv/convolution.h"
#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/threadblock/conv2d_fprop_activation_tile_access_iterator_optimized.h"
#include "cutlass/conv/threadblock/conv2d_fprop_filter_tile_access_iterator_optimized.h"
#include "cutlass/conv/threadblock/implicit_gemm_multistage.h"
#include "cutlass/epilogue/threadblock/default_epilogue_tensor_op.h"
#include "cutlass/epilogue/threadblock/default_epilogue_simt.h"
#include "cutlass/epilogue/threadblock/default_epilogue_volta_tensor_op.h"
#include "cutlass/epilogue/threadblock/default_epilogue_with_broadcast.h"
#include "cutlass/epilogue/threadblock/epilogue_with_broadcast.h"
#include "cutlass/epilogue/threadblock/output_iterator_parameter.h"

#include "rcu_conv.h"

namespace dpt_fast {
namespace rcu {

// ---------------------------------------------------------------------------------------------
// ReLU on packed 16-bit pairs. max.NaN keeps NaN (as torch.relu does); needs sm_80+.

template <typename T>
struct Relu16x2;

template <>
struct Relu16x2<cutlass::half_t> {
  CUTLASS_DEVICE static uint32_t apply(uint32_t v) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    uint32_t out;
    asm("max.NaN.f16x2 %0, %1, %2;" : "=r"(out) : "r"(v), "r"(0u));
    return out;
#else
    uint32_t sign = v & 0x80008000u;
    return v & ~((sign >> 15) * 0xffffu);
#endif
  }
};

template <>
struct Relu16x2<cutlass::bfloat16_t> {
  CUTLASS_DEVICE static uint32_t apply(uint32_t v) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    uint32_t out;
    asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(out) : "r"(v), "r"(0u));
    return out;
#else
    uint32_t sign = v & 0x80008000u;
    return v & ~((sign >> 15) * 0xffffu);
#endif
  }
};

// Shared-memory -> register iterator of the A operand (the activations) that applies ReLU to every
// fragment right after it is loaded (ldmatrix), in place, so no extra registers are live.
template <typename BaseIterator>
class ReluLoadIterator : public BaseIterator {
 public:
  using BaseIterator::BaseIterator;
  using typename BaseIterator::Fragment;

  CUTLASS_HOST_DEVICE ReluLoadIterator() {}
  CUTLASS_HOST_DEVICE ReluLoadIterator(BaseIterator const& base) : BaseIterator(base) {}

  CUTLASS_DEVICE
  void load(Fragment& frag) const {
    BaseIterator::load(frag);
    using Element = typename Fragment::Element;
    static_assert(cutlass::sizeof_bits<Element>::value == 16, "ReLU prologue expects 16-bit operands");
    static_assert(Fragment::kElements % 2 == 0, "fragment of packed pairs");
    uint32_t* words = reinterpret_cast<uint32_t*>(&frag);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < Fragment::kElements / 2; ++i) {
      words[i] = Relu16x2<Element>::apply(words[i]);
    }
  }
};

// Warp-level tensor-op MMA whose A-operand iterator is the ReLU one above; the mainloop
// (ImplicitGemmMultistage) takes its warp iterators from the warp MMA type, so this is the whole
// mainloop fusion. Padding / out-of-bounds elements arrive as zeros (cp.async zero-fill), relu(0) = 0.
template <typename Base>
class ReluAWarpMma : public Base {
 public:
  using IteratorA = ReluLoadIterator<typename Base::IteratorA>;
  static_assert(sizeof(IteratorA) == sizeof(typename Base::IteratorA), "iterator adds no state");
};

// ---------------------------------------------------------------------------------------------
// Epilogue functor (concept: EpilogueWithBroadcast's dual-source output op).
//   num_sources == 0: z = relu(acc + bias)
//   num_sources == 1: z = acc + bias + c1
//   num_sources == 2: z = acc + bias + c1 + c2
// All arithmetic in fp32, one rounding to the output type.

template <typename Element_, int Count>
class RcuEpilogueOp {
 public:
  static bool const kIsSingleSource = false;

  using ElementOutput = Element_;
  using ElementC = Element_;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementVector = Element_;
  using ElementZ = Element_;
  using ElementT = Element_;

  static int const kElementsPerAccess = Count;
  static int const kCount = Count;

  using FragmentAccumulator = cutlass::Array<ElementAccumulator, kCount>;
  using FragmentCompute = cutlass::Array<ElementCompute, kCount>;
  using FragmentC = cutlass::Array<ElementC, kCount>;
  using FragmentOutput = cutlass::Array<ElementOutput, kCount>;
  using FragmentZ = FragmentOutput;
  using FragmentT = FragmentOutput;

  static bool const kIsHeavy = false;
  static bool const kStoreZ = true;
  static bool const kStoreT = false;

  struct Params {
    int num_sources;
    CUTLASS_HOST_DEVICE Params() : num_sources(0) {}
    CUTLASS_HOST_DEVICE explicit Params(int n) : num_sources(n) {}
  };

 private:
  int num_sources_;

 public:
  CUTLASS_HOST_DEVICE explicit RcuEpilogueOp(Params const& params) : num_sources_(params.num_sources) {}

  CUTLASS_HOST_DEVICE bool is_source_needed() const { return num_sources_ > 0; }

  // Split-K is never used by these kernels.
  CUTLASS_HOST_DEVICE void set_k_partition(int, int) {}

  // Residual path (conv2).
  CUTLASS_HOST_DEVICE
  void operator()(FragmentZ& frag_Z, FragmentT&, FragmentAccumulator const& AB, FragmentC const& c1,
                  FragmentC const& c2, FragmentCompute const& bias) const {
    cutlass::NumericArrayConverter<ElementCompute, ElementC, kCount> to_compute;
    cutlass::NumericArrayConverter<ElementOutput, ElementCompute, kCount> to_output;
    FragmentCompute r1 = to_compute(c1);
    FragmentCompute r2 = to_compute(c2);
    FragmentCompute z;
    bool const two = num_sources_ > 1;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) {
      float v = AB[i] + bias[i] + r1[i];
      z[i] = two ? v + r2[i] : v;
    }
    frag_Z = to_output(z);
  }

  // No-source path (conv1): bias + ReLU.
  CUTLASS_HOST_DEVICE
  void operator()(FragmentZ& frag_Z, FragmentT&, FragmentAccumulator const& AB,
                  FragmentCompute const& bias) const {
    cutlass::NumericArrayConverter<ElementOutput, ElementCompute, kCount> to_output;
    FragmentCompute z;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) {
      float v = AB[i] + bias[i];
      z[i] = v > 0.f ? v : (v != v ? v : 0.f);  // relu, NaN kept
    }
    frag_Z = to_output(z);
  }
};

// ---------------------------------------------------------------------------------------------
// Kernel: implicit-GEMM fprop mainloop + EpilogueWithBroadcast (dual source), no split-K.

template <typename Mma_, typename Epilogue_, typename ThreadblockSwizzle_>
struct RcuConvKernel {
  using Mma = Mma_;
  using Epilogue = Epilogue_;
  using EpilogueOutputOp = typename Epilogue::OutputOp;
  using ThreadblockSwizzle = ThreadblockSwizzle_;

  using ElementA = typename Mma::IteratorA::Element;
  using ElementB = typename Mma::IteratorB::Element;
  using ElementC = typename EpilogueOutputOp::ElementOutput;
  using LayoutC = cutlass::layout::TensorNHWC;
  using ThreadblockShape = typename Mma::Shape;

  static cutlass::conv::Operator const kConvolutionalOperator = cutlass::conv::Operator::kFprop;
  using WarpCount = typename Mma::WarpCount;
  static int const kThreadCount = 32 * WarpCount::kCount;

  using TensorRefA = typename Mma::IteratorA::TensorRef;
  using TensorRefB = typename Mma::IteratorB::TensorRef;
  using TensorRefC = cutlass::TensorRef<ElementC, LayoutC>;

  using ConvOutputIteratorParameter = cutlass::epilogue::threadblock::ConvOutputIteratorParameter<
      LayoutC, typename Epilogue::OutputTileIterator::Layout, TensorRefC, kConvolutionalOperator,
      cutlass::conv::Conv2dProblemSize>;

  struct Arguments {
    cutlass::conv::Conv2dProblemSize problem_size;
    TensorRefA ref_A;
    TensorRefB ref_B;
    TensorRefC ref_C1;  // first residual source (data may be null)
    TensorRefC ref_C2;  // second residual source (data may be null: no loads)
    TensorRefC ref_D;
    typename EpilogueOutputOp::Params output_op;
    void* ptr_Vector;  // bias [K]
  };

  struct Params {
    cutlass::conv::Conv2dProblemSize problem_size;
    cutlass::gemm::GemmCoord grid_tiled_shape;
    int swizzle_log_tile;
    int gemm_k_iterations;
    typename Mma::IteratorA::Params iterator_A;
    typename Mma::IteratorA::Element const* ptr_A;
    typename Mma::IteratorB::Params iterator_B;
    typename Mma::IteratorB::Element const* ptr_B;
    typename Epilogue::OutputTileIterator::Params iterator_C1;
    typename Epilogue::OutputTileIterator::Element* ptr_C1;
    typename Epilogue::OutputTileIterator::Params iterator_C2;
    typename Epilogue::OutputTileIterator::Element* ptr_C2;
    typename Epilogue::OutputTileIterator::Params iterator_D;
    typename Epilogue::OutputTileIterator::Element* ptr_D;
    typename EpilogueOutputOp::Params output_op;
    typename Epilogue::TensorTileIterator::Params params_Tensor;
    void* ptr_Vector;

    CUTLASS_HOST_DEVICE Params() : swizzle_log_tile(0), gemm_k_iterations(0), ptr_Vector(nullptr) {}

    CUTLASS_HOST_DEVICE explicit Params(Arguments const& args)
        : problem_size(args.problem_size),
          iterator_A(Mma::IteratorA::getParams(args.problem_size, args.ref_A.layout())),
          ptr_A(args.ref_A.data()),
          iterator_B(args.problem_size, args.ref_B.layout()),
          ptr_B(args.ref_B.data()),
          iterator_C1(ConvOutputIteratorParameter::layout(args.ref_C1),
                      cutlass::conv::implicit_gemm_tensor_c_extent(kConvolutionalOperator, args.problem_size)),
          ptr_C1(args.ref_C1.data()),
          iterator_C2(ConvOutputIteratorParameter::layout(args.ref_C2),
                      cutlass::conv::implicit_gemm_tensor_c_extent(kConvolutionalOperator, args.problem_size)),
          ptr_C2(args.ref_C2.data()),
          iterator_D(ConvOutputIteratorParameter::layout(args.ref_D),
                     cutlass::conv::implicit_gemm_tensor_c_extent(kConvolutionalOperator, args.problem_size)),
          ptr_D(args.ref_D.data()),
          output_op(args.output_op),
          params_Tensor(typename Epilogue::TensorTileIterator::Layout(0)),
          ptr_Vector(args.ptr_Vector) {
      gemm_k_iterations = cutlass::conv::implicit_gemm_k_iterations(
          kConvolutionalOperator, ThreadblockShape::kK, args.problem_size,
          cutlass::conv::IteratorAlgorithm::kOptimized);
      ThreadblockSwizzle threadblock_swizzle;
      grid_tiled_shape = threadblock_swizzle.get_tiled_shape(
          cutlass::conv::implicit_gemm_problem_size(kConvolutionalOperator, args.problem_size),
          {ThreadblockShape::kM, ThreadblockShape::kN, ThreadblockShape::kK}, 1);
      swizzle_log_tile = threadblock_swizzle.get_log_tile(grid_tiled_shape);
    }
  };

  union SharedStorage {
    typename Mma::SharedStorage main_loop;
    typename Epilogue::SharedStorage epilogue;
  };

  CUTLASS_HOST_DEVICE RcuConvKernel() {}

  CUTLASS_DEVICE
  void operator()(Params const& params, SharedStorage& shared_storage) {
    ThreadblockSwizzle threadblock_swizzle;
    cutlass::gemm::GemmCoord threadblock_tile_idx = threadblock_swizzle.get_tile_offset(params.swizzle_log_tile);
    if (params.grid_tiled_shape.m() <= threadblock_tile_idx.m() ||
        params.grid_tiled_shape.n() <= threadblock_tile_idx.n()) {
      return;
    }

    int thread_idx = threadIdx.x;
    typename Mma::IteratorA iterator_A(
        params.iterator_A, params.problem_size, params.ptr_A, thread_idx,
        cutlass::MatrixCoord(threadblock_tile_idx.m() * Mma::Shape::kM, threadblock_tile_idx.k() * Mma::Shape::kK));
    typename Mma::IteratorB iterator_B(
        params.iterator_B, params.problem_size, params.ptr_B, thread_idx,
        cutlass::MatrixCoord(threadblock_tile_idx.k() * Mma::Shape::kK, threadblock_tile_idx.n() * Mma::Shape::kN));

    int warp_idx = cutlass::canonical_warp_idx_sync();
    int lane_idx = threadIdx.x % 32;

    Mma mma(shared_storage.main_loop, thread_idx, warp_idx, lane_idx);
    typename Mma::FragmentC accumulators;
    accumulators.clear();
    mma(params.gemm_k_iterations, accumulators, iterator_A, iterator_B, accumulators);

    EpilogueOutputOp output_op(params.output_op);

    cutlass::MatrixCoord threadblock_offset(threadblock_tile_idx.m() * Mma::Shape::kM,
                                            threadblock_tile_idx.n() * Mma::Shape::kN);
    auto extent = ConvOutputIteratorParameter::extent(params.problem_size);

    typename Epilogue::OutputTileIterator iterator_D(params.iterator_D, params.ptr_D, extent, thread_idx,
                                                     threadblock_offset);
    typename Epilogue::OutputTileIterator iterator_C1(params.iterator_C1, params.ptr_C1, extent, thread_idx,
                                                      threadblock_offset);
    typename Epilogue::OutputTileIterator iterator_C2(params.iterator_C2, params.ptr_C2, extent, thread_idx,
                                                      threadblock_offset);
    typename Epilogue::TensorTileIterator tensor_iterator(params.params_Tensor, nullptr, extent, thread_idx,
                                                          threadblock_offset);

    typename Epilogue::ElementVector* ptr_Vector = static_cast<typename Epilogue::ElementVector*>(params.ptr_Vector);
    if (ptr_Vector) {
      ptr_Vector += threadblock_offset.column();
    }

    Epilogue epilogue(shared_storage.epilogue, thread_idx, warp_idx, lane_idx);
    epilogue(output_op, ptr_Vector, iterator_D, accumulators, iterator_C1, iterator_C2, tensor_iterator, extent,
             threadblock_offset);
  }
};

// ---------------------------------------------------------------------------------------------
// The one tile configuration (kept single to keep the build short): 128x128x64 threadblock,
// 4 warps of 64x64x64, mma.sync 16x8x16, 3 stages (96 KiB shared memory: 2 CTAs/SM on H100).

template <typename Element_, bool kReluA>
struct RcuConvConfig {
  using Element = Element_;
  using ThreadblockShape = cutlass::gemm::GemmShape<128, 128, 64>;
  using WarpShape = cutlass::gemm::GemmShape<64, 64, 64>;
  using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;
  static int const kStages = 3;
  static int const kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 8 elements = 16 bytes

  using MmaCore = cutlass::gemm::threadblock::DefaultMmaCore<
      ThreadblockShape, WarpShape, InstructionShape, Element, cutlass::layout::RowMajor, Element,
      cutlass::layout::ColumnMajor, float, cutlass::layout::RowMajor, cutlass::arch::OpClassTensorOp, kStages,
      cutlass::arch::OpMultiplyAdd>;

  using IteratorA = cutlass::conv::threadblock::Conv2dFpropActivationTileAccessIteratorOptimized<
      cutlass::MatrixShape<ThreadblockShape::kM, ThreadblockShape::kK>, Element, cutlass::layout::TensorNHWC,
      typename MmaCore::IteratorThreadMapA, cutlass::AlignedArray<Element, kAlignment>>;
  using IteratorB = cutlass::conv::threadblock::Conv2dFpropFilterTileAccessIteratorOptimized<
      cutlass::MatrixShape<ThreadblockShape::kK, ThreadblockShape::kN>, Element, cutlass::layout::TensorNHWC,
      typename MmaCore::IteratorThreadMapB, cutlass::AlignedArray<Element, kAlignment>>;

  using StockWarpMma = typename MmaCore::MmaTensorOp;
  using WarpMma = typename std::conditional<kReluA, ReluAWarpMma<StockWarpMma>, StockWarpMma>::type;
  using MmaPolicy = cutlass::gemm::threadblock::MmaPolicy<WarpMma, typename MmaCore::MmaPolicy::SmemPaddingA,
                                                          typename MmaCore::MmaPolicy::SmemPaddingB,
                                                          MmaCore::MmaPolicy::kPartitionsK>;

  using Mma = cutlass::conv::threadblock::ImplicitGemmMultistage<
      ThreadblockShape, IteratorA, typename MmaCore::SmemIteratorA, cutlass::arch::CacheOperation::Always,
      IteratorB, typename MmaCore::SmemIteratorB, cutlass::arch::CacheOperation::Global, MmaPolicy, kStages>;

  using OutputOp = RcuEpilogueOp<Element, kAlignment>;
  static int const kPartitionsK = ThreadblockShape::kK / WarpShape::kK;
  using Epilogue = typename cutlass::epilogue::threadblock::DefaultEpilogueWithBroadcastTensorOp<
      ThreadblockShape, StockWarpMma, kPartitionsK, Element, Element, Element, OutputOp, kAlignment>::Epilogue;

  using Kernel = RcuConvKernel<Mma, Epilogue, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>>;
};

// ---------------------------------------------------------------------------------------------
// Host side.

inline cutlass::conv::Conv2dProblemSize make_problem(int n, int h, int w, int c) {
  // input NHWC [n, h, w, c], filter KRSC [c, 3, 3, c], output NPQK [n, h, w, c]; PyTorch's conv2d is a
  // cross-correlation.
  return cutlass::conv::Conv2dProblemSize(n, h, w, c, /*K=*/c, /*R=*/3, /*S=*/3, /*P=*/h, /*Q=*/w,
                                          /*pad_h=*/1, /*pad_w=*/1, /*stride_h=*/1, /*stride_w=*/1,
                                          /*dilation_h=*/1, /*dilation_w=*/1,
                                          cutlass::conv::Mode::kCrossCorrelation, /*split_k_slices=*/1,
                                          /*groups=*/1);
}

template <typename Config>
const char* check(int n, int h, int w, int c) {
  using Kernel = typename Config::Kernel;
  using Element = typename Config::Element;
  if (n <= 0 || h <= 0 || w <= 0 || c <= 0) return "empty problem";
  if (c % Config::kAlignment != 0) return "channel count must be a multiple of 8";
  long long bytes = (long long)n * h * w * c * (long long)sizeof(Element);
  if (bytes > kRcuMaxTensorBytes) return "activation tensor over 2^31 bytes (split the batch)";
  auto problem = make_problem(n, h, w, c);
  if (Kernel::Mma::IteratorA::can_implement(problem) != cutlass::Status::kSuccess) {
    return "CUTLASS activation iterator cannot implement this problem";
  }
  if (Kernel::Mma::IteratorB::can_implement(problem) != cutlass::Status::kSuccess) {
    return "CUTLASS filter iterator cannot implement this problem";
  }
  return nullptr;
}

template <typename Config>
const char* run(const RcuConvProblem& p, int num_sources, cudaStream_t stream) {
  using Kernel = typename Config::Kernel;
  using Element = typename Config::Element;
  if (const char* why = check<Config>(p.n, p.h, p.w, p.c)) return why;

  auto problem = make_problem(p.n, p.h, p.w, p.c);
  auto act_layout = cutlass::layout::TensorNHWC::packed({p.n, p.h, p.w, p.c});
  auto filter_layout = cutlass::layout::TensorNHWC::packed({p.c, 3, 3, p.c});

  typename Kernel::Arguments args;
  args.problem_size = problem;
  args.ref_A = typename Kernel::TensorRefA(static_cast<Element*>(const_cast<void*>(p.input)), act_layout);
  args.ref_B = typename Kernel::TensorRefB(static_cast<Element*>(const_cast<void*>(p.weight)), filter_layout);
  args.ref_C1 = typename Kernel::TensorRefC(static_cast<Element*>(const_cast<void*>(p.residual1)), act_layout);
  args.ref_C2 = typename Kernel::TensorRefC(static_cast<Element*>(const_cast<void*>(p.residual2)), act_layout);
  args.ref_D = typename Kernel::TensorRefC(static_cast<Element*>(p.output), act_layout);
  args.output_op = typename Kernel::EpilogueOutputOp::Params(num_sources);
  args.ptr_Vector = const_cast<void*>(p.bias);

  typename Kernel::Params params(args);
  typename Kernel::ThreadblockSwizzle swizzle;
  dim3 grid = swizzle.get_grid_shape(params.grid_tiled_shape);
  dim3 block(Kernel::kThreadCount, 1, 1);
  int smem_size = int(sizeof(typename Kernel::SharedStorage));
  if (smem_size >= (48 << 10)) {
    // Opt in to > 48 KiB of dynamic shared memory once per device (a function attribute lives in the
    // device's context): no extra runtime call per launch, none while a CUDA graph is being captured.
    static std::atomic<unsigned long long> opted_in{0};  // bit d: done on device d (one per kernel type)
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) {
      (void)cudaGetLastError();
      return "cudaGetDevice failed";
    }
    const unsigned long long bit = device < 64 ? (1ull << device) : 0ull;
    if (bit == 0 || (opted_in.load(std::memory_order_acquire) & bit) == 0) {
      cudaError_t err = cudaFuncSetAttribute(cutlass::Kernel<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             smem_size);
      if (err != cudaSuccess) {
        (void)cudaGetLastError();  // clear it: the caller reports this failure itself
        return "cudaFuncSetAttribute(MaxDynamicSharedMemorySize) failed (GPU without 96 KiB shared memory per block?)";
      }
      opted_in.fetch_or(bit, std::memory_order_acq_rel);
    }
  }
  cutlass::Kernel<Kernel><<<grid, block, smem_size, stream>>>(params);
  return nullptr;  // launch errors are left pending for the caller's C10_CUDA_KERNEL_LAUNCH_CHECK
}

}  // namespace rcu
}  // namespace dpt_fast

// Defines the three entry points of one element type (used once per .cu file).
#define DPT_FAST_RCU_DEFINE_ENTRY_POINTS(SUFFIX, ELEMENT)                                              \
  namespace dpt_fast {                                                                                 \
  const char* rcu_conv_check_##SUFFIX(int n, int h, int w, int c) {                                    \
    return rcu::check<rcu::RcuConvConfig<ELEMENT, true>>(n, h, w, c);                                  \
  }                                                                                                    \
  const char* rcu_conv1_##SUFFIX(const RcuConvProblem& p, cudaStream_t stream) {                       \
    return rcu::run<rcu::RcuConvConfig<ELEMENT, true>>(p, 0, stream);                                  \
  }                                                                                                    \
  const char* rcu_conv2_##SUFFIX(const RcuConvProblem& p, cudaStream_t stream) {                       \
    if (p.residual1 == nullptr) return "conv2 needs the residual input";                               \
    return rcu::run<rcu::RcuConvConfig<ELEMENT, false>>(p, p.residual2 ? 2 : 1, stream);               \
  }                                                                                                    \
  }
