"""Weights I/O: the original release's checkpoints (key/shape inventory, inference of the
architecture, wrappers, KITTI/NYU scale/shift/invert), dpt_fast's own format (bit-exact round trip),
and the errors for files that are missing, corrupt, unsafe or do not fit.

The original code is not vendored: `original_inventory` writes down each released model type's keys
and shapes from the facts of the release (ARCHITECTURE.md §3) -- timm's ViT keys under `pretrained.model.`,
the Reassemble, fusion and head modules by hand -- and the fake checkpoints are built from that
inventory, not from dpt_fast's model. Their tensors are strided views of a few small random buffers,
so a real-size checkpoint is a file of a few MB (torch.save stores the buffers, not the views).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import stat

import pytest
import timm
import torch

from dpt_fast import DPTDepthModel, DPTSegmentationModel
from dpt_fast.weights import CheckpointError, infer_original_config, load_model, save_model
from helpers import reference_backend  # noqa: F401 (autouse: operators on the reference backend)

TIMM_NAMES = {"vitb16_384": "vit_base_patch16_384", "vitl16_384": "vit_large_patch16_384",
              "vitb_rn50_384": "vit_base_r50_s16_384"}
WIDTHS = {"vitb16_384": [96, 192, 384, 768], "vitl16_384": [256, 512, 1024, 1024],
          "vitb_rn50_384": [256, 512, 768, 768]}

# The released files: (head, backbone) of each.
RELEASED = {
    "dpt_large-midas-2f21e586.pt": ("depth", "vitl16_384"),
    "dpt_hybrid-midas-501f0c75.pt": ("depth", "vitb_rn50_384"),
    "dpt_large-ade20k-b12dca68.pt": ("segmentation", "vitl16_384"),
    "dpt_hybrid-ade20k-53898607.pt": ("segmentation", "vitb_rn50_384"),
    "dpt_hybrid_kitti-cb926ef4.pt": ("depth", "vitb_rn50_384"),
    "dpt_hybrid_nyu-2ce69ec7.pt": ("depth", "vitb_rn50_384"),
}

TINY = dict(backbone="vit_tiny_patch16_224", hooks=[2, 5, 8, 11])


# ------------------------------------------------------------------ the release's key inventory

def original_inventory(backbone: str, head: str, num_classes: int = 150, features: int = 256) -> dict:
    """{key: shape} of an original-release DPT, written down from the release's facts."""
    inv = {}
    with torch.device("meta"):
        vit = timm.create_model(TIMM_NAMES[backbone])
    for key, value in vit.state_dict().items():  # timm's ViT, classifier head included
        inv["pretrained.model." + key] = tuple(value.shape)
    dim = vit.embed_dim
    hybrid = backbone == "vitb_rn50_384"
    widths = WIDTHS[backbone]
    # Reassemble: act_postprocessK = [readout (0), transpose, unflatten, 1x1 conv (3), resample (4)];
    # the hybrid's stages 1-2 are the ResNet maps (no parameters).
    for stage in range(3 if hybrid else 1, 5):
        p, f = f"pretrained.act_postprocess{stage}.", widths[stage - 1]
        inv[p + "0.project.0.weight"], inv[p + "0.project.0.bias"] = (dim, 2 * dim), (dim,)
        inv[p + "3.weight"], inv[p + "3.bias"] = (f, dim, 1, 1), (f,)
        resample = {1: (f, f, 4, 4), 2: (f, f, 2, 2), 4: (f, f, 3, 3)}  # ConvT k4 s4, ConvT k2 s2, conv s2
        if stage in resample:
            inv[p + "4.weight"], inv[p + "4.bias"] = resample[stage], (f,)
    use_bn = head == "segmentation"
    for i in range(1, 5):
        inv[f"scratch.layer{i}_rn.weight"] = (features, widths[i - 1], 3, 3)
        p = f"scratch.refinenet{i}."
        for unit in (1, 2):
            for conv in (1, 2):
                inv[f"{p}resConfUnit{unit}.conv{conv}.weight"] = (features, features, 3, 3)
                if use_bn:
                    for b in ("weight", "bias", "running_mean", "running_var"):
                        inv[f"{p}resConfUnit{unit}.bn{conv}.{b}"] = (features,)
                    inv[f"{p}resConfUnit{unit}.bn{conv}.num_batches_tracked"] = ()
                else:
                    inv[f"{p}resConfUnit{unit}.conv{conv}.bias"] = (features,)
        inv[p + "out_conv.weight"], inv[p + "out_conv.bias"] = (features, features, 1, 1), (features,)
    if head == "depth":
        convs = {0: (features // 2, features, 3), 2: (32, features // 2, 3), 4: (1, 32, 1)}
        for idx, (cout, cin, k) in convs.items():
            inv[f"scratch.output_conv.{idx}.weight"] = (cout, cin, k, k)
            inv[f"scratch.output_conv.{idx}.bias"] = (cout,)
    else:
        for prefix in ("scratch.output_conv.", "auxlayer."):
            inv[prefix + "0.weight"] = (features, features, 3, 3)
            for b in ("weight", "bias", "running_mean", "running_var"):
                inv[f"{prefix}1.{b}"] = (features,)
            inv[prefix + "1.num_batches_tracked"] = ()
            inv[prefix + "4.weight"], inv[prefix + "4.bias"] = (num_classes, features, 1, 1), (num_classes,)
    return inv


def fake_state_dict(inventory: dict, seed: int = 0) -> dict:
    """Tensors of the inventory's shapes with varied values, as strided views of small buffers."""
    g = torch.Generator().manual_seed(seed)
    size = 1 << 15
    noise = torch.randn(size, generator=g)
    buffers = {}

    def buffer(kind, scale):
        if (kind, scale) not in buffers:
            buffers[(kind, scale)] = 1 + 0.1 * noise.abs() if kind == "positive" else noise * scale
        return buffers[(kind, scale)]

    primes = [1, 3, 5, 7, 11]
    state = {}
    for i, (key, shape) in enumerate(inventory.items()):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
            continue
        if key.endswith("running_var") or (len(shape) == 1 and key.endswith("weight")):
            base = buffer("positive", 1.0)
        elif len(shape) >= 2 and not key.endswith(("cls_token", "pos_embed")):
            base = buffer("normal", round(1 / math.sqrt(math.prod(shape[1:])), 6))
        else:
            base = buffer("normal", 0.02)
        strides = tuple(primes[: len(shape)][::-1])
        span = sum((s - 1) * st for s, st in zip(shape, strides)) + 1
        assert span < size, key
        offset = (i * 7919) % (size - span)
        state[key] = base.as_strided(shape, strides, offset)
    return state


def _write(path, state, wrap=None):
    if wrap == "model":
        obj = {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]}}
    elif wrap == "state_dict":
        obj = {"state_dict": state, "epoch": 3}
    elif wrap == "module":
        obj = {"module." + k: v for k, v in state.items()}
    elif wrap == "compiled":  # torch.compile(model).state_dict(), wrapped in DDP, in a {"model": ...}
        obj = {"model": {"module._orig_mod." + k: v for k, v in state.items()}}
    else:
        obj = state
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("filename", list(RELEASED))
def test_released_inventory_loads_strict(tmp_path, filename):
    head, backbone = RELEASED[filename]
    inventory = original_inventory(backbone, head)
    # A few facts spelled out, independently of the generator above.
    if backbone == "vitb_rn50_384":
        assert inventory["pretrained.model.patch_embed.proj.weight"] == (768, 1024, 1, 1)
        assert "pretrained.model.patch_embed.backbone.stages.2.blocks.8.conv3.weight" in inventory
        assert "pretrained.act_postprocess1.3.weight" not in inventory
        assert inventory["scratch.layer1_rn.weight"] == (256, 256, 3, 3)
    else:
        assert inventory["pretrained.act_postprocess1.4.weight"] == (256, 256, 4, 4)
        assert inventory["pretrained.model.blocks.23.attn.qkv.weight"] == (3072, 1024)
    assert inventory["pretrained.model.head.weight"][0] == 1000
    assert inventory["pretrained.act_postprocess4.4.weight"] == (768 if "hybrid" in filename else 1024,) * 2 + (3, 3)

    state = fake_state_dict(inventory)
    path = _write(tmp_path / filename, state, wrap="model" if "large" in filename else None)
    assert path.stat().st_size < 20e6  # the views' small buffers only
    model = load_model(path)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == inventory  # exactly the release's keys and shapes
    cls = DPTSegmentationModel if head == "segmentation" else DPTDepthModel
    assert type(model) is cls and not model.training
    assert model.config["backbone"] == backbone and model.config["readout"] == "project"
    assert model.config["use_bn"] is (head == "segmentation")
    if head == "segmentation":
        assert model.config["num_classes"] == 150
    for key in ("pretrained.model.pos_embed", "scratch.refinenet2.resConfUnit1.conv1.weight",
                "scratch.output_conv.4.bias", "pretrained.act_postprocess4.0.project.0.weight"):
        assert torch.equal(model.state_dict()[key], state[key]), key


