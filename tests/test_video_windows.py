"""Video Depth Anything's windowed inference against a restatement of the published procedure."""
import numpy as np
import pytest
import torch

from dpt_fast.video.windows import (INFER_LEN, INTERP_LEN, KEYFRAMES, OVERLAP, merge_windows, window_plan,
                                    windowed_video_depth)

LENGTHS = [1, 5, 21, 22, 23, 31, 32, 33, 43, 44, 45, 54, 55, 66, 67, 100]


# --- the published procedure, restated over whole lists (everything in memory, as the original) ----

def published_inputs(num_frames):
    step = INFER_LEN - OVERLAP
    padded = list(range(num_frames))
    padded += [padded[-1]] * ((step - num_frames % step) % step + (INFER_LEN - step))
    windows, previous = [], None
    for start in range(0, num_frames, step):
        current = padded[start:start + INFER_LEN]
        if previous is not None:
            current[:OVERLAP] = [previous[k] for k in KEYFRAMES]
        windows.append(current)
        previous = current
    return windows


def published_scale_shift(prediction, target):
    # float32 normal equations, (1, 0) when singular
    p, t = prediction.astype(np.float32), target.astype(np.float32)
    a00, a01, a11 = np.sum(p * p), np.sum(p), np.float32(p.size)
    b0, b1 = np.sum(p * t), np.sum(t)
    det = a00 * a11 - a01 * a01
    return ((a11 * b0 - a01 * b1) / det, (-a01 * b0 + a00 * b1) / det) if det != 0 else (1.0, 0.0)


def published_merge(depth_list, num_frames, metric=False):
    align_len = OVERLAP - INTERP_LEN
    key = KEYFRAMES[:align_len]
    aligned, reference = [], []
    for offset in range(0, len(depth_list), INFER_LEN):
        if not aligned:
            aligned += depth_list[:INFER_LEN]
            reference = [depth_list[offset + k] for k in key]
            continue
        current = [depth_list[offset + i] for i in range(len(key))]
        scale, shift = (1.0, 0.0) if metric else published_scale_shift(np.concatenate(current), np.concatenate(reference))
        before = aligned[-INTERP_LEN:]
        after = [np.maximum(d * scale + shift, 0) for d in depth_list[offset + align_len:offset + OVERLAP]]
        weights = [i / (INTERP_LEN - 1) for i in range(INTERP_LEN)]
        aligned[-INTERP_LEN:] = [b * (1 - w) + a * w for b, a, w in zip(before, after, weights)]
        aligned += [np.maximum(depth_list[offset + i] * scale + shift, 0) for i in range(OVERLAP, INFER_LEN)]
        reference = reference[:1] + [np.maximum(depth_list[offset + k] * scale + shift, 0) for k in key[1:]]
    return np.stack(aligned[:num_frames])


# --- a fake window model: true depth per frame, a different scale and shift per window, some noise ---

def truth(num_frames, size=(6, 7)):
    rng = np.random.default_rng(0)
    return rng.uniform(0.5, 2.0, (num_frames,) + size).astype(np.float32)


def window_model(gt):
    calls = []

    def predict(items):
        w = len(calls)
        calls.append(list(items))
        rng = np.random.default_rng(100 + w)
        scale, shift = rng.uniform(0.3, 3.0), rng.uniform(-0.2, 0.2)
        noise = rng.normal(0, 0.01, (INFER_LEN,) + gt.shape[1:])
        return torch.from_numpy(np.stack([gt[i] for i in items]) * scale + shift + noise).float()
    return predict, calls


@pytest.mark.parametrize("num_frames", LENGTHS)
def test_window_plan_matches_the_published_inputs(num_frames):
    assert window_plan(num_frames) == published_inputs(num_frames)


def test_window_plan_facts():
    plan = window_plan(100)
    assert [w[2] for w in plan] == [2, 24, 46, 68, 90]  # windows start every 22 frames
    assert all(w[0] == 0 for w in plan) and [w[1] for w in plan[1:]] == [12, 34, 56, 78]
    assert plan[-1][-1] == 99 and plan[-1].count(99) == (88 + 32) - 100 + 1  # padded with the last frame
    with pytest.raises(ValueError):
        window_plan(0)


@pytest.mark.parametrize("num_frames", LENGTHS)
@pytest.mark.parametrize("metric", [False, True])
def test_merge_and_driver_match_the_published_procedure(num_frames, metric):
    gt = truth(num_frames)
    predict, calls = window_model(gt)
    windows = [predict(items) for items in window_plan(num_frames)]
    expected = published_merge([d.numpy() for w in windows for d in w], num_frames, metric)

    merged = torch.stack(list(merge_windows(iter(windows), num_frames, metric=metric)))
    assert merged.shape == (num_frames, 6, 7)
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-4, atol=1e-5)

    predict, calls = window_model(gt)
    driven = torch.stack(list(windowed_video_depth(iter(range(num_frames)), predict, metric=metric)))
    np.testing.assert_allclose(driven.numpy(), expected, rtol=1e-4, atol=1e-5)
    # the driver formed the published windows from a lazy source; a last window whose frames are all
    # padding or already final (the video ends at its position 0 or 1) changes nothing and is not run
    skipped = 1 if num_frames > 22 and num_frames % 22 in (1, 2) else 0
    assert calls == window_plan(num_frames)[:len(window_plan(num_frames)) - skipped]


def test_alignment_removes_the_per_window_scale():
    gt = truth(90)
    predict, _ = window_model(gt)
    depth = torch.stack(list(windowed_video_depth(iter(range(90)), predict)))
    # every frame ends on the first window's scale: one global fit explains the whole sequence
    x, y = depth.double().flatten(), torch.from_numpy(gt).double().flatten()
    fit = np.polyfit(x.numpy(), y.numpy(), 1)
    residual = np.abs(np.polyval(fit, x.numpy()) - y.numpy()).mean()
    assert residual < 0.05 and depth.min() >= 0


def test_driver_reads_lazily_and_holds_little():
    read = []

    def source():
        for i in range(200):
            read.append(i)
            yield i

    predict, _ = window_model(truth(200))
    outputs = windowed_video_depth(source(), predict)
    for index, _ in enumerate(outputs):
        # frame i is out once its window (and so at most i + 2 * INFER_LEN frames) has been read
        assert len(read) <= index + 2 * INFER_LEN
    assert index == 199 and len(read) == 200


def test_window_count_is_checked():
    windows = [torch.zeros(INFER_LEN, 2, 2)] * 3
    with pytest.raises(ValueError, match="got 1 windows"):
        list(merge_windows(iter(windows[:1]), 60))
    with pytest.raises(ValueError, match="no frames"):
        list(windowed_video_depth(iter([]), lambda items: torch.zeros(INFER_LEN, 2, 2)))
