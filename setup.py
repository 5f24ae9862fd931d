"""Packaging: pure-Python package plus, when a CUDA toolchain is present, the dpt_fast._C extension
built by CMakeLists.txt. DPT_FAST_BUILD_CUDA=0 skips the extension, =1 forces it (and fails loudly)."""
from setuptools import setup

setup(
    packages=["dpt_fast", "dpt_fast.ops", "dpt_fast.reference", "dpt_fast.models", "dpt_fast.kernels"],
    package_dir={"dpt_fast": "dpt_fast", "dpt_fast.kernels": "kernels"},
)
