"""Depth Anything V1/V2: parity with transformers, the original's position-embedding rule, the
original key layout, loading, preprocessing and a few training steps (CPU, tiny configurations)."""
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dpt_fast
from dpt_fast import depth_anything_weights as daw
from dpt_fast import specs, transforms
from dpt_fast.models.depth_anything import DepthAnythingModel, resize_position_grid
from dpt_fast.weights import CheckpointError

from da_helpers import IMAGE_SIZE, OUT_INDICES, hf_model, hf_predict
from helpers import relative_error
# autouse: operators on the reference backend (tests/test_depth_anything_fused.py runs the kernels)
from helpers import reference_backend  # noqa: F401

pytest.importorskip("transformers")


SQUARE = (IMAGE_SIZE, IMAGE_SIZE)     # the trained grid: no position-embedding resize
NON_SQUARE = (14 * 9, 14 * 13)        # a resize in both directions


def _save_original(hf, path):
    """transformers' weights written as an original-release file (pretrained.* + depth_head.*)."""
    state, unknown = daw.hf_state_dict_to_original(hf.state_dict())
    assert unknown == []
    torch.save(state, path)
    return state


def _with_original_rule(hf):
    """transformers' model with its Dinov2 position resize replaced by the original release's rule."""
    embeddings = hf.backbone.embeddings

    def interpolate(embeddings_out, height, width):
        pos = embeddings.position_embeddings
        side = math.isqrt(pos.shape[1] - 1)
        if embeddings_out.shape[1] - 1 == side * side and height == width:
            return pos
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        scale = ((height // 14 + 0.1) / side, (width // 14 + 0.1) / side)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        return torch.cat((pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])), dim=1)

    embeddings.interpolate_pos_encoding = interpolate
    return hf


# ----------------------------------------------------------------------------- transformers parity

@pytest.mark.parametrize("version,metric", [(1, False), (2, False), (2, True)])
def test_transformers_folder_matches_transformers(tmp_path, version, metric):
    hf = hf_model(version, metric)
    hf.save_pretrained(tmp_path / "hf")
    model = dpt_fast.load_model(tmp_path / "hf")
    assert isinstance(model, DepthAnythingModel)
    assert model.config["taps"] == [i - 1 for i in OUT_INDICES[version]]
    assert model.config["pos_embed_rule"] == "bicubic_size"  # transformers' rule travels with its weights
    assert model.metric == metric and model.max_depth == (20.0 if metric else 1.0)
    assert model.output_kind == ("metric_depth" if metric else "relative_disparity")
    assert model.preprocessing.mean == (0.485, 0.456, 0.406) and model.preprocessing.multiple == 14
    for batch, size in ((1, SQUARE), (2, NON_SQUARE)):
        x = torch.randn(batch, 3, *size)
        expected = hf_predict(hf, x)
        with torch.no_grad():
            out = model(x)
        assert out.shape == expected.shape == (batch, *size)
        assert expected.std() > 1e-2 * expected.abs().mean()  # not a flat map: the comparison means something
        assert relative_error(out, expected) < 1e-4, size


def test_position_rule_changes_numbers_off_the_trained_grid(tmp_path):
    """The rules agree on the trained grid and differ elsewhere: loading with the wrong rule is visible."""
    hf = hf_model(2)
    hf.save_pretrained(tmp_path / "hf")
    hf_rule = dpt_fast.load_model(tmp_path / "hf")
    original_rule = dpt_fast.load_model(tmp_path / "hf", pos_embed_rule="bicubic_offset")
    via_file = dpt_fast.load_model(tmp_path / "hf" / "model.safetensors")  # a file in the folder: the folder
    assert via_file.config == hf_rule.config
    with torch.no_grad():
        x = torch.randn(1, 3, *SQUARE)
        assert torch.equal(hf_rule(x), original_rule(x))
        x = torch.randn(1, 3, *NON_SQUARE)
        assert relative_error(original_rule(x), hf_rule(x)) > 1e-3


@pytest.mark.parametrize("metric", [False, True])
def test_original_file_follows_the_original_rule(tmp_path, metric):
    hf = hf_model(2, metric, max_depth=80)
    name = "depth_anything_v2_metric_vkitti_tiny.pth" if metric else "depth_anything_v2_tiny.pth"
    _save_original(hf, tmp_path / name)
    model = dpt_fast.load_model(tmp_path / name, taps=[0, 1, 3, 4])
    assert model.config["pos_embed_rule"] == "bicubic_offset"
    assert model.metric == metric and model.max_depth == (80.0 if metric else 1.0)  # from the file name
    x = torch.randn(1, 3, *SQUARE)
    with torch.no_grad():
        assert relative_error(model(x), hf_predict(hf, x)) < 1e-4
    _with_original_rule(hf)
    x = torch.randn(2, 3, *NON_SQUARE)
    with torch.no_grad():
        assert relative_error(model(x), hf_predict(hf, x)) < 1e-4


def test_use_clstoken_readout_projects_the_class_token(tmp_path):
    """`use_clstoken` checkpoints: GELU(Linear(cat(token, class token))) before each projection."""
    hf = hf_model(2)
    state = _save_original(hf, tmp_path / "plain.pth")
    g = torch.Generator().manual_seed(5)
    for i in range(4):
        state[f"depth_head.readout_projects.{i}.0.weight"] = torch.randn(64, 128, generator=g) * 0.1
        state[f"depth_head.readout_projects.{i}.0.bias"] = torch.randn(64, generator=g) * 0.1
    torch.save(state, tmp_path / "depth_anything_v2_cls.pth")
    model = dpt_fast.load_model(tmp_path / "depth_anything_v2_cls.pth", taps=[0, 1, 3, 4])
    assert model.config["use_clstoken"]

    # restatement: the same taps through the readout, then the plain (ignore) model's decoder
    plain = dpt_fast.load_model(tmp_path / "plain.pth", taps=[0, 1, 3, 4], version=2)
    x = torch.randn(1, 3, *NON_SQUARE)
    with torch.no_grad():
        taps, gh, gw = plain.encode(x)
        read = []
        for i, t in enumerate(taps):
            cls = t[:, :1].expand(-1, t.shape[1] - 1, -1)
            w, b = state[f"depth_head.readout_projects.{i}.0.weight"], state[f"depth_head.readout_projects.{i}.0.bias"]
            read.append(torch.cat((t[:, :1], F.gelu(F.linear(torch.cat((t[:, 1:], cls), -1), w, b))), dim=1))
        maps = plain.depth_head.reassemble(read, gh, gw)
        expected = plain.depth_head(maps, gh, gw).squeeze(1)
        assert relative_error(model(x), expected) < 1e-5


# ------------------------------------------------------------------------ the original's position rule

def _cubic(t, a=-0.75):
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    if t < 2:
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    return 0.0


def _resample_matrix(n_in, n_out, scale):
    """Bicubic (Keys, a = -0.75, edges clamped) sampling from the scale factor: the source position of
    output pixel i is (i + 0.5) / scale - 0.5."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        for k in range(base - 1, base + 3):
            m[i, min(max(k, 0), n_in - 1)] += _cubic(src - k)
    return m


@pytest.mark.parametrize("grid", [(20, 30), (37, 52), (74, 37)])
def test_original_position_rule_restated(grid):
    """bicubic_offset = bicubic sampling at the scale ((grid + 0.1) / 37), not at grid / 37."""
    torch.manual_seed(0)
    pos = torch.randn(1, 8, 37, 37, dtype=torch.float64)
    out = resize_position_grid(pos, *grid, "bicubic_offset").double()
    rows = _resample_matrix(37, grid[0], (grid[0] + 0.1) / 37)
    cols = _resample_matrix(37, grid[1], (grid[1] + 0.1) / 37)
    expected = np.einsum("ij,cjk,lk->cil", rows, pos[0].numpy(), cols)
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-4, atol=5e-5)  # resized in fp32
    size_rule = resize_position_grid(pos, *grid, "bicubic_size").double()
    assert (size_rule - out).abs().max() > 1e-3  # transformers' rule samples elsewhere


def test_trained_grid_skips_the_resize():
    model = DepthAnythingModel("da2-small", taps=[0, 1, 2, 3], vit_kwargs=dict(embed_dim=64, depth=4, num_heads=1))
    pos = model.position_embedding(37, 37)
    assert pos.data_ptr() == model.pretrained.pos_embed.data_ptr()
    assert model.position_embedding(37, 38).shape == (1, 1 + 37 * 38, 64)


# ------------------------------------------------------------------------------ original key layout

def _original_keys(depth, use_clstoken=False):
    """The release's key names, written out from its module layout."""
    keys = {"pretrained.cls_token", "pretrained.pos_embed", "pretrained.mask_token",
            "pretrained.patch_embed.proj.weight", "pretrained.patch_embed.proj.bias",
            "pretrained.norm.weight", "pretrained.norm.bias"}
    for b in range(depth):
        for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"pretrained.blocks.{b}.{name}.weight", f"pretrained.blocks.{b}.{name}.bias"}
        keys |= {f"pretrained.blocks.{b}.ls1.gamma", f"pretrained.blocks.{b}.ls2.gamma"}
    head = "depth_head."
    for i in range(4):
        keys |= {f"{head}projects.{i}.weight", f"{head}projects.{i}.bias", f"{head}scratch.layer{i + 1}_rn.weight"}
        if i != 2:
            keys |= {f"{head}resize_layers.{i}.weight", f"{head}resize_layers.{i}.bias"}
        if use_clstoken:
            keys |= {f"{head}readout_projects.{i}.0.weight", f"{head}readout_projects.{i}.0.bias"}
        for unit in ("resConfUnit1", "resConfUnit2"):
            for conv in ("conv1", "conv2"):
                keys |= {f"{head}scratch.refinenet{i + 1}.{unit}.{conv}.{p}" for p in ("weight", "bias")}
        keys |= {f"{head}scratch.refinenet{i + 1}.out_conv.{p}" for p in ("weight", "bias")}
    for conv in ("output_conv1", "output_conv2.0", "output_conv2.2"):
        keys |= {f"{head}scratch.{conv}.weight", f"{head}scratch.{conv}.bias"}
    return keys


@pytest.mark.parametrize("arch", ["da2-small", "da2-base", "da2-large", "da1-large", "da2-metric-hypersim-large"])
def test_state_dict_keys_are_the_original_layout(arch):
    with torch.device("meta"):
        model = DepthAnythingModel(arch)
        with_cls = DepthAnythingModel(arch, use_clstoken=True)
    spec = specs.get(arch)
    assert set(model.state_dict()) == _original_keys(spec.depth)
    assert set(with_cls.state_dict()) == _original_keys(spec.depth, use_clstoken=True)
    state = model.state_dict()
    assert state["pretrained.pos_embed"].shape == (1, 1 + 37 * 37, spec.embed_dim)
    assert state["depth_head.scratch.layer1_rn.weight"].shape == (spec.features, spec.reassemble_widths[0], 3, 3)


def test_release_file_round_trip_is_strict(tmp_path):
    """A release-named file: the architecture from keys and name, every key back under its own name."""
    torch.manual_seed(0)
    model = DepthAnythingModel("da2-small")
    state = model.state_dict()
    torch.save(state, tmp_path / "depth_anything_v2_vits.pth")
    loaded = dpt_fast.load_model(tmp_path / "depth_anything_v2_vits.pth")
    assert loaded.config["arch"] == "da2-small" and loaded.config["taps"] == [2, 5, 8, 11]
    assert not loaded.metric
    back = loaded.state_dict()
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert loaded.load_state_dict(state, strict=True)  # the original's keys load directly too

    # what the keys cannot tell comes from the release file name, or from arguments
    infer = daw.infer_config
    assert infer(state, "depth_anything_vits14.pth")["taps"] == [8, 9, 10, 11]  # V1: the last four blocks
    assert infer(state, "depth_anything_v2_vits.pth")["taps"] == [2, 5, 8, 11]
    metric = infer(state, "depth_anything_v2_metric_hypersim_vits.pth")
    assert metric["metric"] and metric["max_depth"] == 20.0
    assert infer(state, "depth_anything_v2_metric_vkitti_vits.pth")["max_depth"] == 80.0
    with pytest.warns(UserWarning, match="version=1"):
        assert infer(state, "finetune.pth")["arch"] == "da2-small"
    assert infer(state, "finetune.pth", {"version": 1})["arch"] == "da1-small"
    assert infer(state, "finetune.pth", {"version": 2, "max_depth": 5.0})["max_depth"] == 5.0


def test_dpt_fast_format_round_trip(tmp_path):
    model = DepthAnythingModel("da2-metric-vkitti-small", taps=[0, 1, 2, 3], pos_embed_rule="bicubic_size",
                               vit_kwargs=dict(embed_dim=64, depth=4, num_heads=1)).eval()
    dpt_fast.save_model(model, tmp_path / "m")
    loaded = dpt_fast.load_model(tmp_path / "m")
    assert loaded.config == model.config
    x = torch.randn(1, 3, 56, 70)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ---------------------------------------------------------------------------------------- errors

def test_unknown_encoder_size_asks_for_taps(tmp_path):
    _save_original(hf_model(2), tmp_path / "depth_anything_v2_tiny.pth")
    with pytest.raises(CheckpointError, match=r"pass taps="):
        dpt_fast.load_model(tmp_path / "depth_anything_v2_tiny.pth")


@pytest.mark.parametrize("field,value,message", [
    ("depth_estimation_type", "absolute", "depth_estimation_type"),
    ("max_depth", -3, "max_depth"),
    ("fusion_hidden_size", "64", "fusion_hidden_size"),
    ("neck_hidden_sizes", [16, 24, 32], "neck_hidden_sizes"),
    ("reassemble_factors", [4, 2, 1, 1], "reassemble_factors"),
    ("backbone_config.out_indices", [1, 2, 3, 9], "out_indices"),
    ("backbone_config.apply_layernorm", False, "apply_layernorm"),
    ("backbone_config.hidden_size", 1e9, "hidden_size"),
])
def test_transformers_config_fields_are_validated(tmp_path, field, value, message):
    import json
    hf = hf_model(2)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    where = cfg
    *parents, leaf = field.split(".")
    for p in parents:
        where = where[p]
    where[leaf] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        dpt_fast.load_model(tmp_path)


def test_dpt_checkpoints_still_take_their_own_path(tmp_path):
    from model_helpers import TINY
    model = dpt_fast.DPTDepthModel(**TINY)
    torch.save(model.state_dict(), tmp_path / "dpt.pt")
    assert not daw.recognizes(tmp_path / "dpt.pt")
    assert isinstance(dpt_fast.load_model(tmp_path / "dpt.pt", backbone=TINY["backbone"], hooks=TINY["hooks"]),
                      dpt_fast.DPTDepthModel)


# ------------------------------------------------------------------------------------ input sizes

def test_any_input_size_gives_the_input_size():
    torch.manual_seed(0)
    model = DepthAnythingModel("da2-small", taps=[0, 1, 2, 3],
                               vit_kwargs=dict(embed_dim=64, depth=4, num_heads=1)).eval()
    with torch.no_grad():
        for size in ((50, 61), (13, 20), (70, 84)):
            x = torch.randn(1, 3, *size)
            out = model(x)
            assert out.shape == (1, *size)
        x = torch.randn(1, 3, 50, 61)  # resized to 56 x 56, predicted, resized back
        run = model.forward_raw(F.interpolate(x, size=(56, 56), mode="bilinear", align_corners=False))
        expected = F.interpolate(run[:, None], size=(50, 61), mode="bilinear", align_corners=False)[:, 0]
        assert torch.allclose(model(x), expected)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(3, 56, 56))


