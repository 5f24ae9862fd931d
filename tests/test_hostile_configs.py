"""Files from strangers, tried as an attacker would: configs that would make timm read a pickle, values
of the wrong type or absurd size, sharded indexes that point outside the model folder. Each must end
in one CheckpointError (a clear one-line message) with nothing executed and nothing large allocated.

The models are tiny ViTs (4 blocks of width 32); no test needs transformers.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from dpt_fast import DPTDepthModel
from dpt_fast.config_validation import VIT_KWARGS, validate_model_config
from dpt_fast.hf_convert import HFConversionError, hf_config_to_model_config
from dpt_fast.weights import CheckpointError, load_model, save_model
from helpers import reference_backend  # noqa: F401 (autouse: operators on the reference backend)

VIT = dict(embed_dim=32, depth=4, num_heads=2, img_size=64)
TINY = dict(backbone="vit_base_patch16_384", hooks=[0, 1, 2, 3], features=16, vit_kwargs=VIT)


class _Payload:
    """Unpickling it creates `marker` (a stand-in for any code an attacker would run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload_file(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _Payload(marker)}, path)
    return path, marker


@pytest.fixture
def unsafe_timm(monkeypatch):
    """timm as versions that unpickle checkpoint_path with weights_only=False behave: if a config ever
    reaches timm with a checkpoint_path, the payload runs."""
    import timm.models._factory as factory

    def load_checkpoint(model, checkpoint_path, *args, **kwargs):
        torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        raise RuntimeError("unpickled the attacker's file")

    monkeypatch.setattr(factory, "load_checkpoint", load_checkpoint)


def _saved_tiny(tmp_path):
    torch.manual_seed(0)
    return save_model(DPTDepthModel(**TINY), tmp_path / "model")


def _edit_config(folder, edit):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    edit(data["config"])
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------ item 1: no code through a config

def test_saved_folder_with_checkpoint_path_runs_nothing(tmp_path, unsafe_timm):
    folder = _saved_tiny(tmp_path)
    evil, marker = _payload_file(tmp_path)
    _edit_config(folder, lambda c: c["vit_kwargs"].update(checkpoint_path=str(evil)))
    with pytest.raises(CheckpointError, match="checkpoint_path.*not allowed.*allowed: .*embed_dim") as info:
        load_model(folder)
    assert not marker.exists()
    assert "\n" not in str(info.value) and info.value.__cause__ is None


def test_training_checkpoint_with_checkpoint_path_runs_nothing(tmp_path, unsafe_timm):
    torch.manual_seed(0)
    model = DPTDepthModel(**TINY)
    evil, marker = _payload_file(tmp_path)
    config = dict(model.config, vit_kwargs=dict(VIT, checkpoint_path=str(evil)))
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "dpt_fast.train/1", "model": model.state_dict(), "config": config}, path)
    with pytest.raises(CheckpointError, match="checkpoint_path"):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("extra", [
    {"checkpoint_path": "x.pth"}, {"pretrained": True}, {"pretrained_cfg_overlay": {"file": "x.pth"}},
    {"pretrained_cfg": {"file": "x.pth"}}, {"cache_dir": "/tmp"}, {"class_token": False},
])
def test_constructing_with_timm_loading_arguments_is_refused(extra, unsafe_timm):
    """The same allow-list guards every construction (train's --resume/--init build from a recorded config)."""
    with pytest.raises(ValueError, match=f"{next(iter(extra))}.*not allowed"):
        DPTDepthModel(**dict(TINY, vit_kwargs=dict(VIT, **extra)))


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(path="/etc/passwd"), "'path' is not allowed"),
    (lambda c: c.update(surprise=1), "'surprise' is not allowed.*allowed: backbone"),
    (lambda c: c.update(model_class="os.system"), "model_class"),
    (lambda c: c.update(backbone="hf-hub:attacker/model"), "unknown backbone"),
    (lambda c: c.update(backbone="vit_base_patch16_384.augreg_in21k"), "unknown backbone"),
    (lambda c: c.update(backbone="resnet50"), "unknown backbone"),
    (lambda c: c.update(backbone=["vit_base_patch16_384"]), "backbone must be"),
    (lambda c: c.update(features="16"), "features must be"),
    (lambda c: c.update(features=10 ** 9), "features must be"),
    (lambda c: c.update(features=[16, 16, 16]), "features must be"),
    (lambda c: c.update(fusion_features=0), "fusion_features=0 is out of range"),
    (lambda c: c.update(hooks=[0, 1]), "hooks must be a list of 4"),
    (lambda c: c.update(hooks=[0, 0, 1, 2]), "distinct"),
    (lambda c: c.update(hooks=[0, 1, 2, 7]), "reach past"),
    (lambda c: c.update(hooks=[True, 1, 2, 3]), "hooks\\[0\\] must be an integer"),
    (lambda c: c.update(readout="exec"), "readout"),
    (lambda c: c.update(use_bn="yes"), "use_bn must be true or false"),
    (lambda c: c.update(layer_norm_eps=0), "layer_norm_eps"),
    (lambda c: c.update(scale=math.nan), "scale.*finite"),
    (lambda c: c.update(invert=1), "invert must be true or false"),
    (lambda c: c.update(vit_kwargs="embed_dim=32"), "vit_kwargs must be an object"),
    (lambda c: c["vit_kwargs"].update(depth=10 ** 6), "vit_kwargs.depth=1000000 is out of range"),
    (lambda c: c["vit_kwargs"].update(embed_dim=33), "not a multiple of num_heads"),
    (lambda c: c["vit_kwargs"].update(mlp_ratio=-1), "mlp_ratio"),
    (lambda c: c["vit_kwargs"].update(img_size=[64, "a"]), "img_size"),
])
def test_hostile_saved_config_values_are_refused(tmp_path, edit, words):
    folder = _saved_tiny(tmp_path)
    _edit_config(folder, edit)
    with pytest.raises(CheckpointError, match=words) as info:
        load_model(folder)
    assert "\n" not in str(info.value)


