"""Packaging: the pure-Python package plus, when a CUDA toolchain is present, the dpt_fast._C extension
described by CMakeLists.txt (the fused residual conv unit, csrc/).

DPT_FAST_BUILD_CUDA selects:
  unset (or "auto")  build the extension when nvcc, a CUDA build of torch, cmake and the CUTLASS headers
                     (the nvidia-cutlass wheel) are found; otherwise install
                     pure Python (the reference implementation then serves) and say so
  0                  never build it
  1                  always build it; fail with a clear message when that is impossible
With pip's build isolation (plain `pip install .`) the build environment has setuptools, cmake, ninja and
nvidia-cutlass (pyproject.toml's build requirements) but not torch: the torch of the environment being
installed into is used (found by running the same interpreter outside the isolation), so the extension is
built against the torch it runs with. One line "dpt_fast setup: CUDA extension dpt_fast._C: built / not
built ..." says what happened and why (pip shows it with -v).

MAX_JOBS sets the parallel compile jobs (default: min(CPU count, 4)); DPT_FAST_CUDA_GENCODE overrides the
nvcc targets (default sm_80 + PTX, sm_90a), e.g. "-gencode=arch=compute_90a,code=sm_90a" for a quick build.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
ENV = "DPT_FAST_BUILD_CUDA"


def _note(msg: str) -> None:
    print(f"dpt_fast setup: {msg}", file=sys.stderr, flush=True)


class CUDABuildError(RuntimeError):
    pass


def _find_nvcc() -> str | None:
    """CUDACXX when set (and only it), else nvcc on PATH, under CUDA_HOME/CUDA_PATH, or /usr/local/cuda."""
    if os.environ.get("CUDACXX"):
        candidates = [os.environ["CUDACXX"]]
    else:
        candidates = [shutil.which("nvcc")]
        for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
            if os.environ.get(var):
                candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
        candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _find_tool(name: str, bin_dir_attr: str) -> str | None:
    """`name` on PATH, else the binary shipped by the PyPI package of that name (cmake, ninja)."""
    exe = shutil.which(name)
    if exe:
        return exe
    try:
        package = __import__(name)
    except ImportError:
        return None
    exe = os.path.join(getattr(package, bin_dir_attr), name)
    return exe if os.path.isfile(exe) else None


def _find_cmake() -> str | None:
    return _find_tool("cmake", "CMAKE_BIN_DIR")


def _find_ninja() -> str | None:
    return _find_tool("ninja", "BIN_DIR")


# Set when torch comes from the environment being installed into rather than the build environment (pip's
# build isolation): the CMake steps then run Python without the isolation's PYTHONPATH, so that they see it too.
_TORCH_FROM_TARGET_ENV: list[str] = []


def _target_env_site_with_torch() -> str | None:
    """Under pip's build isolation (which hides the packages of the environment being installed into): the
    folder of that environment from which its torch imports, found by running this same interpreter without
    the isolation's PYTHONPATH. The extension must be built against the torch it will run with, so a torch
    is never downloaded into the build environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    code = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    site = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else None
    return site if site and os.path.isdir(os.path.join(site, "torch")) else None


def _torch_cuda() -> tuple[str | None, str]:
    """(torch.version.cuda or None, a description)."""
    try:
        import torch
    except ImportError:
        site = _target_env_site_with_torch()
        if site is None:
            return None, ("torch is not installed (install a CUDA build of torch first; with pip's build isolation "
                          "the torch of the target environment is used)")
        sys.path.append(site)
        _TORCH_FROM_TARGET_ENV.append(site)
        try:
            import torch
        except ImportError as e:
            return None, f"torch of the target environment ({site}) does not import in the build: {e}"
    if not torch.version.cuda:
        return None, f"torch {torch.__version__} is not a CUDA build"
    return torch.version.cuda, f"torch {torch.__version__} (CUDA {torch.version.cuda})"


def _find_cutlass_include() -> str | None:
    """DPT_FAST_CUTLASS_INCLUDE when set (and only it), else the nvidia-cutlass wheel's headers (the same
    lookup as CMakeLists.txt); None when cutlass/cutlass.h is not there."""
    root = os.environ.get("DPT_FAST_CUTLASS_INCLUDE")
    if not root:
        import importlib.util

        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
    return root if os.path.isfile(os.path.join(root, "cutlass", "cutlass.h")) else None


def _cuda_toolchain_problem() -> str | None:
    """None when the extension can be attempted, else what is missing."""
    problems = []
    cuda, torch_desc = _torch_cuda()
    if cuda is None:
        problems.append(torch_desc)
    if _find_nvcc() is None:
        problems.append("no nvcc found (PATH, CUDACXX, CUDA_HOME)")
    if _find_cmake() is None:
        problems.append("no cmake found (pip install cmake)")
    if _find_cutlass_include() is None:
        problems.append("no CUTLASS headers found (pip install nvidia-cutlass, or set DPT_FAST_CUTLASS_INCLUDE)")
    return "; ".join(problems) or None