# ---------------------------------------------------------------------------------- preprocessing

def _lower_bound_restated(h, w, target=518, multiple=14):
    scale = max(target / h, target / w)
    out = []
    for side in (scale * h, scale * w):
        y = int(np.round(side / multiple) * multiple)
        out.append(y if y >= target else int(np.ceil(side / multiple) * multiple))
    return tuple(out)


@pytest.mark.parametrize("h,w", [(480, 640), (1080, 1920), (518, 518), (300, 301), (2000, 700), (7, 5)])
def test_depth_anything_resize_rule(h, w):
    got = transforms.depth_anything_target_size(h, w)
    assert got == _lower_bound_restated(h, w)
    assert min(got) >= 518 and got[0] % 14 == 0 and got[1] % 14 == 0


def test_depth_anything_preprocess_matches_restatement():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8)
    out = transforms.depth_anything_preprocess(image, size=70)
    assert out.shape == (1, 3, 70, 112)  # 60x90 -> scale 7/6 -> 70 x 105 -> nearest multiple 112
    x = F.interpolate(image[None].float() / 255, size=(70, 112), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x - mean) / std)
    assert transforms.depth_anything_preprocess(image, size=None).shape == (1, 3, 56, 84)
    with pytest.raises(ValueError, match="lower_bound"):
        transforms.depth_anything_target_size(10, 10, rule="upper")