@pytest.mark.parametrize("name, scale, shift", [("dpt_hybrid_kitti-cb926ef4.pt", 0.00006016, 0.00579),
                                                ("dpt_hybrid_nyu-2ce69ec7.pt", 0.000305, 0.1378)])
def test_kitti_nyu_scale_shift_invert(tmp_path, name, scale, shift):
    state = fake_state_dict(original_inventory("vitb_rn50_384", "depth"), seed=1)
    state["scratch.output_conv.4.bias"] = torch.tensor([0.5])  # keep most outputs above the final ReLU
    path = _write(tmp_path / name, state, wrap="model")
    metric = load_model(path)
    assert (metric.config["scale"], metric.config["shift"], metric.config["invert"]) == (scale, shift, True)
    relative = load_model(path, invert=False)  # same weights, the network's raw output
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = relative(x)
        depth = metric(x)
    assert out.shape == depth.shape == (1, 64, 96) and out.std() > 0
    expected = 1.0 / torch.clamp(scale * out + shift, min=1e-8)  # depth = 1 / max(scale*out + shift, 1e-8)
    torch.testing.assert_close(depth, expected, rtol=1e-6, atol=0)
    # Other names give the plain relative model.
    plain = infer_original_config(state, filename="renamed.pt")
    assert (plain["scale"], plain["shift"], plain["invert"]) == (1.0, 0.0, False)
    # The released name without its hash still counts.
    renamed = infer_original_config(state, filename=name.split("-")[0] + ".pth")
    assert (renamed["scale"], renamed["shift"], renamed["invert"]) == (scale, shift, True)


