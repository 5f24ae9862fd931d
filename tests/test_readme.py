"""README stays true: its Python example runs (on CPU, with a tiny saved model in place of the
released file), and CI's commands are the ones README shows."""
import re
from pathlib import Path

import numpy as np
from PIL import Image

import dpt_fast
from helpers import run_readme_example
from model_helpers import TINY, randomize_

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_example_runs(tmp_path, monkeypatch):
    # seeded random weights: a fresh init can end in an all-zero (ReLU) depth map, a flat PNG
    model = randomize_(dpt_fast.DPTDepthModel(**TINY), seed=0, matrix_std=0.1)
    run_readme_example("Python", model, '"dpt_hybrid-midas-501f0c75.pt"', tmp_path, monkeypatch, (90, 120, 3))
    depth = np.asarray(Image.open(tmp_path / "photo-depth.png"))
    assert depth.shape == (90, 120) and depth.dtype == np.uint16 and depth.max() > depth.min()


def test_ci_runs_readme_commands():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "ci:install" in ci and "ci:test" in ci
    text = README.read_text()
    for marker in ("<!-- ci:install -->", "<!-- ci:test -->"):
        after = text.split(marker, 1)[1]
        assert re.search(r"^\$ \S", after, re.M), f"no command after {marker}"