# --------------------------------------------------------------------------------------- training

def test_a_few_training_steps_reduce_the_loss():
    """Relative: the scale-and-shift-invariant loss; gradients reach the encoder and the decoder."""
    from dpt_fast.losses import ScaleShiftInvariantLoss
    from model_helpers import randomize_
    model = DepthAnythingModel("da2-small", taps=[0, 1, 2, 3], vit_kwargs=dict(embed_dim=64, depth=4, num_heads=1))
    randomize_(model, seed=3, matrix_std=0.05)
    model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 28, 42, generator=g)
    target = torch.rand(2, 28, 42, generator=g) + 0.5
    loss_fn = ScaleShiftInvariantLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    model.zero_grad()
    model.pretrained.grad_checkpointing = True  # what dpt_fast.train sets
    loss_fn(model(x), target).backward()
    assert model.pretrained.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.depth_head.projects[0].weight.grad.abs().sum() > 0


def test_taps_must_be_four_increasing_blocks():
    with pytest.raises(ValueError, match="increasing"):
        DepthAnythingModel("da2-small", taps=[0, 1, 1, 2], vit_kwargs=dict(embed_dim=64, depth=4, num_heads=1))
    with pytest.raises(ValueError, match="increasing"):
        DepthAnythingModel("da2-small", taps=[0, 1, 2, 4], vit_kwargs=dict(embed_dim=64, depth=4, num_heads=1))
    with pytest.raises(ValueError, match="not a Depth Anything"):
        DepthAnythingModel("dpt-large")