def _mode() -> str:
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "1"):
        return value
    raise SystemExit(f"dpt_fast setup: {ENV} must be 0, 1, auto or unset, got {os.environ[ENV]!r}")


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Runs CMakeLists.txt for each CMakeExtension; the module lands where setuptools expects it
    (and, for editable installs, setuptools copies it into dpt_fast/ in the source tree)."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        forced = _mode() == "1"
        try:
            self._cmake_build(ext)
        except CUDABuildError as exc:
            how = ("" if forced else
                   f" (it was attempted because nvcc and a CUDA build of torch were found; set {ENV}=0 to "
                   "install without it: the reference implementation then serves)")
            raise SystemExit(f"dpt_fast setup: building the CUDA extension dpt_fast._C failed{how}:\n{exc}") from None

    def _cmake_build(self, ext: Extension) -> None:
        cmake = _find_cmake()
        if cmake is None:
            raise CUDABuildError("cmake not found (pip install cmake)")
        problem = _cuda_toolchain_problem()
        if problem:
            raise CUDABuildError(problem)
        ext_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        ext_dir = os.path.dirname(ext_path)
        ext_file = os.path.basename(ext_path)
        suffix = ext_file[len("_C"):] if ext_file.startswith("_C") else sysconfig.get_config_var("EXT_SUFFIX")
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_dir, exist_ok=True)
        os.makedirs(ext_dir, exist_ok=True)

        args = [
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DDPT_FAST_EXT_SUFFIX={suffix}",
        ]
        nvcc = _find_nvcc()
        if nvcc and not os.environ.get("CUDACXX"):
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if os.environ.get("DPT_FAST_CUDA_GENCODE"):
            args.append(f"-DDPT_FAST_CUDA_GENCODE={os.environ['DPT_FAST_CUDA_GENCODE']}")
        # found here (the build environment sees nvidia-cutlass, a build requirement), not by CMake's Python
        args.append(f"-DDPT_FAST_CUTLASS_INCLUDE={_find_cutlass_include()}")
        ninja = _find_ninja()
        if ninja and not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = os.environ.get("MAX_JOBS") or str(min(os.cpu_count() or 1, 4))

        start = time.monotonic()
        _note(f"building dpt_fast._C with CMake in {build_dir} ({jobs} jobs)")
        try:
            self._run([cmake, "-S", ROOT, "-B", build_dir, *args])
        except CUDABuildError as first:
            # torch's cmake config (find_package(Torch)) is picky about the CUDA toolkit layout; the
            # extension only needs torch's headers and three libraries, which Python can name.
            _note("CMake configure with find_package(Torch) failed; retrying with torch's paths from Python "
                  "(-DDPT_FAST_FIND_TORCH=OFF)")
            build_dir += "-torch-from-python"
            try:
                self._run([cmake, "-S", ROOT, "-B", build_dir, *args, "-DDPT_FAST_FIND_TORCH=OFF"])
            except CUDABuildError as second:
                raise CUDABuildError(f"{first}\n\nand the retry without find_package(Torch):\n{second}") from None
        self._run([cmake, "--build", build_dir, "--parallel", jobs])
        if not os.path.isfile(ext_path):
            raise CUDABuildError(f"CMake finished but {ext_path} was not produced")
        _note(f"CUDA extension dpt_fast._C: built ({ext_path}, {time.monotonic() - start:.0f} s)")

    @staticmethod
    def _run(cmd: list[str]) -> None:
        _note("$ " + " ".join(cmd))
        env = None
        if _TORCH_FROM_TARGET_ENV:  # CMake's Python must import the target environment's torch, as setup.py did
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        sys.stderr.write(proc.stdout)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-60:])
            raise CUDABuildError(f"`{' '.join(cmd)}` exited with {proc.returncode}; last output:\n{tail}")


def _ext_modules() -> list[Extension]:
    mode = _mode()
    if mode == "0":
        _note(f"CUDA extension dpt_fast._C: not built, {ENV}=0: pure-Python install "
              "(the reference residual conv unit serves on every device)")
        return []
    if mode == "auto":
        problem = _cuda_toolchain_problem()
        if problem:
            _note(f"CUDA extension dpt_fast._C: not built, pure-Python install: {problem}. "
                  f"(The reference residual conv unit serves; set {ENV}=1 to require the extension.)")
            return []
    return [CMakeExtension("dpt_fast._C")]


setup(
    packages=["dpt_fast", "dpt_fast.ops", "dpt_fast.reference", "dpt_fast.models", "dpt_fast.kernels"],
    package_dir={"dpt_fast": "dpt_fast", "dpt_fast.kernels": "kernels"},
    ext_modules=_ext_modules(),
    cmdclass={"build_ext": CMakeBuild},
)
