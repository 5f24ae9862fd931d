"""Video input/output: decode -> per-frame model -> encode -> decode on short generated videos."""
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

av = pytest.importorskip("av")

from dpt_fast.video import (DepthVideoWriter, FrameFolder, VideoFile, VideoReadError, VideoWriter,  # noqa: E402
                            dequantize_depth, natural_key, open_sequence, quantize_depth, read_depth16_video)


def smooth_frames(count, height, width):
    """Smooth moving gradients (lossy codecs keep them well)."""
    v, u = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    frames = []
    for t in range(count):
        r = 128 + 100 * np.sin((u + 3 * t) / 9.0)
        g = 128 + 100 * np.cos((v - 2 * t) / 7.0)
        b = 60 + 2 * (u + v) + 10 * t
        frames.append(np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8))
    return frames


def write_source_video(path, frames, fps=24, rotation=None):
    """A test video written with PyAV directly (independently of VideoWriter)."""
    out = av.open(str(path), "w")
    stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
    if rotation is not None:
        stream.set_display_rotation(rotation)
    for frame in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()


def fake_model(image: torch.Tensor, index: int) -> torch.Tensor:
    """A per-frame 'depth model': a smooth function of the image and the frame index."""
    return image.float().mean(0) / 255.0 + 0.05 * index + 0.5


def test_decode_predict_encode_round_trip(tmp_path):
    frames = smooth_frames(7, 32, 48)
    write_source_video(tmp_path / "clip.mp4", frames, fps=24)

    video = open_sequence(tmp_path / "clip.mp4")
    assert isinstance(video, VideoFile)
    assert video.fps == 24 and video.size == (32, 48) and video.num_frames == 7
    decoded = list(video)
    assert [f.index for f in decoded] == list(range(7))
    assert [f.time for f in decoded] == pytest.approx([i / 24 for i in range(7)])
    for frame, source in zip(decoded, frames):
        assert frame.image.dtype == torch.uint8 and frame.image.shape == (3, 32, 48)
        assert np.abs(frame.image.permute(1, 2, 0).numpy().astype(int) - source).mean() < 6

    value_range = (0.4, 2.0)
    depths = [fake_model(f.image, f.index) for f in decoded]
    with DepthVideoWriter(video.fps, color_path=tmp_path / "out" / "clip-depth.mp4",
                          depth16_path=tmp_path / "out" / "clip-depth.mkv", value_range=value_range) as writer:
        for depth in depths:
            writer.write(depth)

    codes, stored_range = read_depth16_video(tmp_path / "out" / "clip-depth.mkv")
    codes = list(codes)
    assert stored_range == value_range
    assert len(codes) == 7
    for got, depth in zip(codes, depths):
        assert got.dtype == np.uint16 and got.shape == (32, 48)
        np.testing.assert_array_equal(got, quantize_depth(depth, value_range))  # lossless
        np.testing.assert_allclose(dequantize_depth(got, value_range), depth.numpy(), atol=(2.0 - 0.4) / 65535)

    preview = VideoFile(tmp_path / "out" / "clip-depth.mp4")
    assert preview.fps == 24 and preview.size == (32, 48) and len(list(preview)) == 7
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip-depth.mkv", "clip-depth.mp4"]


def test_16bit_values_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (5, 17, 23), dtype=np.uint16)  # odd sizes, full range, noise
    values[0, 0, 0], values[0, 0, 1] = 0, 65535
    with VideoWriter(tmp_path / "d.mkv", Fraction(30000, 1001), kind="gray16") as writer:
        for v in values:
            writer.write(v)
    codes, value_range = read_depth16_video(tmp_path / "d.mkv")
    np.testing.assert_array_equal(np.stack(list(codes)), values)
    assert value_range is None
    assert VideoFile(tmp_path / "d.mkv").fps == Fraction(30000, 1001)


def test_odd_sized_preview_is_padded_to_even(tmp_path):
    with VideoWriter(tmp_path / "p.mp4", 10) as writer:
        for frame in smooth_frames(3, 15, 21):
            writer.write(torch.from_numpy(frame).permute(2, 0, 1))  # a [3, H, W] tensor is accepted too
    video = VideoFile(tmp_path / "p.mp4")
    assert video.size == (16, 22) and len(list(video)) == 3


def test_rotation_metadata_is_applied(tmp_path):
    frames = smooth_frames(2, 32, 48)
    for f in frames:
        f[:4, :8] = 255  # a white mark at the top left of the stored picture
    write_source_video(tmp_path / "rot.mp4", frames, fps=10, rotation=90)
    video = VideoFile(tmp_path / "rot.mp4")
    assert video.size == (48, 32)
    image = next(iter(video)).image
    assert image.shape == (3, 48, 32)
    # a quarter turn counter-clockwise moves the top-left corner to the bottom-left
    assert image[:, -4:, :4].float().mean() > 200 and image[:, :4, :4].float().mean() < 200