@pytest.mark.parametrize("wrap", [None, "model", "state_dict", "module", "compiled"])
def test_wrappers_and_prefix(tmp_path, wrap):
    torch.manual_seed(0)
    model = DPTDepthModel(**TINY, features=32).eval()
    path = _write(tmp_path / "ckpt.pt", model.state_dict(), wrap=wrap)
    loaded = load_model(path, **TINY)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    # The original's constructor argument goes through the same reader.
    again = DPTDepthModel(path=path, **TINY, features=32)
    assert torch.equal(again.scratch.layer1_rn.weight, model.scratch.layer1_rn.weight)


def test_training_checkpoint_loads_with_its_recorded_config(tmp_path):
    """OUT/checkpoint.pt of dpt_fast.train (e.g. of an interrupted metric fine-tune) loads as the model it
    holds: the recorded config, scale/shift/invert included, not an inferred one."""
    from dpt_fast.train import CHECKPOINT_FORMAT
    model = _randomized(DPTDepthModel(**TINY, features=32, scale=0.5, shift=0.25, invert=True))
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": model.config,
                "optimizer": {"state": {}, "param_groups": []}, "step": 7, "rng": {"torch": torch.get_rng_state()},
                "args": {"lr": 1e-4, "data": ["synthetic"], "scale_range": (1.0, 1.0)}}, path)
    loaded = load_model(path)
    assert loaded.config == model.config and (loaded.scale, loaded.shift, loaded.invert) == (0.5, 0.25, True)
    _assert_bit_exact(model, loaded)
    assert load_model(path, invert=False).invert is False  # keywords still override


def test_non_released_vit_needs_backbone_and_hooks(tmp_path):
    path = _write(tmp_path / "tiny.pt", DPTDepthModel(**TINY, features=32).state_dict())
    with pytest.raises(CheckpointError, match="cannot be inferred") as info:
        load_model(path)
    assert "backbone=" in str(info.value) and "hooks=" in str(info.value)
    assert load_model(path, **TINY).config["features"] == 32


def test_readout_without_projection_warns_and_assumes_ignore(tmp_path):
    path = _write(tmp_path / "ignore.pt", DPTDepthModel(**TINY, features=32, readout="ignore").state_dict())
    with pytest.warns(UserWarning, match="assuming 'ignore'"):
        assert load_model(path, **TINY).config["readout"] == "ignore"
    assert load_model(path, **TINY, readout="add").config["readout"] == "add"


# ------------------------------------------------------------------------- dpt_fast's own format

def _randomized(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.05)
                if name.endswith("running_var"):
                    t.abs_().add_(0.5)
            elif name.endswith("num_batches_tracked"):
                t.fill_(17)
    return model.eval()


