"""Triton kernels of dpt_fast (installed as dpt_fast.kernels): @triton.jit functions and their
launchers, nothing else. Set TRITON_INTERPRET=1 before importing to run them on CPU tensors."""
