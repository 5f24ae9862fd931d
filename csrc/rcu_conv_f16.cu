// fp16 instantiation of the RCU convolutions (see rcu_conv_impl.cuh).
#include "rcu_conv_impl.cuh"

DPT_FAST_RCU_DEFINE_ENTRY_POINTS(f16, cutlass::half_t)
