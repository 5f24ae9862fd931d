"""Hugging Face transformers DPT checkpoints load into dpt_fast and give the same outputs.

Each test builds a randomly initialised transformers model (DPTForDepthEstimation or
DPTForSemanticSegmentation), writes it with `save_pretrained`, loads the directory with
`dpt_fast.weights.load_model` and feeds both models the same tensor (no preprocessing involved),
comparing in fp32 with relative L2 error <= 1e-4. transformers' init leaves biases, norms, the class
token and position embeddings at constants; `_randomize` perturbs them so a wrong mapping shows.
Operators run on the reference backend: this file tests weights, not kernels.
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DPTConfig, DPTForDepthEstimation, DPTForSemanticSegmentation  # noqa: E402

from dpt_fast.hf_convert import (HF_VIT_TABLE, HFConversionError, hf_config_to_model_config,  # noqa: E402
                                 hf_state_dict_to_original)
from dpt_fast.weights import CheckpointError, load_model  # noqa: E402
from helpers import relative_error  # noqa: E402
from helpers import reference_backend  # noqa: E402,F401 (autouse: operators on the reference backend)

TOL = 1e-4

# A small ViT that is also a timm model (vit_tiny_patch16_224): 192 wide, 12 layers, 3 heads.
TINY = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
            image_size=224, patch_size=16)
HYBRID = dict(is_hybrid=True, backbone_out_indices=[2, 5, 8, 11], neck_hidden_sizes=[256, 512, 768, 768],
              reassemble_factors=[1, 1, 1, 0.5])


def _randomize(model, seed=0):
    """Perturb what transformers initialises to constants (1-D tensors, cls token, position
    embeddings, BatchNorm running statistics); the matrices are already random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if t.dim() <= 1 or name.endswith(("cls_token", "position_embeddings")):
                noise = torch.randn(t.shape, generator=g) * 0.05
                if name.endswith("running_var"):
                    t.copy_(1 + noise.abs() * 4)
                else:
                    t.add_(noise)


def _center_depth_head(model, size):
    """Shift the last conv's bias so about half the depth outputs pass the final ReLU (a random
    model otherwise often predicts all zeros, which would make the comparison vacuous)."""
    seen = {}
    hook = model.head.head[4].register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    with torch.no_grad():
        model(pixel_values=torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)))
        model.head.head[4].bias.sub_(seen["out"].median())
    hook.remove()


def _save(model, path):
    model.eval()
    model.save_pretrained(path)
    return path