def test_frame_folder_is_one_naturally_sorted_sequence(tmp_path):
    names = ["frame10.png", "frame2.png", "frame1.png", "Frame3.jpg"]
    for value, name in zip([40, 20, 10, 30], names):
        Image.fromarray(np.full((8, 12, 3), value, np.uint8)).save(tmp_path / name, quality=100)
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(tmp_path / "sub" / "frame0.png")  # not part of it
    seq = open_sequence(tmp_path, fps=5)
    assert isinstance(seq, FrameFolder) and len(seq) == 4 and seq.size == (8, 12)
    frames = list(seq)
    assert [f.image.float().mean().round().item() for f in frames] == [10, 20, 30, 40]
    assert [f.time for f in frames] == pytest.approx([0, 0.2, 0.4, 0.6])
    assert sorted(["a10", "a9", "b1", "a09x"], key=natural_key) == ["a9", "a09x", "a10", "b1"]


def test_unreadable_inputs_give_one_line_errors(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 50)
    for path, words in [(bad, "cannot read as a video"), (tmp_path / "missing.mp4", "no such file")]:
        with pytest.raises(VideoReadError) as err:
            open_sequence(path)
        message = str(err.value)
        assert str(path) in message and words in message and "\n" not in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoReadError, match="no image files"):
        open_sequence(tmp_path / "empty")
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "0.png").write_bytes(b"not a png")
    with pytest.raises(VideoReadError, match="cannot read as an image"):
        list(open_sequence(tmp_path / "frames"))
    with pytest.raises(ValueError, match=r"\.mkv"):
        VideoWriter(tmp_path / "d.mp4", 30, kind="gray16")


def test_interrupted_write_leaves_no_file(tmp_path):
    target = tmp_path / "out.mkv"
    with pytest.raises(RuntimeError):
        with VideoWriter(target, 30, kind="gray16") as writer:
            writer.write(np.zeros((4, 6), np.uint16))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="one size"):
        with VideoWriter(target, 30, kind="gray16") as writer:
            writer.write(np.zeros((4, 6), np.uint16))
            writer.write(np.zeros((4, 8), np.uint16))
    assert list(tmp_path.iterdir()) == []


def test_quantize_per_frame_and_fixed_range():
    depth = torch.tensor([[1.0, 2.0], [3.0, float("nan")]])
    np.testing.assert_array_equal(quantize_depth(depth), [[0, 32768], [65535, 0]])
    np.testing.assert_array_equal(quantize_depth(depth, (0.0, 2.0)), [[32768, 65535], [65535, 0]])


def test_first_frame_range_is_fixed_and_recorded(tmp_path):
    depths = [torch.full((4, 6), 1.0), torch.full((4, 6), 3.0), torch.linspace(0, 10, 24).reshape(4, 6)]
    depths[0][0, 0] = 2.0
    with DepthVideoWriter(10, depth16_path=tmp_path / "d.mkv", value_range="first", margin=0.5) as writer:
        for depth in depths:
            writer.write(depth)
    codes, value_range = read_depth16_video(tmp_path / "d.mkv")
    assert value_range == (0.5, 2.5)
    codes = list(codes)
    np.testing.assert_array_equal(codes[1], quantize_depth(depths[1], (0.5, 2.5)))  # 3.0 clips to the top
    assert codes[1].max() == 65535 and codes[2].min() == 0


def test_readme_video_example_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    import dpt_fast
    from model_helpers import TINY, randomize_
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Video\n.*?```python\n(.*?)```", text, re.S).group(1)
    dpt_fast.save_model(randomize_(dpt_fast.DPTDepthModel(**TINY), seed=0, matrix_std=0.1), tmp_path / "tiny")
    write_source_video(tmp_path / "clip.mp4", smooth_frames(3, 40, 56), fps=12)
    code = (code.replace('"dpt_hybrid-midas-501f0c75.pt"', repr(str(tmp_path / "tiny"))).replace(".cuda()", "")
                .replace("size=384", "size=64").replace("autocast_dtype=torch.bfloat16", "autocast_dtype=None"))
    monkeypatch.chdir(tmp_path)
    with dpt_fast.use_backend("reference"):
        exec(compile(code, "README video example", "exec"), {})
    codes, value_range = read_depth16_video(tmp_path / "clip-depth.mkv")
    codes = list(codes)
    assert len(codes) == 3 and codes[0].shape == (40, 56) and value_range is not None
    assert VideoFile(tmp_path / "clip-depth.mp4").size == (40, 56)