def test_every_recorded_config_key_is_allowed():
    """What the models record in .config is exactly what the allow-list accepts (a saved model reloads)."""
    model = DPTDepthModel(**TINY)
    assert validate_model_config(model.config) == model.config
    assert set(VIT) <= set(VIT_KWARGS)


def test_segmentation_class_count_checked(tmp_path):
    from dpt_fast import DPTSegmentationModel
    torch.manual_seed(0)
    folder = save_model(DPTSegmentationModel(3, **TINY), tmp_path / "seg")
    for bad, words in ((0, "num_classes=0 is out of range"), (True, "num_classes must be an integer"),
                       (10 ** 12, "out of range")):
        _edit_config(folder, lambda c, bad=bad: c.update(num_classes=bad))
        with pytest.raises(CheckpointError, match=words):
            load_model(folder)
    _edit_config(folder, lambda c: c.pop("num_classes"))
    with pytest.raises(CheckpointError, match="needs num_classes"):
        load_model(folder)


# ------------------------------------------------- item 6: Hugging Face configs, sizes before allocation

def _hf_config(**fields):
    cfg = {"model_type": "dpt", "architectures": ["DPTForDepthEstimation"], "hidden_size": 32,
           "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64, "image_size": 64,
           "patch_size": 16, "backbone_out_indices": [0, 1, 2, 3], "neck_hidden_sizes": [16, 16, 16, 16],
           "fusion_hidden_size": 16, "readout_type": "project", "reassemble_factors": [4, 2, 1, 0.5]}
    cfg.update(fields)
    return cfg


def _hf_folder(tmp_path, cfg, tensors=None):
    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(tensors or {"dpt.embeddings.cls_token": torch.zeros(1, 1, 32)}, str(folder / "model.safetensors"))
    return folder


