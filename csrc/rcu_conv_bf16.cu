// bf16 instantiation of the RCU convolutions (see rcu_conv_impl.cuh).
#include "rcu_conv_impl.cuh"

DPT_FAST_RCU_DEFINE_ENTRY_POINTS(bf16, cutlass::bfloat16_t)
