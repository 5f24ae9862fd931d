"""The three dpt_fast operators, registered with torch.library under the `dpt_fast` namespace.

Each file defines one operator: schema, fake (meta) implementation with exact strides, autograd,
and the dispatch between the reference implementation and the fused kernel.
"""
from .attention import attention
from .reassemble import reassemble
from .rcu import residual_conv_unit

__all__ = ["attention", "reassemble", "residual_conv_unit"]