def test_readme_depth_anything_example_runs(tmp_path, monkeypatch):
    from helpers import run_readme_example
    from model_helpers import randomize_
    model = randomize_(DepthAnythingModel("da2-small", taps=[0, 1, 2, 3],
                                          vit_kwargs=dict(embed_dim=64, depth=4, num_heads=1)), seed=0, matrix_std=0.1)
    run_readme_example("Depth Anything", model, '"depth_anything_v2_vits.pth"', tmp_path, monkeypatch, (60, 80, 3))
    disparity = np.load(tmp_path / "photo-disparity.npy")
    assert disparity.shape == (60, 80) and np.isfinite(disparity).all() and disparity.std() > 0


@pytest.mark.slow
def test_real_size_small_matches_transformers(tmp_path):
    """ViT-S at 518 x 518 (the trained grid) and 518 x 686 (a resized one): transformers' Depth Anything
    V2 small configuration, random weights."""
    version = 2
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
    backbone = Dinov2Config(hidden_size=384, num_attention_heads=6, image_size=518, patch_size=14,
                            out_indices=[9, 10, 11, 12] if version == 1 else [3, 6, 9, 12],
                            reshape_hidden_states=False)
    torch.manual_seed(0)
    hf = DepthAnythingForDepthEstimation(DepthAnythingConfig(backbone_config=backbone)).eval()
    hf.save_pretrained(tmp_path)
    model = dpt_fast.load_model(tmp_path)
    assert model.config["arch"] == f"da{version}-small"
    for size in ((518, 518), (518, 686)):
        x = torch.randn(1, 3, *size)
        expected = hf_predict(hf, x)
        assert expected.std() > 0
        with torch.no_grad():
            assert relative_error(model(x), expected) < 1e-4