def _input(size, batch=2, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _compare_depth(hf, ours, x):
    with torch.no_grad():
        ref = hf(pixel_values=x).predicted_depth
        out = ours(x)
    assert out.shape == ref.shape
    assert (ref > 0).float().mean() > 0.1  # not vacuous
    return relative_error(out, ref)


@pytest.mark.parametrize("readout", ["project", "add", "ignore"])
def test_vit_depth_matches_hf(tmp_path, readout):
    torch.manual_seed(0)
    # Unsorted out indices (HF keeps them in block order) and a layer_norm_eps large enough to matter.
    config = DPTConfig(**TINY, backbone_out_indices=[11, 2, 8, 5], neck_hidden_sizes=[48] * 4,
                       fusion_hidden_size=48, readout_type=readout, layer_norm_eps=1.0)
    hf = DPTForDepthEstimation(config)
    _randomize(hf)
    _center_depth_head(hf, 64)
    ours = load_model(_save(hf, tmp_path / "hf"))
    assert not ours.training
    assert ours.config["backbone"] == "vit_tiny_patch16_224"
    assert ours.config["hooks"] == [2, 5, 8, 11] and ours.config["readout"] == readout
    assert ours.pretrained.model.blocks[0].norm1.eps == 1.0
    x = _input(64)
    assert _rel_ok(_compare_depth(hf, ours, x))
    if readout == "project":
        # The eps is honoured, and it matters: timm's default eps gives a visibly different result.
        wrong = load_model(tmp_path / "hf", layer_norm_eps=None)
        assert _compare_depth(hf, wrong, x) > 3 * TOL


def _rel_ok(err):
    assert err <= TOL, f"relative L2 error {err:.3g} > {TOL}"
    return True


def test_hybrid_depth_matches_hf(tmp_path):
    """DPT-Hybrid: HF's BiT mapped onto timm's ResNetV2. transformers' hybrid refuses inputs other than
    config.image_size (384, a guard: its position embeddings are resized to the input like ViT's);
    to stay fast on CPU the guard is lifted on the instance and both run at 64x64 (the slow test runs
    384x384 untouched)."""
    torch.manual_seed(0)
    hf = DPTForDepthEstimation(DPTConfig(**HYBRID, fusion_hidden_size=64))
    _randomize(hf)
    hf.dpt.embeddings.image_size = (64, 64)
    _center_depth_head(hf, 64)
    ours = load_model(_save(hf, tmp_path / "hf"))
    assert ours.config["backbone"] == "vitb_rn50_384" and ours.config["hooks"] == [0, 1, 8, 11]
    assert ours.fusion_width == 64 and ours.config["features"] == [256, 512, 768, 768]
    _rel_ok(_compare_depth(hf, ours, _input(64, batch=1)))


def test_segmentation_matches_hf(tmp_path):
    torch.manual_seed(0)
    config = DPTConfig(**TINY, backbone_out_indices=[2, 5, 8, 11], neck_hidden_sizes=[32, 64, 96, 192],
                       fusion_hidden_size=256, use_batch_norm_in_fusion_residual=True, num_labels=7,
                       layer_norm_eps=1e-5)
    hf = DPTForSemanticSegmentation(config)
    _randomize(hf)
    ours = load_model(_save(hf, tmp_path / "hf"))
    assert type(ours).__name__ == "DPTSegmentationModel" and ours.config["num_classes"] == 7
    assert ours.config["features"] == [32, 64, 96, 192] and ours.config["use_bn"] is True
    x = _input(64)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits  # [B, C, H, W]: HF's head ends with the x2 upsample, as ours
        out = ours(x)
    assert out.shape == ref.shape == (2, 7, 64, 64)
    _rel_ok(relative_error(out, ref))
    # The auxiliary head (training only) carries HF's weights too.
    for i in (0, 1, 4):
        for name, value in hf.auxiliary_head.head[i].state_dict().items():
            assert torch.equal(getattr(ours.auxlayer[i], name), value), f"auxlayer.{i}.{name}"


def test_pytorch_model_bin_and_no_architectures(tmp_path):
    """pytorch_model.bin (read with weights_only) and a config.json without 'architectures'
    (the head is told from the keys)."""
    torch.manual_seed(0)
    hf = DPTForDepthEstimation(DPTConfig(**TINY, neck_hidden_sizes=[32] * 4, fusion_hidden_size=32))
    _randomize(hf)
    _center_depth_head(hf, 64)
    path = _save(hf, tmp_path / "hf")
    torch.save(hf.state_dict(), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    cfg = json.loads((path / "config.json").read_text())
    del cfg["architectures"]
    (path / "config.json").write_text(json.dumps(cfg))
    ours = load_model(path)
    _rel_ok(_compare_depth(hf, ours, _input(64)))


def test_segmentation_without_auxiliary_head(tmp_path):
    torch.manual_seed(0)
    hf = DPTForSemanticSegmentation(DPTConfig(**TINY, neck_hidden_sizes=[32] * 4, fusion_hidden_size=32,
                                              use_auxiliary_head=False, num_labels=3))
    _randomize(hf)
    ours = load_model(_save(hf, tmp_path / "hf"))
    x = _input(64, batch=1)
    with torch.no_grad():
        _rel_ok(relative_error(ours(x), hf(pixel_values=x).logits))


def test_mismatched_hf_checkpoint_names_format_and_keys(tmp_path):
    torch.manual_seed(0)
    hf = DPTForDepthEstimation(DPTConfig(**TINY, neck_hidden_sizes=[32] * 4, fusion_hidden_size=32))
    path = _save(hf, tmp_path / "hf")
    from safetensors.torch import load_file, save_file
    state = load_file(str(path / "model.safetensors"))
    del state["neck.convs.2.weight"]
    state["neck.something_new.weight"] = torch.zeros(3)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    assert "Hugging Face DPT" in msg and "DPTDepthModel(backbone='vit_tiny_patch16_224'" in msg
    assert "scratch.layer3_rn.weight" in msg and "neck.something_new.weight" in msg
    assert info.value.__cause__ is None


# ----------------------------------------------------------------------------- config conversion

def _hub_config(**fields):
    """The fields of a transformers DPT config.json as on the hub (Intel/dpt-*), defaults filled."""
    cfg = DPTConfig(**fields).to_dict()
    return json.loads(json.dumps(cfg))


def test_config_intel_dpt_large():
    cfg = _hub_config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      backbone_out_indices=[5, 11, 17, 23], neck_hidden_sizes=[256, 512, 1024, 1024])
    cfg["architectures"] = ["DPTForDepthEstimation"]
    assert hf_config_to_model_config(cfg) == {
        "model_class": "DPTDepthModel", "backbone": "vitl16_384", "readout": "project",
        "features": [256, 512, 1024, 1024], "fusion_features": 256, "use_bn": False, "hooks": [5, 11, 17, 23], "layer_norm_eps": 1e-12, "non_negative": True,
        "scale": 1.0, "shift": 0.0, "invert": False}


def test_config_intel_dpt_hybrid_midas_and_large_ade():
    cfg = _hub_config(**HYBRID)
    cfg["architectures"] = ["DPTForDepthEstimation"]
    out = hf_config_to_model_config(cfg)
    assert (out["backbone"], out["hooks"], out["features"], out["fusion_features"]) == \
        ("vitb_rn50_384", [0, 1, 8, 11], [256, 512, 768, 768], 256)
    ade = _hub_config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      backbone_out_indices=[5, 11, 17, 23], neck_hidden_sizes=[256, 512, 1024, 1024],
                      use_batch_norm_in_fusion_residual=True, num_labels=150)
    ade["architectures"] = ["DPTForSemanticSegmentation"]
    out = hf_config_to_model_config(ade)
    assert out["model_class"] == "DPTSegmentationModel" and out["num_classes"] == 150 and out["use_bn"] is True


