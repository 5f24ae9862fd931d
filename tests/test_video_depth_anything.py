"""Video Depth Anything: the release's key layout, strict loading, and fp32 parity with a restatement of
the published forward (its temporal modules written out here as plain tensor operations)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dpt_fast
from dpt_fast.models.video_depth_anything import VideoDepthAnythingModel, window_predictor
from dpt_fast.video.windows import INFER_LEN, windowed_video_depth

from helpers import one_thread  # noqa: F401 (autouse: one intra-op thread, many tiny calls)
from helpers import reference_backend  # noqa: F401 (autouse: the model, not the kernels, is under test)
from model_helpers import randomize_

TINY_VDA = dict(encoder="vits", taps=[0, 1, 2, 3], features=32, out_channels=[32, 32, 64, 64],
                vit_kwargs=dict(embed_dim=64, depth=4, num_heads=1))


@pytest.fixture(scope="module")
def tiny():
    with dpt_fast.use_backend("reference"):
        return randomize_(VideoDepthAnythingModel(**TINY_VDA), seed=1, matrix_std=0.1).eval()


def motion_module_keys(prefix, channels, frames=32):
    """The release's keys and shapes of one motion module (AnimateDiff-style, one block, two attentions)."""
    keys = {f"{prefix}.temporal_transformer.norm.weight": (channels,),
            f"{prefix}.temporal_transformer.norm.bias": (channels,),
            f"{prefix}.temporal_transformer.proj_in.weight": (channels, channels),
            f"{prefix}.temporal_transformer.proj_in.bias": (channels,),
            f"{prefix}.temporal_transformer.proj_out.weight": (channels, channels),
            f"{prefix}.temporal_transformer.proj_out.bias": (channels,)}
    block = f"{prefix}.temporal_transformer.transformer_blocks.0"
    for a in range(2):
        for name in ("to_q", "to_k", "to_v"):
            keys[f"{block}.attention_blocks.{a}.{name}.weight"] = (channels, channels)
        keys[f"{block}.attention_blocks.{a}.to_out.0.weight"] = (channels, channels)
        keys[f"{block}.attention_blocks.{a}.to_out.0.bias"] = (channels,)
        keys[f"{block}.attention_blocks.{a}.pos_encoder.pe"] = (1, frames, channels)
        keys[f"{block}.norms.{a}.weight"] = (channels,)
        keys[f"{block}.norms.{a}.bias"] = (channels,)
    keys[f"{block}.ff.net.0.proj.weight"] = (8 * channels, channels)
    keys[f"{block}.ff.net.0.proj.bias"] = (8 * channels,)
    keys[f"{block}.ff.net.2.weight"] = (channels, 4 * channels)
    keys[f"{block}.ff.net.2.bias"] = (channels,)
    keys[f"{block}.ff_norm.weight"] = (channels,)
    keys[f"{block}.ff_norm.bias"] = (channels,)
    return keys


@pytest.mark.parametrize("encoder,widths,features", [("vits", (48, 96, 192, 384), 64),
                                                     ("vitb", (96, 192, 384, 768), 128)])
def test_keys_are_the_release_layout(encoder, widths, features):
    with torch.device("meta"):
        model = VideoDepthAnythingModel(encoder)
        image_model = dpt_fast.models.depth_anything.DepthAnythingModel(
            {"vits": "da2-small", "vitb": "da2-base"}[encoder])
    expected = {k.replace("depth_head.", "head.", 1): tuple(v.shape) for k, v in image_model.state_dict().items()}
    for i, channels in enumerate([widths[2], widths[3], features, features]):
        expected.update(motion_module_keys(f"head.motion_modules.{i}", channels))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert not any(k.startswith("depth_head.") for k in got)


def test_release_layout_loads_strictly(tiny):
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in tiny.state_dict().items()}
    fresh = VideoDepthAnythingModel(**TINY_VDA)
    fresh.load_state_dict(state, strict=True)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(RuntimeError, match="Unexpected"):
        fresh.load_state_dict({**state, "head.motion_modules.4.temporal_transformer.norm.weight": torch.ones(3)})


def test_position_encoding_is_the_published_sinusoid(tiny):
    pe = tiny.state_dict()["head.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe"]
    fresh = VideoDepthAnythingModel(**TINY_VDA).state_dict()[
        "head.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe"]
    t, c = 5, 6
    assert fresh[0, t, c] == pytest.approx(math.sin(t / 10000 ** (c / fresh.shape[-1])), abs=1e-6)
    assert fresh[0, t, c + 1] == pytest.approx(math.cos(t / 10000 ** (c / fresh.shape[-1])), abs=1e-6)
    assert pe.shape == (1, 32, 64)


# ------------------------------------------------------------- restatement of the published forward

