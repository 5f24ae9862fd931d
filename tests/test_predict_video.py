"""`dpt-fast predict` on videos: a generated video through the command, per-frame and video outputs,
resume per video, --temporal-align, --sequence frame folders, failures and mixed inputs, sharding by
video, and Video Depth Anything's windowed inference."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("av")

from dpt_fast import predict, use_backend  # noqa: E402
from dpt_fast.video import TemporalAligner, model_predictor  # noqa: E402
from dpt_fast.video.io import FrameFolder, VideoFile, VideoWriter, read_depth16_video  # noqa: E402
from dpt_fast.weights import load_model  # noqa: E402
from model_helpers import randomize_  # noqa: E402

FAST = ["--backend", "reference", "--num-workers", "0", "--size", "64"]


def _video(path, frames=5, seed=0):
    """A textured picture panning right: consecutive frames differ, and so do their depth maps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    base = np.random.default_rng(seed).integers(0, 256, (48, 64 + 4 * frames, 3), dtype=np.uint8)
    with VideoWriter(path, 10) as writer:
        for i in range(frames):
            writer.write(np.ascontiguousarray(base[:, 4 * i:4 * i + 64]))
    return path


def _run(capsys, *argv):
    rc = predict.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def _frames(folder, count):
    return [np.load(folder / f"{i:06d}.npy") for i in range(count)]


def _per_frame(model_path, sequence, size=64):
    with use_backend("reference"):
        run = model_predictor(load_model(model_path), size=size)
        return [run(frame.image).numpy() for frame in sequence]


def test_video_outputs_resume_and_temporal_align(tmp_path, model_dir, capsys):
    clip = _video(tmp_path / "clips" / "clip.mp4")
    out = tmp_path / "out"
    rc, err = _run(capsys, tmp_path / "clips", "-o", out, "--model", model_dir, *FAST,
                   "--format", "preview,video16,npy,png16")
    assert rc == 0 and "1 video(s) written" in err, err
    expected = _per_frame(model_dir, VideoFile(clip))
    got = _frames(out / "clip", 5)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert len(list(VideoFile(out / "clip-depth.mp4"))) == 5
    codes, value_range = read_depth16_video(out / "clip-depth.mkv")
    assert len(list(codes)) == 5 and value_range is not None
    assert sorted(p.name for p in (out / "clip").glob("*.png")) == [f"{i:06d}.png" for i in range(5)]
    assert json.loads((out / "clip" / "range.json").read_text())["value_range"] == list(value_range)

    # a re-run with the same settings skips the finished video
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    rc, err = _run(capsys, tmp_path / "clips", "-o", out, "--model", model_dir, *FAST,
                   "--format", "preview,video16,npy,png16")
    assert rc == 0 and "0 video(s) written, 1 skipped" in err, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps

    # other settings (--temporal-align) recompute it: each frame's scale and shift fitted to the previous
    rc, err = _run(capsys, tmp_path / "clips", "-o", out, "--model", model_dir, *FAST,
                   "--format", "preview,video16,npy,png16", "--temporal-align")
    assert rc == 0 and "1 video(s) written" in err, err
    aligner = TemporalAligner()
    aligned = [aligner(torch.from_numpy(d)).numpy() for d in expected]
    got = _frames(out / "clip", 5)
    for a, b in zip(got, aligned):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not all(np.allclose(a, b, rtol=1e-3) for a, b in zip(got[1:], expected[1:]))
    assert json.loads((out / ".clip.done.json").read_text())["temporal_align"] is True


def test_sequence_folder_is_one_video(tmp_path, model_dir, capsys):
    frames = tmp_path / "shots" / "take1"
    frames.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in (1, 2, 10):  # natural order: frame2 before frame10
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(frames / f"frame{i}.png")
    out = tmp_path / "out"
    rc, err = _run(capsys, frames, "-o", out, "--model", model_dir, *FAST, "--sequence", "--format", "video16,npy",
                   "--fps", "12")
    assert rc == 0 and "1 video(s) written" in err, err
    expected = _per_frame(model_dir, FrameFolder(frames))
    for a, b in zip(_frames(out / "take1", 3), expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not (out / "take1" / "000003.npy").exists()
    assert VideoFile(out / "take1-depth.mkv").fps == 12


def test_failures_conflicts_and_mixed_inputs(tmp_path, model_dir, capsys):
    clips = tmp_path / "clips"
    _video(clips / "good.mp4", frames=2)
    (clips / "broken.mp4").write_text("not a video")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine-depth.mp4").write_bytes(b"the user's own file")
    _video(clips / "mine.mp4", frames=2, seed=3)
    rc, err = _run(capsys, clips, "-o", out, "--model", model_dir, *FAST, "--format", "preview")
    assert rc == 1, err
    assert "broken.mp4" in err and "cannot read as a video" in err
    assert "conflict" in err and (out / "mine-depth.mp4").read_bytes() == b"the user's own file"
    assert "1 video(s) written, 0 skipped (already done), 1 failed, 1 conflict(s)" in err
    assert len(list(VideoFile(out / "good-depth.mp4"))) == 2

    # images and videos in one call: refused before anything is loaded
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(clips / "photo.png")
    rc, err = _run(capsys, clips, "-o", tmp_path / "out2", "--model", tmp_path / "no-model.pt")
    assert rc == 2 and "both images" in err and len(err.strip().splitlines()) == 1, err
    (clips / "photo.png").unlink()
    rc, err = _run(capsys, clips, "-o", clips, "--model", model_dir)
    assert rc == 2 and "is the input folder" in err, err
    rc, err = _run(capsys, clips / "good.mp4", "-o", tmp_path / "out2", "--model", model_dir, "--tile", "128")
    assert rc == 2 and "--tile applies to images" in err, err
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "photo.png")
    rc, err = _run(capsys, tmp_path / "photo.png", "-o", tmp_path / "out2", "--model", model_dir, "--temporal-align")
    assert rc == 2 and "--temporal-align applies to videos" in err
    assert not (tmp_path / "out2").exists()