def test_plain_hf_config_is_accepted():
    config = hf_config_to_model_config(_hf_config())
    assert config["vit_kwargs"] == {"embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0, "img_size": 64}


@pytest.mark.parametrize("fields, words", [
    ({"hidden_size": None}, "hidden_size must be an integer, got null"),
    ({"hidden_size": "32"}, "hidden_size must be an integer"),
    ({"hidden_size": 32.0}, "hidden_size must be an integer"),
    ({"hidden_size": 10 ** 9}, "hidden_size=1000000000 is out of range"),
    ({"num_attention_heads": 0}, "num_attention_heads=0 is out of range"),
    ({"num_attention_heads": 3}, "not a multiple of num_attention_heads"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
    ({"num_hidden_layers": 10 ** 6}, "num_hidden_layers"),
    ({"intermediate_size": 10 ** 12}, "intermediate_size"),
    ({"patch_size": None}, "patch_size"),
    ({"patch_size": 0}, "patch_size"),
    ({"image_size": [64, "a"]}, "image_size"),
    ({"image_size": 10 ** 7}, "image_size"),
    ({"backbone_out_indices": None}, "backbone_out_indices must be a list of 4"),
    ({"backbone_out_indices": ["a", 1, 2, 3]}, "backbone_out_indices\\[0\\] must be an integer"),
    ({"neck_hidden_sizes": [0, 16, 16, 16]}, "neck_hidden_sizes\\[0\\]=0 is out of range"),
    ({"neck_hidden_sizes": None}, "neck_hidden_sizes"),
    ({"fusion_hidden_size": -1}, "fusion_hidden_size"),
    ({"fusion_hidden_size": 10 ** 9}, "fusion_hidden_size"),
    ({"is_hybrid": "false"}, "is_hybrid must be true or false"),
    ({"qkv_bias": "no"}, "qkv_bias must be true or false"),
    ({"layer_norm_eps": "x"}, "layer_norm_eps must be a number"),
    ({"layer_norm_eps": -1}, "layer_norm_eps"),
    ({"reassemble_factors": None}, "reassemble_factors"),
    ({"reassemble_factors": [4, 2, 0, 0.5]}, "reassemble_factors"),
    ({"backbone_config": "bit"}, "backbone_config must be an object"),
    ({"architectures": "DPTForDepthEstimation"}, "architectures must be a list"),
    ({"architectures": ["DPTForSemanticSegmentation"], "num_labels": 0}, "num_labels=0 is out of range"),
    ({"architectures": ["DPTForSemanticSegmentation"], "id2label": [1, 2]}, "id2label must be an object"),
    ({"use_bias_in_fusion_residual": "yes"}, "use_bias_in_fusion_residual"),
])
def test_malformed_hf_config_gives_one_clear_error(tmp_path, fields, words):
    with pytest.raises(HFConversionError, match=words):
        hf_config_to_model_config(_hf_config(**fields))
    with pytest.raises(CheckpointError, match=words) as info:
        load_model(_hf_folder(tmp_path, _hf_config(**fields)))
    assert "\n" not in str(info.value) and info.value.__cause__ is None


@pytest.mark.parametrize("aux", [True, False])
def test_huge_hf_config_is_refused_before_allocation(tmp_path, meta_only_builds, aux):
    """In-range but enormous sizes (~1e11 parameters) over a file of a few values: refused by comparing
    with the file on the meta device, with both sizes named; never built in memory (without an
    auxiliary head the old loader built on the CPU directly)."""
    cfg = _hf_config(hidden_size=8192, num_hidden_layers=128, num_attention_heads=64, intermediate_size=65536,
                     neck_hidden_sizes=[8192] * 4, fusion_hidden_size=8192, image_size=4096,
                     architectures=["DPTForSemanticSegmentation"], num_labels=150, use_auxiliary_head=aux)
    with pytest.raises(CheckpointError, match=r"does not fit the model .*the model has \S+G values, the file 32\)"):
        load_model(_hf_folder(tmp_path, cfg))
    assert meta_only_builds and set(meta_only_builds) == {"meta"}


# ----------------------------------------------------------------- item 6: sharded indexes stay inside

def _sharded_folder(tmp_path, weight_map, index_name="model.safetensors.index.json"):
    folder = _hf_folder(tmp_path, _hf_config())
    (folder / "model.safetensors").unlink()
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_index_naming_files_outside_the_folder_is_refused(tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_file({"dpt.embeddings.cls_token": torch.zeros(1, 1, 32)}, str(outside))
    for name in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors", "./x.safetensors",
                 "C:\\outside.safetensors", ""):
        folder = _sharded_folder(tmp_path, {"dpt.embeddings.cls_token": name})
        with pytest.raises(CheckpointError, match="not a plain path inside the model folder|not a file name"):
            load_model(folder)


def test_index_shard_linking_outside_the_folder_is_refused(tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_file({"dpt.embeddings.cls_token": torch.zeros(1, 1, 32)}, str(outside))
    folder = _sharded_folder(tmp_path, {"dpt.embeddings.cls_token": "model-00001-of-00001.safetensors"})
    (folder / "model-00001-of-00001.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="leads outside the model folder"):
        load_model(folder)


def test_pickle_index_outside_the_folder_runs_nothing(tmp_path):
    evil, marker = _payload_file(tmp_path)
    folder = _sharded_folder(tmp_path, {"dpt.embeddings.cls_token": "../evil.pth"},
                             index_name="pytorch_model.bin.index.json")
    with pytest.raises(CheckpointError, match="not a plain path inside the model folder"):
        load_model(folder)
    assert not marker.exists()


def test_fifo_or_linked_weights_do_not_block(tmp_path):
    folder = _sharded_folder(tmp_path, {"dpt.embeddings.cls_token": "shard.safetensors"})
    os.mkfifo(folder / "shard.safetensors")  # reading it would block forever
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_model(folder)
    (tmp_path / "b").mkdir()
    plain = _hf_folder(tmp_path / "b", _hf_config())
    (plain / "model.safetensors").unlink()
    (plain / "model.safetensors").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="leads outside the model folder"):
        load_model(plain)
    (plain / "model.safetensors").unlink()
    (plain / "loop").symlink_to("model.safetensors")
    (plain / "model.safetensors").symlink_to("loop")
    with pytest.raises(CheckpointError, match="cannot be resolved"):
        load_model(plain)


def test_index_that_is_not_a_weight_map_is_refused(tmp_path):
    for weight_map in ([], {"a": 1}, None):
        folder = _sharded_folder(tmp_path, weight_map)
        with pytest.raises(CheckpointError, match="weight_map|not a file name"):
            load_model(folder)


def test_saved_folder_weights_linking_outside_are_refused(tmp_path):
    folder = _saved_tiny(tmp_path)
    moved = tmp_path / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(moved)
    (folder / "model.safetensors").symlink_to(moved)
    with pytest.raises(CheckpointError, match="leads outside the model folder"):
        load_model(folder)


def test_depth_anything_construction_uses_the_same_allow_list(tmp_path, unsafe_timm):
    from dpt_fast.models import DepthAnythingModel
    evil, marker = _payload_file(tmp_path)
    with pytest.raises(ValueError, match="checkpoint_path.*not allowed"):
        DepthAnythingModel("da2-small", taps=[0, 1, 2, 3],
                           vit_kwargs=dict(embed_dim=64, depth=4, num_heads=1, checkpoint_path=str(evil)))
    assert not marker.exists()


def test_saved_depth_anything_config_is_checked(tmp_path):
    from dpt_fast.models import DepthAnythingModel
    torch.manual_seed(0)
    model = DepthAnythingModel("da2-small", taps=[0, 1, 2, 3], vit_kwargs=dict(embed_dim=64, depth=4, num_heads=1))
    folder = save_model(model, tmp_path / "da")
    assert load_model(folder).config == model.config
    original = (folder / "config.json").read_text()
    for edit, words in ((lambda c: c.update(arch="../../etc"), "Depth Anything architecture"),
                        (lambda c: c.update(max_depth=-1), "max_depth"),
                        (lambda c: c.update(taps=[0, 1, 2]), "taps must be a list of 4")):
        (folder / "config.json").write_text(original)
        _edit_config(folder, edit)
        with pytest.raises(CheckpointError, match=words):
            load_model(folder)



def test_build_model_checks_recorded_configs():
    """build_model rebuilds from a recorded config (train's --resume and --init read them from
    checkpoint.pt): the same allow-list applies."""
    from dpt_fast import DPTSegmentationModel, build_model
    from dpt_fast.config_validation import ConfigError
    depth = dict(DPTDepthModel(**TINY).config)
    with pytest.raises(ConfigError, match="'surprise' is not allowed"):
        build_model(dict(depth, surprise=1))
    segmentation = dict(DPTSegmentationModel(3, **TINY).config)
    with pytest.raises(ConfigError, match="num_classes must be an integer"):
        build_model(dict(segmentation, num_classes=True))
    assert build_model(depth).config == depth and build_model(segmentation).config == segmentation


def test_checkpoint_path_that_is_a_fifo_does_not_block(tmp_path):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_model(fifo)