@pytest.mark.parametrize("fields, words", [
    (dict(add_projection=True), "add_projection"),
    (dict(hidden_act="gelu_new"), "hidden_act"),
    (dict(patch_size=14), "patch_size"),
    (dict(reassemble_factors=[4, 2, 1, 1]), "reassemble_factors"),
    (dict(use_batch_norm_in_fusion_residual=True, use_bias_in_fusion_residual=True), "use_bias_in_fusion"),
    (dict(backbone_out_indices=[2, 2, 8, 11]), "backbone_out_indices"),
])
def test_config_refusals(fields, words):
    cfg = _hub_config(**fields)
    cfg["architectures"] = ["DPTForDepthEstimation"]
    with pytest.raises(HFConversionError, match=words):
        hf_config_to_model_config(cfg)


def test_config_refuses_non_bit_backbone():
    cfg = _hub_config()
    cfg.update(architectures=["DPTForDepthEstimation"], backbone_config={"model_type": "dinov2"})
    with pytest.raises(HFConversionError, match="dinov2"):
        hf_config_to_model_config(cfg)


def test_qkv_concatenated_in_timm_order():
    d = 4
    sd = {f"dpt.encoder.layer.0.attention.attention.{n}.{k}": torch.full((d, d) if k == "weight" else (d,), float(i))
          for i, n in enumerate(("query", "key", "value")) for k in ("weight", "bias")}
    out, unknown = hf_state_dict_to_original(sd)
    assert not unknown
    w = out["pretrained.model.blocks.0.attn.qkv.weight"]
    assert w.shape == (3 * d, d) and [w[i * d, 0].item() for i in range(3)] == [0.0, 1.0, 2.0]


def test_vit_table_matches_timm():
    timm = pytest.importorskip("timm")
    released = {"vitb16_384": "vit_base_patch16_384", "vitl16_384": "vit_large_patch16_384"}
    for (hidden, layers, heads, inter, patch, image), name in HF_VIT_TABLE.items():
        with torch.device("meta"):
            vit = timm.create_model(released.get(name, name))
        block = vit.blocks[0]
        assert (vit.embed_dim, len(vit.blocks), block.attn.num_heads, block.mlp.fc1.out_features) == \
            (hidden, layers, heads, inter), name
        assert vit.patch_embed.patch_size == (patch, patch) and vit.patch_embed.img_size == (image, image), name
        assert vit.num_prefix_tokens == 1 and not vit.no_embed_class, name


