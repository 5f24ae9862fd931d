"""The DPT models against an independent re-statement of the original release's forward pass."""
import threading

import pytest
import torch
import torch.nn.functional as F

from dpt_fast import DPTDepthModel, DPTSegmentationModel, backend, build_model, use_backend
from helpers import relative_error
from model_helpers import TINY
from model_helpers import randomize_ as _randomize_


def _block_as_original(block, x):
    """timm 0.4.5's Block/Attention, written out: x + attn(norm1(x)), x + mlp(norm2(x))."""
    b, n, c = x.shape
    attn = block.attn
    h = block.norm1(x)
    q, k, v = F.linear(h, attn.qkv.weight, attn.qkv.bias).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)
    h = F.linear((weights @ v).transpose(1, 2).reshape(b, n, c), attn.proj.weight, attn.proj.bias)
    x = x + h
    return x + block.mlp(block.norm2(x))


def _stage_as_original(stage, tokens, gh, gw):
    x = tokens[:, 1:]
    if stage.readout == "project":
        x = stage._modules["0"].project(torch.cat((x, tokens[:, 0].unsqueeze(1).expand_as(x)), -1))
    elif stage.readout == "add":
        x = x + tokens[:, 0].unsqueeze(1)
    x = x.transpose(1, 2).unflatten(2, (gh, gw))
    x = stage._modules["3"](x)
    return stage._modules["4"](x) if "4" in stage._modules else x


def _rcu_as_original(rcu, x):
    out = rcu.conv1(F.relu(x))
    if rcu.use_bn:
        out = rcu.bn1(out)
    out = rcu.conv2(F.relu(out))
    if rcu.use_bn:
        out = rcu.bn2(out)
    return out + x


def _fusion_as_original(block, *xs):
    out = xs[0]
    if len(xs) == 2:
        out = out + _rcu_as_original(block.resConfUnit1, xs[1])
    out = _rcu_as_original(block.resConfUnit2, out)
    out = F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)
    return block.out_conv(out)