def restated_motion_module(x, state, prefix, frames, heads=8, caches=None, states=None):
    """x [(b f), c, h, w]: GroupNorm -> proj_in -> [LayerNorm -> +pe -> attention over f -> +x] x 2 ->
    LayerNorm -> GEGLU FF -> +x -> proj_out -> + input. Streaming (`caches`, one per attention, of
    earlier frames): the normed frames are appended to their cache, pe is added to the whole, queries
    come from the new frames only. Each attention's normed input is appended to `states`."""
    p = lambda name: state[f"{prefix}.temporal_transformer.{name}"]  # noqa: E731
    bf, c, h, w = x.shape
    hidden = F.group_norm(x, 32, p("norm.weight"), p("norm.bias"), eps=1e-6)
    hidden = F.linear(hidden.permute(0, 2, 3, 1).reshape(bf, h * w, c), p("proj_in.weight"), p("proj_in.bias"))
    blk = "transformer_blocks.0"
    for a in range(2):
        att = f"{blk}.attention_blocks.{a}"
        normed = F.layer_norm(hidden, (c,), p(f"{blk}.norms.{a}.weight"), p(f"{blk}.norms.{a}.bias"))
        seq = normed.reshape(bf // frames, frames, h * w, c).permute(0, 2, 1, 3).reshape(-1, frames, c)
        if states is not None:
            states.append(seq)
        earlier = 0 if caches is None else caches[a].shape[1]
        if caches is not None:
            seq = torch.cat([caches[a], seq], dim=1)
        seq = seq + p(f"{att}.pos_encoder.pe")[:, :earlier + frames]
        q = F.linear(seq[:, earlier:], p(f"{att}.to_q.weight"))
        k, v = (F.linear(seq, p(f"{att}.{n}.weight")) for n in ("to_k", "to_v"))
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, c // heads).permute(0, 2, 1, 3)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) * (c // heads) ** -0.5
        out = (scores.softmax(-1) @ split(v)).permute(0, 2, 1, 3).reshape(-1, frames, c)
        out = F.linear(out, p(f"{att}.to_out.0.weight"), p(f"{att}.to_out.0.bias"))
        hidden = out.reshape(bf // frames, h * w, frames, c).permute(0, 2, 1, 3).reshape(bf, h * w, c) + hidden
    normed = F.layer_norm(hidden, (c,), p(f"{blk}.ff_norm.weight"), p(f"{blk}.ff_norm.bias"))
    value, gate = F.linear(normed, p(f"{blk}.ff.net.0.proj.weight"), p(f"{blk}.ff.net.0.proj.bias")).chunk(2, -1)
    hidden = F.linear(value * F.gelu(gate), p(f"{blk}.ff.net.2.weight"), p(f"{blk}.ff.net.2.bias")) + hidden
    hidden = F.linear(hidden, p("proj_out.weight"), p("proj_out.bias"))
    return hidden.reshape(bf, h, w, c).permute(0, 3, 1, 2) + x


def restated_forward(model, clips, caches=None, states=None):
    """The release's VideoDepthAnything.forward + DPTHeadTemporal.forward, over the image model's
    encoder and Reassemble (tested against transformers in test_depth_anything.py); `caches` (8) for
    its streaming forward, `states` collects the 8 attention inputs."""
    state = model.state_dict()
    b, t, _, height, width = clips.shape
    taps, gh, gw = model.encode(clips.flatten(0, 1))
    l1, l2, l3, l4 = model.head.reassemble(taps, gh, gw)
    mm = lambda x, i: restated_motion_module(x, state, f"head.motion_modules.{i}", t,  # noqa: E731
                                             caches=None if caches is None else caches[2 * i:2 * i + 2], states=states)
    l3, l4 = mm(l3, 0), mm(l4, 1)
    s = model.head.scratch
    r1, r2, r3, r4 = s.layer1_rn(l1), s.layer2_rn(l2), s.layer3_rn(l3), s.layer4_rn(l4)
    path4 = mm(s.refinenet4(r4, size=r3.shape[2:]), 2)
    path3 = mm(s.refinenet3(path4, r3, size=r2.shape[2:]), 3)
    path2 = s.refinenet2(path3, r2, size=r1.shape[2:])
    path1 = s.refinenet1(path2, r1)
    out = F.interpolate(s.output_conv1(path1), (gh * 14, gw * 14), mode="bilinear", align_corners=True)
    out = s.output_conv2(out)
    out = F.relu(F.interpolate(out, (height, width), mode="bilinear", align_corners=True))
    return out.squeeze(1).unflatten(0, (b, t))


def test_fp32_parity_with_the_published_forward(tiny):
    clips = torch.randn(2, 5, 3, 42, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = tiny(clips)
        expected = restated_forward(tiny, clips)
    assert got.shape == (2, 5, 42, 56)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_temporal_modules_mix_frames_and_only_within_a_clip(tiny):
    clips = torch.randn(2, 4, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    changed = clips.clone()
    changed[0, 3] += 1.0  # a different last frame in the first clip
    with torch.no_grad():
        a, b = tiny(clips), tiny(changed)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4   # frame 0 sees frame 3
    torch.testing.assert_close(a[1], b[1])          # the other clip does not
    with pytest.raises(ValueError, match="at most 32"):
        tiny(torch.zeros(1, 33, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\]"):
        tiny(torch.zeros(4, 3, 28, 28))


def test_fresh_temporal_modules_start_as_the_identity():
    model = VideoDepthAnythingModel(**TINY_VDA).eval()
    x = torch.randn(6, 32, 4, 5)
    for module in model.head.motion_modules[2:]:
        torch.testing.assert_close(module(x, 3), x)


def test_whole_video_through_the_windowed_procedure(tiny):
    rng = np.random.default_rng(0)
    frames = [torch.from_numpy(rng.integers(0, 256, (3, 30, 40), dtype=np.uint8)) for _ in range(INFER_LEN + 5)]
    predict = window_predictor(tiny, lambda f: dpt_fast.transforms.depth_anything_preprocess(f, size=28)[0])
    depths = list(windowed_video_depth(iter(frames), predict))
    assert len(depths) == len(frames)
    assert all(d.shape == (30, 40) and torch.isfinite(d).all() and (d >= 0).all() for d in depths)


def test_release_file_loads_and_bad_files_are_named(tmp_path, tiny):
    from dpt_fast.models.video_depth_anything import is_metric_release_file, load_video_depth_anything
    from dpt_fast.weights import CheckpointError
    overrides = {k: v for k, v in TINY_VDA.items()}
    path = tmp_path / "video_depth_anything_vits.pth"
    torch.save(tiny.state_dict(), path)
    loaded = load_video_depth_anything(path, **overrides)
    assert not loaded.training
    for key, value in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not is_metric_release_file(path) and is_metric_release_file("metric_video_depth_anything_vitl.pth")

    broken = dict(tiny.state_dict())
    del broken["head.motion_modules.3.temporal_transformer.proj_out.bias"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="motion_modules.3.temporal_transformer.proj_out.bias"):
        load_video_depth_anything(tmp_path / "broken.pth", **overrides)
    image_only = {k: v for k, v in tiny.state_dict().items() if "motion_modules" not in k}
    torch.save(image_only, tmp_path / "image.pth")
    with pytest.raises(CheckpointError, match="not a Video Depth Anything checkpoint"):
        load_video_depth_anything(tmp_path / "image.pth")
    with pytest.raises(CheckpointError, match="encoder"):
        load_video_depth_anything(path)  # a width of 64 is no release encoder


def restated_streaming(model, inputs):
    """The release's infer_video_depth_one over normalised frames [3, h, w]: the first frame's cached
    inputs copied 32 times, ids padded likewise; each later frame attends to entries [0, 1] + the last
    29, is appended; after frame id, if id + 32 > 42 the entry at index 1 is deleted."""
    cache_list, id_list, outputs = [], [], []
    for frame_id, x in enumerate(inputs):
        states = []
        if frame_id == 0:
            depth = restated_forward(model, x[None, None], states=states)
            cache_list = [states] * 32
            id_list += [0] * 31
        else:
            chosen = cache_list[0:2] + cache_list[-29:]
            assert len(chosen) == 31
            caches = [torch.cat([entry[i] for entry in chosen], dim=1) for i in range(8)]
            depth = restated_forward(model, x[None, None], caches=caches, states=states)
            cache_list.append(states)
        id_list.append(frame_id)
        if frame_id + 32 > 41 + 1:
            del id_list[1]
            del cache_list[1]
        outputs.append(depth[0, 0])
    return outputs


def test_streaming_mode_matches_the_published_one(tiny):
    from dpt_fast.models.video_depth_anything import VideoDepthAnythingStream
    rng = np.random.default_rng(3)
    # 43 frames: from frame 42 on, the cache list's entry 1 is a real frame (the first 31 deletions
    # remove copies of frame 0), so the release's deletion rule shows in the outputs
    frames = [torch.from_numpy(rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)) for _ in range(43)]
    inputs = [dpt_fast.transforms.depth_anything_preprocess(f, size=None)[0] for f in frames]
    stream = VideoDepthAnythingStream(tiny, lambda f: dpt_fast.transforms.depth_anything_preprocess(f, size=None)[0])
    with torch.no_grad():
        expected = restated_streaming(tiny, inputs)
    got = [stream(f) for f in frames]
    assert len(stream.entries) == 42  # bounded: 32 + frames, at most 42
    assert stream.entries[1] is not stream.entries[0]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    assert (got[5] - got[4]).abs().max() > 0
    with pytest.raises(ValueError, match="reset"):
        stream(torch.zeros(3, 14, 28, dtype=torch.uint8))
    stream.reset()
    torch.testing.assert_close(stream(frames[0]), expected[0], rtol=1e-4, atol=1e-5)