def test_torchrun_shards_by_video(tmp_path, model_dir):
    import os
    import re
    import subprocess
    import sys
    for name in ("a", "b", "d"):
        _video(tmp_path / "clips" / f"{name}.mp4", frames=2)
    (tmp_path / "clips" / "c.mp4").write_text("not a video")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dpt_fast.cli", "predict", str(tmp_path / "clips"), "-o", str(out), "--model", str(model_dir),
           *FAST, "--format", "npy"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log  # c.mp4 failed on rank 0: both ranks agree that the run failed
    per_rank = {int(r): int(n) for r, n in re.findall(r"rank (\d) of 2: (\d+) video\(s\) written", log)}
    assert per_rank == {0: 1, 1: 2}, log  # sorted a, b, c, d: video i on rank i mod 2
    assert "3 video(s) written, 0 skipped (already done), 1 failed across 2 processes" in log
    for name in ("a", "b", "d"):
        assert json.loads((out / f".{name}.done.json").read_text())["frames"] == 2


def test_video_depth_anything_runs_in_windows(tmp_path, capsys):
    from dpt_fast.models.video_depth_anything import VideoDepthAnythingModel, window_predictor
    from dpt_fast.transforms import depth_anything_preprocess
    from dpt_fast.video.windows import windowed_video_depth
    torch.manual_seed(0)
    model = randomize_(VideoDepthAnythingModel("vits"), seed=1, matrix_std=0.05).eval()
    path = tmp_path / "video_depth_anything_vits.pth"
    torch.save(model.state_dict(), path)
    clip = _video(tmp_path / "clip.mp4", frames=3)
    out = tmp_path / "out"
    rc, err = _run(capsys, clip, "-o", out, "--model", path, "--backend", "reference", "--size", "42",
                   "--format", "npy")
    assert rc == 0 and "1 video(s) written" in err, err
    with use_backend("reference"):
        window = window_predictor(model, lambda f: depth_anything_preprocess(f.image, size=42)[0])
        expected = [d.numpy() for d in windowed_video_depth(VideoFile(clip), window)]
    got = _frames(out / "clip", 3)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert got[0].max() > got[0].min()
    assert json.loads((out / ".clip.done.json").read_text())["per_frame"] is False

    rc, err = _run(capsys, clip, "-o", out, "--model", path, "--temporal-align", "--size", "42")
    assert rc == 2 and "--temporal-align is for single-frame models" in err


def test_collect_videos_names_and_problems(tmp_path):
    from dpt_fast.input_files import collect_videos
    _video(tmp_path / "clips" / "a" / "x.mp4", frames=1)
    (tmp_path / "clips" / "notes.txt").write_text("not a video")
    (tmp_path / "empty").mkdir()
    items, problems = collect_videos([tmp_path / "clips", str(tmp_path / "clips" / "*" / "*.mp4"), tmp_path / "empty",
                                     tmp_path / "missing"])
    assert [(p.name, rel) for p, rel in items] == [("x.mp4", "a/x.mp4")] and len(problems) == 2
    assert "no video files" in problems[0][1] and "no such file" in problems[1][1]
    items, problems = collect_videos([tmp_path / "clips" / "a", tmp_path / "empty"], sequence=True)
    assert items == [] and all("no image files directly inside" in why for _, why in problems)


def test_16_bit_compute_keeps_the_depth_head_in_float32(tmp_path, model_dir, capsys):
    """--dtype bf16: the frames' depth comes from a float32 head (a bf16 output, 8 significant bits,
    would band the 16-bit video). At native size (64 x 64) nothing is resized after the head."""
    base = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with VideoWriter(tmp_path / "clip.mp4", 10) as writer:
        writer.write(base)
    rc, err = _run(capsys, tmp_path / "clip.mp4", "-o", tmp_path / "out", "--model", model_dir, "--backend",
                   "reference", "--size", "native", "--dtype", "bf16", "--format", "npy")
    assert rc == 0, err
    depth = torch.from_numpy(np.load(tmp_path / "out" / "clip" / "000000.npy"))
    assert depth.shape == (64, 64) and depth.max() > depth.min()
    assert (depth.bfloat16().float() != depth).float().mean() > 0.5


def test_sigterm_drops_the_video_in_progress_and_a_rerun_redoes_it(tmp_path, model_dir):
    import os
    import re
    import subprocess
    import sys
    import time
    clip = _video(tmp_path / "clip.mp4", frames=30)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dpt_fast.predict", str(clip), "-o", str(out), "--model", str(model_dir), *FAST,
           "--format", "preview,npy"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not (out / "clip" / "000001.npy").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.terminate()
    err = proc.communicate(timeout=240)[1]
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert re.search(r"stopped: 0 video\(s\) written, 1 left", err), err
    leftovers = sorted(p.name for p in out.iterdir() if p.is_file())
    assert leftovers == [".clip.started.json"], leftovers  # no partial video under any name
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "1 video(s) written" in done.stderr, done.stderr
    assert len(list((out / "clip").glob("*.npy"))) == 30 and len(list(VideoFile(out / "clip-depth.mp4"))) == 30