def _assert_bit_exact(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("make", [
    lambda: DPTDepthModel(**TINY, features=64, scale=0.25, shift=0.125, invert=True, non_negative=False),
    lambda: DPTSegmentationModel(5, **TINY, features=[16, 32, 48, 64], readout="add"),
], ids=["depth", "segmentation"])
def test_save_load_round_trip_bit_exact(tmp_path, make):
    torch.manual_seed(0)
    model = _randomized(make())
    directory = save_model(model, tmp_path / "saved")
    meta = json.loads((directory / "config.json").read_text())
    assert meta["format"] == "dpt_fast" and meta["format_version"] == 1 and meta["config"] == model.config
    loaded = load_model(directory)
    assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
    _assert_bit_exact(model, loaded)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    # The directory's files stand for it too.
    _assert_bit_exact(model, load_model(directory / "model.safetensors"))


def test_round_trip_keeps_dtype_and_load_casts(tmp_path):
    model = _randomized(DPTDepthModel(**TINY, features=32)).to(torch.bfloat16)
    loaded = load_model(save_model(model, tmp_path / "bf16"))
    _assert_bit_exact(model, loaded)
    assert loaded.scratch.layer1_rn.weight.dtype == torch.bfloat16
    assert load_model(tmp_path / "bf16", dtype=torch.float32).scratch.layer1_rn.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------- errors

def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model("/nonexistent/dpt_large-midas-2f21e586.pt")


def test_corrupt_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch checkpoint"):
        load_model(junk)
    good = _write(tmp_path / "good.pt", DPTDepthModel(**TINY, features=32).state_dict())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch checkpoint"):
        load_model(truncated, **TINY)
    saved = save_model(DPTDepthModel(**TINY, features=32), tmp_path / "saved")
    (saved / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        load_model(saved)


def test_unsafe_pickle_refused(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"model": DPTDepthModel(**TINY, features=32).state_dict(), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_model(path, **TINY)


def test_not_a_checkpoint(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_model(tmp_path / "list.pt")
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a DPT checkpoint"):
        load_model(tmp_path / "other.pt")
    torch.save({"dpt.embeddings.cls_token": torch.zeros(1), "neck.convs.0.weight": torch.zeros(1)}, tmp_path / "hf.pt")
    with pytest.raises(CheckpointError, match="Hugging Face"):
        load_model(tmp_path / "hf.pt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="without config.json"):
        load_model(tmp_path / "empty_dir")
    (tmp_path / "vit_dir").mkdir()
    (tmp_path / "vit_dir" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(CheckpointError, match="model_type='vit'"):
        load_model(tmp_path / "vit_dir")


def test_mismatched_state_dict_message(tmp_path):
    state = DPTDepthModel(**TINY, features=32).state_dict()
    del state["scratch.refinenet3.resConfUnit2.conv1.weight"]
    state["scratch.refinenet9.out_conv.weight"] = torch.zeros(1)
    state["scratch.refinenet2.out_conv.bias"] = torch.zeros(31)
    with pytest.raises(CheckpointError) as info:
        load_model(_write(tmp_path / "bad.pt", state, wrap="model"), **TINY)
    msg = str(info.value)
    assert "original-release" in msg and "DPTDepthModel(backbone='vit_tiny_patch16_224'" in msg
    assert "1 missing key(s) (first: scratch.refinenet3.resConfUnit2.conv1.weight)" in msg
    assert "1 unexpected key(s) (first: scratch.refinenet9.out_conv.weight)" in msg
    assert "scratch.refinenet2.out_conv.bias: file [31] vs model [32]" in msg
    assert info.value.__cause__ is None  # no chained state_dict traceback


# --------------------------------------------------------------------------- save_model's files

SMALL = dict(backbone="vit_base_patch16_384", hooks=[0, 1, 2, 3], features=16,
             vit_kwargs=dict(embed_dim=32, depth=4, num_heads=2, img_size=64))


def _failing_save_file(error):
    """safetensors' save_file that writes part of the file, then fails (a full disk, a Ctrl-C)."""
    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 4096)
        raise error
    return save_file


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_save_leaves_no_temporary_and_keeps_the_previous_model(tmp_path, monkeypatch, error):
    import safetensors.torch
    torch.manual_seed(0)
    directory = save_model(DPTDepthModel(**SMALL), tmp_path / "saved")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file(error))
    with pytest.raises(type(error)):
        save_model(DPTDepthModel(**SMALL), directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    with pytest.raises(type(error)):
        save_model(DPTDepthModel(**SMALL), tmp_path / "fresh")
    assert list((tmp_path / "fresh").iterdir()) == []


def test_save_removes_temporaries_of_killed_saves(tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    directory = tmp_path / "saved"
    directory.mkdir()
    stale = [directory / f".model.safetensors.tmp-{dead}-x1", directory / f".config.json.tmp-{dead}-x2",
             directory / "model.safetensors.tmp"]  # the last: the fixed name older versions used
    live = directory / f".model.safetensors.tmp-{os.getppid()}-x3"  # a save still running elsewhere
    for path in stale + [live]:
        path.write_bytes(b"\0" * 100)
    save_model(DPTDepthModel(**SMALL), directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted(["config.json", "model.safetensors", live.name])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_mode_of_any_new_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        directory = save_model(DPTDepthModel(**SMALL), tmp_path / "saved")
    finally:
        os.umask(old)
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o666 & ~umask, name
