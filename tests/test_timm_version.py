"""The supported minimum timm version: declared once in pyproject.toml, checked when dpt_fast is
imported, and an older timm gives one message naming the version to install (not an ImportError
from deep inside timm)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpt_fast.models.backbone import TIMM_MIN_VERSION, check_timm_version

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_the_checked_minimum():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.findall(r'"timm>=([\d.]+)"', text) == [TIMM_MIN_VERSION]


@pytest.mark.parametrize("version, ok", [("1.0.15", False), ("1.0.27", False), ("0.9.16", False),
                                         (TIMM_MIN_VERSION, True), ("1.0.31", True), ("1.1.0.dev0", True),
                                         ("2.0.0+cpu", True)])
def test_version_check(version, ok):
    if ok:
        check_timm_version(version)
    else:
        with pytest.raises(ImportError, match=f"timm>={re.escape(TIMM_MIN_VERSION)}.*timm {re.escape(version)} "
                                              "is installed"):
            check_timm_version(version)


def test_importing_with_an_old_timm_names_the_required_version(tmp_path):
    """A stand-in timm package reporting 1.0.15 (which lacks what dpt_fast uses) ahead on the path."""
    fake = tmp_path / "timm"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "1.0.15"\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    result = subprocess.run([sys.executable, "-c", "import dpt_fast.models"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: dpt_fast needs timm>=") and "timm 1.0.15 is installed" in last
