"""dpt_fast.specs is the one table of architecture facts: adding a DPT backbone is adding one entry,
and every layer (model, checkpoint inference, Hugging Face conversion, config validation) knows it."""
from __future__ import annotations

import pytest
import torch

from dpt_fast import specs
from dpt_fast.checkpoints import infer_original_config
from dpt_fast.config_validation import validate_model_config
from dpt_fast.hf_convert import hf_config_to_model_config, hf_dpt_config
from dpt_fast.models import RELEASED_BACKBONES, DPTDepthModel, build_model

TINY = specs.ArchitectureSpec(
    name="dpt-tiny-test", family="dpt", encoder="vit_tiny_patch16_224", embed_dim=192, depth=12, num_heads=3,
    patch_size=16, input_multiple=32, taps=(1, 3, 6, 11), reassemble_widths=(24, 48, 96, 192), features=32,
    readout="project", taps_normed=False, pos_embed_rule="bilinear", fusion_upsampling="x2", head="dpt_depth",
    preprocessing=specs.DPT_PREPROCESSING, dpt_backbone="vitt16_test", encoder_image_size=224)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(specs, "ARCHITECTURES", dict(specs.ARCHITECTURES))
    return specs.register(TINY)


def test_released_backbones_are_the_table_entries():
    assert set(RELEASED_BACKBONES) == {"vitb16_384", "vitl16_384", "vitb_rn50_384"}
    for name, backbone in RELEASED_BACKBONES.items():
        arch = specs.dpt_backbone(name)
        assert (backbone.timm_name, backbone.hooks, backbone.reassemble_features, backbone.hybrid) == (
            arch.encoder, arch.taps, arch.reassemble_widths, arch.hybrid)
    assert specs.get("dpt-hybrid").stage_widths == (256, 512, 768, 768)
    assert specs.get("dpt-large").position_tokens == 577 and specs.get("da2-small").position_tokens == 1370


def test_a_registered_entry_is_a_dpt_backbone_everywhere(registered):
    assert "vitt16_test" in RELEASED_BACKBONES
    torch.manual_seed(0)
    model = DPTDepthModel(backbone="vitt16_test", features=32).eval()
    assert model.pretrained.hooks == TINY.taps
    assert [getattr(model.scratch, f"layer{i}_rn").in_channels for i in range(1, 5)] == list(TINY.reassemble_widths)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 72)).shape == (1, 40, 72)

    # an original-layout state dict of it is recognised by its dimensions (no backbone= or hooks= needed)
    config = infer_original_config(model.state_dict())
    assert config["backbone"] == "vitt16_test" and config["features"] == 32
    # a config naming it needs no hooks
    assert validate_model_config({"model_class": "DPTDepthModel", "backbone": "vitt16_test"})["backbone"] == \
        "vitt16_test"
    assert isinstance(build_model(dict(config)), DPTDepthModel)
    # a transformers DPTConfig of its dimensions converts to it
    hf = {"model_type": "dpt", "architectures": ["DPTForDepthEstimation"], "hidden_size": 192,
          "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768, "patch_size": 16,
          "image_size": 224, "backbone_out_indices": [1, 3, 6, 11], "neck_hidden_sizes": [24, 48, 96, 192],
          "fusion_hidden_size": 32}
    assert hf_config_to_model_config(hf)["backbone"] == "vitt16_test"


def test_register_refuses_a_taken_name_and_bad_fields(registered):
    with pytest.raises(ValueError, match="already"):
        specs.register(TINY)
    with pytest.raises(ValueError, match="fusion_upsampling"):
        specs.register(specs.with_overrides(TINY, name="other", dpt_backbone="other", fusion_upsampling="x3"))
    with pytest.raises(ValueError, match="taps"):
        specs.register(specs.with_overrides(TINY, name="other", dpt_backbone="other", taps=(1, 2, 3, 12)))


def test_without_the_entry_the_name_is_unknown():
    with pytest.raises(ValueError, match="vitt16_test"):
        DPTDepthModel(backbone="vitt16_test")


@pytest.mark.parametrize("name", ["vitb16_384", "vitl16_384", "vitb_rn50_384"])
def test_transformers_config_of_an_entry_converts_back_to_it(name):
    arch = specs.dpt_backbone(name)
    hf = {"model_type": "dpt", "architectures": ["DPTForDepthEstimation"], **hf_dpt_config(arch)}
    config = hf_config_to_model_config(hf)
    assert (config["backbone"], config["hooks"], config["fusion_features"]) == (name, list(arch.taps), arch.features)
    assert config["features"] == list(arch.reassemble_widths) and config["readout"] == arch.readout
