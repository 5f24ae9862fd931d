"""Many videos: sharding covers each video once, interruption and resume, settings, failures."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from dpt_fast.video.batch import collect_sequences, predict_videos, shard  # noqa: E402
from dpt_fast.video.io import VideoFile, VideoWriter, read_depth16_video  # noqa: E402

LENGTHS = {"a": 4, "sub/b": 3, "c": 5}


@pytest.fixture
def videos(tmp_path):
    clips = tmp_path / "clips"
    (clips / "sub").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    paths = {"a": clips / "a.mp4", "sub/b": clips / "sub" / "b.mp4", "c": tmp_path / "other" / "c.mp4"}
    for name, path in paths.items():
        with VideoWriter(path, 10) as writer:
            for i in range(LENGTHS[name]):
                writer.write(np.full((16, 24, 3), 20 * i + 10, np.uint8))
    (clips / "notes.txt").write_text("not a video")
    return tmp_path, [clips, paths["c"]]


class CountingModel:
    def __init__(self, stop_at=None):
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, image):
        self.calls += 1
        if self.stop_at is not None and self.calls == self.stop_at:
            raise KeyboardInterrupt
        return image[0].float() / 255 + 0.5


def finished(out, name):
    return (out / f"{name}-depth.mp4").is_file() and (out / f"{name}-depth.mkv").is_file()


def test_collect_and_shard(videos):
    root, inputs = videos
    sources = collect_sequences(inputs)
    assert [s.name for s in sources] == ["a", "c", "sub/b"]
    for world in (1, 2, 3, 5):
        shares = [shard(sources, r, world) for r in range(world)]
        assert sorted(s.name for share in shares for s in share) == ["a", "c", "sub/b"]  # each exactly once
    with pytest.raises(FileNotFoundError):
        collect_sequences([root / "missing"])
    with pytest.raises(ValueError, match="same outputs"):
        collect_sequences([root / "clips" / "a.mp4", root / "clips" / "a.mp4"])
    assert [s.name for s in collect_sequences([root / "clips"], sequence=True)] == ["clips"]


def test_two_ranks_write_every_video_once(videos):
    root, inputs = videos
    sources = collect_sequences(inputs)
    out = root / "out"
    models = [CountingModel(), CountingModel()]
    for rank in (0, 1):
        summary = predict_videos(sources, out, models[rank], rank=rank, world_size=2, progress=False)
        assert summary.failed == []
    assert models[0].calls + models[1].calls == sum(LENGTHS.values())
    for name, length in LENGTHS.items():
        assert finished(out, name)
        codes, value_range = read_depth16_video(out / f"{name}-depth.mkv")
        assert len(list(codes)) == length and value_range is not None
        assert len(list(VideoFile(out / f"{name}-depth.mp4"))) == length
        assert json.loads((out / ("sub/.b.done.json" if name == "sub/b" else f".{name}.done.json")).read_text())["frames"] == length


def test_interrupted_run_resumes_where_it_stopped(videos):
    root, inputs = videos
    sources = collect_sequences(inputs)
    out = root / "out"
    model = CountingModel(stop_at=LENGTHS["a"] + 2)  # inside the second video, "c"
    with pytest.raises(KeyboardInterrupt):
        predict_videos(sources, out, model, progress=False)
    assert finished(out, "a") and not finished(out, "c") and not (out / ".c.done.json").exists()
    assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]  # no partial files left
    again = CountingModel()
    summary = predict_videos(sources, out, again, progress=False)
    assert summary.skipped == ["a"] and summary.done == ["c", "sub/b"]
    assert again.calls == LENGTHS["c"] + LENGTHS["sub/b"]
    # done videos are skipped; other settings or overwrite recompute
    assert predict_videos(sources, out, CountingModel(), progress=False).skipped == ["a", "c", "sub/b"]
    changed = CountingModel()
    predict_videos(sources, out, changed, temporal_align=True, progress=False)
    assert changed.calls == sum(LENGTHS.values())
    forced = CountingModel()
    predict_videos(sources, out, forced, temporal_align=True, overwrite=True, progress=False)
    assert forced.calls == sum(LENGTHS.values())


def test_unreadable_video_is_reported_and_the_rest_done(videos):
    root, inputs = videos
    (root / "clips" / "broken.mp4").write_bytes(b"not a video" * 20)
    summary = predict_videos(collect_sequences(inputs), root / "out", CountingModel(), progress=False)
    assert [name for name, _ in summary.failed] == ["broken"]
    assert "broken.mp4" in summary.failed[0][1] and "\n" not in summary.failed[0][1]
    assert summary.done == ["a", "c", "sub/b"]


def test_per_frame_pngs_and_sequence_functions(videos):
    root, inputs = videos
    sources = [s for s in collect_sequences(inputs) if s.name == "a"]

    def sequence_model(frames):  # a whole-sequence predictor (e.g. windowed inference)
        for frame in frames:
            yield torch.full(frame.image.shape[1:], float(frame.index))

    predict_videos(sources, root / "out", sequence_model, per_frame=False, formats=["png16"], value_range=(0.0, 3.0),
                   progress=False)
    pngs = sorted((root / "out" / "a").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(4)]
    from dpt_fast.image_io import read_png16
    assert [int(read_png16(p)[0, 0]) for p in pngs] == [0, 21845, 43690, 65535]
    assert json.loads((root / "out" / "a" / "range.json").read_text()) == {"value_range": [0.0, 3.0]}
    with pytest.raises(ValueError, match="formats"):
        predict_videos(sources, root / "out", sequence_model, formats=["gif"])


def test_stop_drops_the_video_in_progress_and_a_rerun_finishes(videos):
    import threading
    root, inputs = videos
    sources = collect_sequences(inputs)
    out = root / "out"
    stop = threading.Event()
    model = CountingModel()

    def stopping(image):  # a stop request (Ctrl-C) arriving during the second frame of "c"
        if model.calls == LENGTHS["a"] + 1:
            stop.set()
        return model(image)
    summary = predict_videos(sources, out, stopping, progress=False, stop=stop)
    assert summary.stopped and summary.done == ["a"] and summary.remaining == 2
    assert model.calls == LENGTHS["a"] + 2 and not finished(out, "c") and not (out / ".c.done.json").exists()
    assert (out / ".c.started.json").exists()  # the leftovers are this tool's: not a conflict on re-run
    summary = predict_videos(sources, out, CountingModel(), progress=False)
    assert summary.skipped == ["a"] and summary.done == ["c", "sub/b"] and not summary.conflicts
    assert not (out / ".c.started.json").exists()


def test_foreign_outputs_are_conflicts_and_raw_frames_are_written(videos):
    root, inputs = videos
    sources = [s for s in collect_sequences(inputs) if s.name in ("a", "c")]
    out = root / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "notes.txt").write_text("the user's own folder")
    for overwrite in (False, True):
        summary = predict_videos(sources, out, CountingModel(), formats=["npy", "pfm"], overwrite=overwrite,
                                 progress=False)
        assert [name for name, _ in summary.conflicts] == ["a"] and summary.done == ["c"]
        assert sorted(p.name for p in (out / "a").iterdir()) == ["notes.txt"]
    from dpt_fast.image_io import read_pfm
    raw = [np.load(out / "c" / f"{i:06d}.npy") for i in range(LENGTHS["c"])]
    assert all(np.array_equal(read_pfm(out / "c" / f"{i:06d}.pfm"), r) for i, r in enumerate(raw))
    assert raw[0].dtype == np.float32 and raw[0].shape == (16, 24) and raw[1].mean() > raw[0].mean()
