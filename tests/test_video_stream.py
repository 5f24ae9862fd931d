"""Streaming depth: bounded queue, dropping for live sources, ordering for files, alignment, errors."""
import threading
import time

import numpy as np
import pytest
import torch

from dpt_fast.video.stream import DepthStream, model_predictor


def frames(count, height=8, width=12, delay=0.0):
    for i in range(count):
        if delay:
            time.sleep(delay)
        yield torch.full((3, height, width), i % 256, dtype=torch.uint8)


def slow_predict(seconds):
    def predict(image):
        time.sleep(seconds)
        return image[0].float() + 1.0
    return predict


def test_every_frame_in_order_without_dropping():
    stream = DepthStream(slow_predict(0.002), max_pending=2, drop_late=False)
    results = list(stream(frames(30)))
    assert [r.index for r in results] == list(range(30))
    assert all(r.dropped == 0 for r in results) and stream.dropped == 0
    assert stream.max_queued <= 2
    for r in results:
        assert r.depth.shape == (8, 12) and r.depth[0, 0].item() == r.index % 256 + 1


def test_a_slow_model_drops_old_frames_and_keeps_latency_bounded():
    compute = 0.03
    stream = DepthStream(slow_predict(compute), max_pending=1, drop_late=True)
    results = list(stream(frames(40, delay=0.003)))  # a camera ten times faster than the model
    indices = [r.index for r in results]
    assert indices == sorted(indices) and indices[-1] == 39  # the newest frame is always processed
    assert stream.dropped == 40 - len(results) > 10
    assert sum(r.dropped for r in results) == stream.dropped
    assert stream.max_queued == 1
    # at most one frame waits: its wait is at most one prediction (plus scheduling slack on a busy machine)
    assert max(r.latency for r in results) < 2 * compute + 0.5


def test_stream_aligns_flickering_predictions():
    truth = torch.rand(8, 12, generator=torch.Generator().manual_seed(0)) + 0.5
    gains = iter([1.0, 3.0, 0.5, 2.0, 1.7])
    stream = DepthStream(lambda image: truth * next(gains) + 0.1, temporal_align=True, drop_late=False)
    depths = [r.depth for r in stream(frames(5))]
    for depth in depths:
        torch.testing.assert_close(depth, depths[0], rtol=1e-4, atol=1e-5)
    stream.reset()
    assert stream.aligner.reference is None


def test_source_errors_reach_the_consumer_and_early_exit_stops_the_reader():
    def broken():
        yield from frames(3)
        raise OSError("camera unplugged")

    with pytest.raises(OSError, match="camera unplugged"):
        list(DepthStream(slow_predict(0), drop_late=False)(broken()))

    stream = DepthStream(slow_predict(0), max_pending=1, drop_late=False)
    gen = stream(frames(10_000))
    assert next(gen).index == 0
    gen.close()
    stream._reader.join(timeout=5)
    assert not stream._reader.is_alive()
    with pytest.raises(ValueError, match="max_pending"):
        DepthStream(slow_predict(0), max_pending=0)


def test_model_predictor_with_a_tiny_dpt():
    import dpt_fast
    from model_helpers import TINY
    model = dpt_fast.DPTDepthModel(**TINY)
    predict = model_predictor(model, size=64)
    stream = DepthStream(predict, temporal_align=True, drop_late=False)
    camera = (np.random.default_rng(i).integers(0, 256, (37, 53, 3), dtype=np.uint8) for i in range(3))
    with dpt_fast.use_backend("reference"):  # (the interpreter's kernels are slow; they have their own tests)
        results = list(stream(camera))  # [H, W, 3] arrays are accepted
    assert len(results) == 3
    for r in results:
        assert r.depth.shape == (37, 53) and r.depth.dtype == torch.float32 and torch.isfinite(r.depth).all()
    assert not model.training
    assert threading.active_count() < 50


def test_measure_latency_reports_compute_and_camera_latency():
    from dpt_fast.video.stream import measure_latency
    stream = DepthStream(slow_predict(0.01), temporal_align=True)
    report = measure_latency(stream, height=16, width=24, frames=8, warmup=1, camera_fps=200)
    assert report["compute_median_ms"] >= 10 and report["latency_median_ms"] >= 10
    assert report["processed"] + report["dropped"] == 8 and report["processed"] >= 1
    assert stream.drop_late  # the stream's own settings are used and kept


def test_model_predictor_uses_depth_anything_preprocessing():
    import dpt_fast
    from dpt_fast.models.depth_anything import DepthAnythingModel
    from dpt_fast.transforms import depth_anything_preprocess, resize_prediction
    model = DepthAnythingModel("da2-small", taps=[0, 1, 2, 3], features=32, out_channels=[32, 32, 64, 64],
                               vit_kwargs=dict(embed_dim=64, depth=4, num_heads=1)).eval()
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 30, 44), dtype=np.uint8))
    with dpt_fast.use_backend("reference"), torch.no_grad():
        got = model_predictor(model, size=28)(image)
        expected = resize_prediction(model(depth_anything_preprocess(image, size=28)), (30, 44), mode="bilinear")[0]
    assert got.shape == (30, 44)
    torch.testing.assert_close(got, expected)
