"""Plain-PyTorch reference implementations: the specification of every dpt_fast operator.

They are written to be read, not to be fast. Tests use them as the oracle for the fused kernels,
and the "reference" backend runs them.
"""
from .attention import attention, attention_backward
from .attention import accumulation_dtype as attention_accumulation_dtype
from .reassemble import reassemble, reassemble_backward, READOUTS, RESAMPLES
from .rcu import residual_conv_unit, residual_conv_unit_backward

__all__ = [
    "attention", "attention_backward",
    "reassemble", "reassemble_backward", "READOUTS", "RESAMPLES",
    "residual_conv_unit", "residual_conv_unit_backward",
]