# ------------------------------------------------------------------------------------ real size

@pytest.mark.slow
def test_real_size_dpt_large_matches_hf(tmp_path):
    """Intel/dpt-large's config (random init) at 384x384."""
    torch.manual_seed(0)
    config = DPTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       backbone_out_indices=[5, 11, 17, 23], neck_hidden_sizes=[256, 512, 1024, 1024])
    hf = DPTForDepthEstimation(config)
    _randomize(hf)
    _center_depth_head(hf, 64)
    ours = load_model(_save(hf, tmp_path / "hf"))
    assert ours.config["backbone"] == "vitl16_384"
    _rel_ok(_compare_depth(hf, ours, _input(384, batch=1)))


@pytest.mark.slow
def test_real_size_hybrid_matches_hf_at_384(tmp_path):
    """Intel/dpt-hybrid-midas's config (random init) at its native 384x384, no guard lifted."""
    torch.manual_seed(0)
    hf = DPTForDepthEstimation(DPTConfig(**HYBRID))
    _randomize(hf)
    _center_depth_head(hf, 384)
    ours = load_model(_save(hf, tmp_path / "hf"))
    _rel_ok(_compare_depth(hf, ours, _input(384, batch=1)))


def test_vit_of_no_timm_size_and_own_fusion_width_match_hf(tmp_path):
    """A ViT size timm has no name for (built from HF's dimensions) with Reassemble widths and a fusion
    width of its own."""
    torch.manual_seed(3)
    config = DPTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=96,
                       image_size=64, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 24, 32, 40],
                       fusion_hidden_size=24)
    hf = DPTForDepthEstimation(config)
    _randomize(hf)
    _center_depth_head(hf, 64)
    ours = load_model(_save(hf, tmp_path / "hf"))
    assert ours.config["vit_kwargs"]["embed_dim"] == 64 and ours.fusion_width == 24
    _rel_ok(_compare_depth(hf, ours, _input(64)))


# ------------------------------------------------------------------ shards, the hub cache, allocation

def test_sharded_folder_and_hub_cache_links_load(tmp_path):
    """A folder saved in shards loads; so does the same folder laid out as huggingface_hub's cache
    (snapshots/<revision>/ whose files are links into ../../blobs/), while a shard linking anywhere
    else is refused."""
    torch.manual_seed(0)
    hf = DPTForDepthEstimation(DPTConfig(**TINY, neck_hidden_sizes=[32] * 4, fusion_hidden_size=32))
    _randomize(hf)
    _center_depth_head(hf, 64)
    hf.eval()
    path = tmp_path / "sharded"
    hf.save_pretrained(path, max_shard_size="1MB")
    assert (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").exists()
    _rel_ok(_compare_depth(hf, load_model(path), _input(64)))

    repo = tmp_path / "models--someone--dpt"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted(path.iterdir())):
        file.rename(blobs / f"blob{i}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob{i}")
    _rel_ok(_compare_depth(hf, load_model(snapshot), _input(64)))

    shard = next(p for p in snapshot.iterdir() if p.name.startswith("model-0"))
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match="leads outside the model folder"):
        load_model(snapshot)


def test_config_not_matching_weights_is_refused_before_any_allocation(tmp_path, meta_only_builds):
    """A segmentation folder without an auxiliary head (whose filling needs a built model) and a
    config.json wider than its weights: refused on the meta device, never built in memory."""
    torch.manual_seed(0)
    hf = DPTForSemanticSegmentation(DPTConfig(**TINY, neck_hidden_sizes=[32] * 4, fusion_hidden_size=32,
                                              use_auxiliary_head=False, num_labels=3))
    path = _save(hf, tmp_path / "hf")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fusion_hidden_size=4096, neck_hidden_sizes=[4096] * 4)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not fit the model .*the model has .* values, the file"):
        load_model(path)
    assert meta_only_builds == ["meta"]
