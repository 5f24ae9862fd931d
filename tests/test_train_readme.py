"""The README's training example learns, and a fresh depth head starts where gradients flow."""
import json
import re
import shlex
import time
from pathlib import Path

import pytest
import torch

import dpt_fast
from dpt_fast import train as trainer
from dpt_fast.data import SyntheticDataset, TrainStream
from helpers import one_thread  # noqa: F401 (autouse: one intra-op thread)

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_train_example() -> list[str]:
    section = README.read_text().split("## Training", 1)[1]
    line = re.search(r"^dpt-fast train --data synthetic .*$", section, re.M).group(0)
    return shlex.split(line)[2:]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("features", [32, 64])
def test_a_fresh_depth_model_outputs_positive_varying_depth(seed, features):
    # with PyTorch's default bias (uniform in +-0.18) about half of these seeds output exactly 0 everywhere
    torch.manual_seed(seed)
    model = dpt_fast.DPTDepthModel(backbone="vit_tiny_patch16_224", hooks=[0, 1, 2, 3], features=features).eval()
    images = TrainStream([SyntheticDataset(4, resolution=80)], 64, flip=False)
    batch = torch.stack([images[i]["image"] for i in range(2)])
    with torch.no_grad(), dpt_fast.use_backend("reference"):
        depth = model(batch)
    assert (depth > 0).all(), f"{(depth <= 0).float().mean():.0%} of the pixels are 0"
    assert depth.std() > 0
    # the initialisation changed values only: the released checkpoints' keys still fit
    assert sorted(k for k in model.state_dict() if k.startswith("scratch.output_conv.")) == [
        f"scratch.output_conv.{i}.{p}" for i in (0, 2, 4) for p in ("bias", "weight")]


def test_the_readme_training_example_learns(tmp_path):
    """README's `dpt-fast train --data synthetic ...` line, as written (the reference operators: under
    the Triton interpreter the fused ones compute the same, much more slowly), for its 50 steps."""
    flags = _readme_train_example()
    assert "--steps" in flags and "--out" in flags
    flags[flags.index("--out") + 1] = str(tmp_path / "tiny")
    start = time.perf_counter()
    assert trainer.main([*flags, "--num-workers", "0", "--backend", "reference", "--no-progress"]) == 0
    print(f"README example: {time.perf_counter() - start:.1f} s")

    losses = [json.loads(line)["loss"] for line in open(tmp_path / "tiny" / "metrics.jsonl")]
    print("logged losses:", [round(v, 4) for v in losses])
    assert len(losses) >= 5, losses
    # the mean loss of the last logged steps at most 60 % of the first ones' (a dead model stays flat)
    assert losses[-1] < 0.6 * losses[0], losses

    model = dpt_fast.load_model(tmp_path / "tiny" / "model").eval()
    size = int(flags[flags.index("--size") + 1])
    images = TrainStream([SyntheticDataset(8, resolution=size, seed=12345)], size, flip=False)
    batch = torch.stack([images[i]["image"] for i in range(2)])
    with torch.no_grad(), dpt_fast.use_backend("reference"):
        depth = model(batch)
    assert (depth > 0).float().mean() > 0.5 and depth.std() > 1e-3 * depth.abs().mean(), (depth.min(), depth.max())
