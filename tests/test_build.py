"""The DPT_FAST_BUILD_CUDA switch of setup.py (0 skips the extension, 1 forces it and fails loudly, unset
builds it only when the toolchain is there). Runs setup.py in subprocesses; nothing is compiled:
CUDACXX pointing at a missing nvcc stands in for a machine without the toolchain."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(args, tmp_path, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "DPT_FAST_BUILD_CUDA"}
    full_env.update(env)
    proc = subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def _build_ext_args(tmp_path):
    return ["build_ext", "--build-temp", str(tmp_path / "temp"), "--build-lib", str(tmp_path / "lib")]


def test_zero_skips_the_extension(tmp_path):
    rc, out = _setup(["--name"], tmp_path, DPT_FAST_BUILD_CUDA="0")
    assert rc == 0, out
    assert "DPT_FAST_BUILD_CUDA=0: pure-Python install" in out


def test_unset_without_toolchain_installs_pure_python(tmp_path):
    rc, out = _setup(_build_ext_args(tmp_path), tmp_path, CUDACXX=str(tmp_path / "missing" / "nvcc"))
    assert rc == 0, out
    assert "pure-Python install" in out and "no nvcc found" in out
    assert not (tmp_path / "lib").exists() or not any((tmp_path / "lib").rglob("_C*"))


def test_one_without_toolchain_fails_loudly(tmp_path):
    rc, out = _setup(_build_ext_args(tmp_path), tmp_path, DPT_FAST_BUILD_CUDA="1",
                     CUDACXX=str(tmp_path / "missing" / "nvcc"))
    assert rc != 0, out
    assert "building the CUDA extension dpt_fast._C failed" in out and "no nvcc found" in out


@pytest.mark.parametrize("value", ["yes", "2"])
def test_bad_value_is_an_error(tmp_path, value):
    rc, out = _setup(["--name"], tmp_path, DPT_FAST_BUILD_CUDA=value)
    assert rc != 0
    assert "DPT_FAST_BUILD_CUDA must be 0, 1, auto or unset" in out


def test_unset_without_cutlass_installs_pure_python(tmp_path):
    """nvcc and a CUDA torch may be here, but without the CUTLASS headers the auto mode must not attempt (and
    fail) the build: it installs pure Python, like the other missing pieces of the toolchain."""
    rc, out = _setup(_build_ext_args(tmp_path), tmp_path, DPT_FAST_CUTLASS_INCLUDE=str(tmp_path / "no-cutlass"))
    assert rc == 0, out
    assert "pure-Python install" in out and "no CUTLASS headers found" in out
    assert "building dpt_fast._C" not in out


def test_build_requirements_bring_cmake_ninja_and_cutlass():
    """`pip install .` with build isolation only has what [build-system] requires: the CUDA extension's build
    tools and CUTLASS headers must be among them (torch is not: the target environment's is used)."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        requires = tomllib.load(f)["build-system"]["requires"]
    names = {r.split(">")[0].split("<")[0].split("=")[0].split(";")[0].strip() for r in requires}
    assert {"setuptools", "cmake", "ninja", "nvidia-cutlass"} <= names, requires
    assert "torch" not in names  # a downloaded torch could differ from the one the extension runs with


_ISOLATION = '''
# stands in for pip's build isolation: the environment's site-packages leave sys.path, only the build
# requirements (here: setuptools) stay importable
import sys
sys.path[:] = [p for p in sys.path if "site-packages" not in p] + [{overlay!r}]
'''


def test_build_isolation_uses_the_target_environments_torch(tmp_path):
    """Under build isolation torch is hidden from setup.py; it must find the torch of the environment being
    installed into (and not report "torch is not installed"), so that the extension is built when nvcc, cmake
    and CUTLASS are there. CUDACXX at a missing nvcc keeps the run from compiling anything."""
    import setuptools
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    site = os.path.dirname(os.path.dirname(setuptools.__file__))
    for name in ("setuptools", "pkg_resources", "_distutils_hack"):
        if os.path.exists(os.path.join(site, name)):
            os.symlink(os.path.join(site, name), overlay / name)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_ISOLATION.format(overlay=str(overlay)))
    probe = subprocess.run([sys.executable, "-c", "import torch"], env={**os.environ, "PYTHONPATH": str(hook)},
                           capture_output=True, text=True)
    assert probe.returncode != 0, "the stand-in isolation did not hide torch"
    rc, out = _setup(_build_ext_args(tmp_path), tmp_path, PYTHONPATH=str(hook),
                     CUDACXX=str(tmp_path / "missing" / "nvcc"))
    assert rc == 0, out
    assert "CUDA extension dpt_fast._C: not built" in out and "no nvcc found" in out, out
    assert "torch is not installed" not in out and "not a CUDA build" not in out, out  # this torch: cu130