def original_forward(model, x):
    """The original release's forward_vit + DPT.forward, restated from its facts (ARCHITECTURE.md §3)."""
    bb = model.pretrained
    vit = bb.model
    h, w = x.shape[-2:]
    gh, gw = h // 16, w // 16
    pos = vit.pos_embed
    old = int(pos.shape[1] - 1) ** 0.5
    grid = pos[0, 1:].reshape(1, int(old), int(old), -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bilinear").permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
    pos = torch.cat([pos[:, :1], grid], 1)
    maps = []
    if bb.hybrid:
        y = vit.patch_embed.backbone.stem(x)
        for stage in vit.patch_embed.backbone.stages:
            y = stage(y)
            maps.append(y)
        tokens = vit.patch_embed.proj(y).flatten(2).transpose(1, 2)
    else:
        tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), tokens), 1) + pos
    taps = {}
    for i, block in enumerate(vit.blocks):
        tokens = _block_as_original(block, tokens)
        taps[i] = tokens
    layers = []
    for i, hook in enumerate(bb.hooks):
        if bb.hybrid and i < 2:
            layers.append(maps[hook])
        else:
            layers.append(_stage_as_original(getattr(bb, f"act_postprocess{i + 1}"), taps[hook], gh, gw))
    s = model.scratch
    rn = [s.layer1_rn(layers[0]), s.layer2_rn(layers[1]), s.layer3_rn(layers[2]), s.layer4_rn(layers[3])]
    path = _fusion_as_original(s.refinenet4, rn[3])
    path = _fusion_as_original(s.refinenet3, path, rn[2])
    path = _fusion_as_original(s.refinenet2, path, rn[1])
    path = _fusion_as_original(s.refinenet1, path, rn[0])
    return s.output_conv(path)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_tiny_depth_model_matches_the_original_forward(backend):
    model = _randomize_(DPTDepthModel(**TINY)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad(), use_backend(backend):
        out = model(x)
        expected = original_forward(model, x).squeeze(1)
    assert out.shape == (2, 64, 96)
    assert relative_error(out, expected) < 1e-5


def test_hybrid_depth_model_matches_the_original_forward():
    model = _randomize_(DPTDepthModel(backbone="vitb_rn50_384", non_negative=False), seed=1).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(model(x), original_forward(model, x).squeeze(1)) < 1e-5


def test_segmentation_model_with_batch_norm_matches_the_original_forward_and_trains_with_aux():
    model = _randomize_(DPTSegmentationModel(5, **TINY), seed=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        assert relative_error(logits, original_forward(model, x)) < 1e-5
    model.train()
    logits, aux = model(x)
    assert logits.shape == (2, 5, 64, 64) and aux.shape == (2, 5, 32, 32)
    (logits.mean() + aux.mean()).backward()
    assert model.auxlayer[0].weight.grad is not None and model.pretrained.model.blocks[0].attn.qkv.weight.grad is not None


def test_released_backbones_have_the_original_widths():
    large = DPTDepthModel(backbone="vitl16_384")
    sd = large.state_dict()
    assert sd["pretrained.act_postprocess1.0.project.0.weight"].shape == (1024, 2048)
    assert sd["pretrained.act_postprocess1.4.weight"].shape == (256, 256, 4, 4)
    assert sd["pretrained.act_postprocess2.4.weight"].shape == (512, 512, 2, 2)
    assert "pretrained.act_postprocess3.4.weight" not in sd
    assert sd["pretrained.act_postprocess4.4.weight"].shape == (1024, 1024, 3, 3)
    assert sd["scratch.layer4_rn.weight"].shape == (256, 1024, 3, 3)
    assert sd["scratch.output_conv.4.weight"].shape == (1, 32, 1, 1)
    assert "pretrained.model.head.weight" in sd
    hybrid = DPTDepthModel(backbone="vitb_rn50_384").state_dict()
    assert not any(k.startswith(("pretrained.act_postprocess1", "pretrained.act_postprocess2")) for k in hybrid)
    assert hybrid["scratch.layer1_rn.weight"].shape == (256, 256, 3, 3)
    assert hybrid["scratch.layer2_rn.weight"].shape == (256, 512, 3, 3)
    assert hybrid["scratch.layer3_rn.weight"].shape == (256, 768, 3, 3)
    assert hybrid["pretrained.model.patch_embed.proj.weight"].shape == (768, 1024, 1, 1)


@pytest.mark.parametrize("size", [(70, 81), (33, 200), (17, 16)])
def test_any_input_size_gives_an_output_of_that_size(size):
    model = _randomize_(DPTDepthModel(**TINY)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, *size) and torch.isfinite(out).all()


def test_padding_preserves_multiples_of_32_exactly():
    model = _randomize_(DPTDepthModel(**TINY)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        padded = model(F.pad(x, (0, 20, 0, 12), mode="replicate"))  # 76x84 -> padded to 96x96 inside
    assert out.shape == (1, 64, 64) and padded.shape == (1, 76, 84)


@pytest.mark.parametrize("bad,match", [
    (torch.randn(3, 64, 64), "4-D"),
    (torch.randn(1, 4, 64, 64), "3 channels"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "floating-point"),
    (torch.randn(0, 3, 64, 64), "non-empty"),
    ("meta", "model is on"),
])
def test_bad_input_raises_a_clear_value_error(bad, match):
    model = DPTDepthModel(**TINY).eval()
    if isinstance(bad, str):
        bad = torch.randn(1, 3, 64, 64, device="meta")
    with pytest.raises(ValueError, match=match):
        model(bad)


def test_two_models_in_two_threads_do_not_share_state():
    """Two models, each run repeatedly in its own thread at the same time, give what each gives alone.
    (The Triton interpreter itself is not thread-safe, so under it the threads use the reference ops;
    the models hold no per-call state either way: taps are locals of forward.)"""
    backend_name = "reference" if backend.triton_interpreting() else "fused"
    models = [_randomize_(DPTDepthModel(**TINY), seed=s).eval() for s in (3, 4)]
    inputs = [torch.randn(1, 3, 64, 64), torch.randn(1, 3, 96, 64)]
    with torch.no_grad(), use_backend(backend_name):
        expected = [m(x) for m, x in zip(models, inputs)]
    results, errors = {0: [], 1: []}, []
    start = threading.Barrier(2)

    def run(i):
        try:
            start.wait()
            with torch.no_grad(), use_backend(backend_name):
                for _ in range(3):
                    results[i].append(models[i](inputs[i]))
        except Exception as exc:  # noqa: BLE001 -- reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert len(results[i]) == 3
        for out in results[i]:
            torch.testing.assert_close(out, expected[i], rtol=0, atol=0)


def test_build_model_round_trips_the_config():
    model = DPTSegmentationModel(7, **TINY)
    clone = build_model(model.config)
    assert type(clone) is DPTSegmentationModel and clone.config == model.config
    assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_invert_applies_scale_shift_and_clamp():
    base = _randomize_(DPTDepthModel(**TINY)).eval()
    inverted = DPTDepthModel(**TINY, scale=0.000305, shift=0.1378, invert=True).eval()
    inverted.load_state_dict(base.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        inv = base(x)
        depth = inverted(x)
    torch.testing.assert_close(depth, 1.0 / torch.clamp(0.000305 * inv + 0.1378, min=1e-8))
