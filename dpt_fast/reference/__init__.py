"""Plain-PyTorch reference implementations: the specification of every dpt_fast operator.

They are written to be read, not to be fast. Tests use them as the oracle for the fused kernels,
and the "reference" backend runs them; the "inline" backend runs their `*_plain` forms (the same
math as straight-line PyTorch) without any registered operator.
"""
from .attention import attention, attention_backward, attention_plain
from .attention import accumulation_dtype as attention_accumulation_dtype
from .reassemble import reassemble, reassemble_backward, reassemble_plain, READOUTS, RESAMPLES
from .rcu import residual_conv_unit, residual_conv_unit_backward, residual_conv_unit_plain

__all__ = [
    "attention", "attention_backward", "attention_plain",
    "reassemble", "reassemble_backward", "reassemble_plain", "READOUTS", "RESAMPLES",
    "residual_conv_unit", "residual_conv_unit_backward", "residual_conv_unit_plain",
]