def test_giant_swiglu_names_map_to_timm():
    """V2 giant (architecture public, weights never released): DINOv2's packed SwiGLU w12 / w3 are
    timm's fc1 / fc2, with the same shapes."""
    with torch.device("meta"):
        model = DepthAnythingModel("da2-giant")
    own = model.state_dict()
    original = {"pretrained.blocks.0.mlp.w12.weight": torch.empty(8192, 1536, device="meta"),
                "pretrained.blocks.0.mlp.w3.weight": torch.empty(1536, 4096, device="meta")}
    mapped = daw.original_state_dict_to_model(original)
    for key, value in mapped.items():
        assert own[key].shape == value.shape
    assert model.config["taps"] == [9, 19, 29, 39] and own["depth_head.projects.0.weight"].shape[0] == 1536


def test_a_file_that_does_not_fit_says_what_differs(tmp_path):
    state = _save_original(hf_model(2), tmp_path / "x.pth")
    state["depth_head.projects.0.weight"] = torch.zeros(8, 64, 1, 1)
    torch.save(state, tmp_path / "depth_anything_v2_bad.pth")
    with pytest.raises(CheckpointError, match=r"Depth Anything original-release checkpoint does not fit.*"
                                              r"depth_head\.resize_layers\.0\.weight"):
        dpt_fast.load_model(tmp_path / "depth_anything_v2_bad.pth", taps=[0, 1, 3, 4])
