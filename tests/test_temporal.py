"""Temporal alignment of single-frame predictions and the temporal-consistency metric, on synthetic
camera moves whose true depth is known."""
import numpy as np
import pytest
import torch

from dpt_fast.video.align import TemporalAligner, align_sequence, fit_scale_shift
from dpt_fast.video.consistency import evaluate_synthetic, temporal_consistency
from dpt_fast.video.synthetic import MOTIONS, camera_sequence


@pytest.fixture(scope="module")
def sequences():
    return {m: camera_sequence(m, num_frames=10, height=40, width=56, seed=3) for m in MOTIONS}


def corrupt(disparity, seed=0, outliers=0.0):
    """Each frame (but the first) with a random scale in [e^-1, e] and shift; optional garbage pixels."""
    rng = np.random.default_rng(seed)
    g = torch.from_numpy(disparity)
    scale = torch.from_numpy(np.exp(rng.uniform(-1, 1, len(g)))).float()
    shift = torch.from_numpy(rng.uniform(-0.3, 0.3, len(g))).float()
    scale[0], shift[0] = 1.0, 0.0
    out = g * scale[:, None, None] + shift[:, None, None]
    bad = torch.from_numpy(rng.uniform(size=g.shape) < outliers)
    out[bad] = torch.from_numpy(rng.uniform(0, 5, int(bad.sum()))).float()
    return out, bad


def test_synthetic_sequences_are_consistent_renders(sequences):
    for motion, seq in sequences.items():
        assert seq["images"].shape == (10, 40, 56, 3) and seq["images"].dtype == np.uint8
        assert seq["depth"].shape == (10, 40, 56) and np.isfinite(seq["depth"]).all() and (seq["depth"] > 0).all()
        np.testing.assert_allclose(seq["disparity"], 1 / seq["depth"], rtol=1e-6)
        change = np.abs(np.diff(seq["depth"], axis=0)).mean()
        assert (change == 0) == (motion == "static")  # a pixel sees other points as the camera moves or zooms
        assert (np.abs(np.diff(seq["images"].astype(int), axis=0)).mean() == 0) == (motion == "static")
    again = camera_sequence("pan", num_frames=10, height=40, width=56, seed=3)
    np.testing.assert_array_equal(again["images"], sequences["pan"]["images"])
    with pytest.raises(ValueError, match="motion"):
        camera_sequence("orbit")


def test_fit_scale_shift_recovers_an_affine_map_despite_outliers():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.uniform(0.1, 1.0, (50, 60)))
    y = 2.5 * x - 0.4
    y[torch.from_numpy(rng.uniform(size=x.shape) < 0.3)] = 7.0  # 30% garbage
    scale, shift = fit_scale_shift(x, y)
    assert scale == pytest.approx(2.5, rel=1e-9) and shift == pytest.approx(-0.4, abs=1e-9)
    x[0, 0] = float("nan")
    assert fit_scale_shift(x, y, mask=torch.ones_like(x, dtype=torch.bool)) == pytest.approx((2.5, -0.4))
    assert fit_scale_shift(torch.ones(8, 8), y[:8, :8]) is None  # constant source: no scale defined


def test_aligner_restores_per_frame_scale_and_shift(sequences):
    for motion in ("static", "pan"):
        g = torch.from_numpy(sequences[motion]["disparity"])
        corrupted, _ = corrupt(sequences[motion]["disparity"], seed=2)
        aligned = align_sequence(corrupted)
        for restored, truth in zip(aligned, g):
            torch.testing.assert_close(restored, truth, rtol=1e-4, atol=1e-5)


def test_aligner_ignores_outliers(sequences):
    g = torch.from_numpy(sequences["static"]["disparity"])
    corrupted, bad = corrupt(sequences["static"]["disparity"], seed=4, outliers=0.15)
    aligner = TemporalAligner()
    for frame, truth, outlier in zip(corrupted, g, bad):
        restored = aligner(frame)
        assert aligner.last_fit_ok
        torch.testing.assert_close(restored[~outlier], truth[~outlier], rtol=1e-4, atol=1e-5)
    # without the trimming, a plain least-squares fit would be pulled far off by these pixels
    x, y = corrupted[1].double(), g[1].double()
    plain = np.polyfit(x.flatten().numpy(), y.flatten().numpy(), 1)
    assert abs(plain[0] - fit_scale_shift(x, y)[0]) > 0.05


def test_aligner_in_depth_space_and_its_fallback(sequences):
    depth = torch.from_numpy(sequences["static"]["depth"])
    aligner = TemporalAligner(space="depth")
    first = aligner(depth[0])
    torch.testing.assert_close(first, depth[0])
    torch.testing.assert_close(aligner(1.0 / (3.0 / depth[1] + 0.1)), depth[1], rtol=1e-4, atol=1e-5)
    assert aligner.scale == pytest.approx(1 / 3, rel=1e-5)
    # a frame that gives no fit (constant) keeps the last scale and shift and says so
    flat = aligner(torch.full_like(depth[2], 2.0))
    assert not aligner.last_fit_ok
    torch.testing.assert_close(flat, torch.full_like(flat, 1.0 / (aligner.scale / 2.0 + aligner.shift)))
    aligner.reset()
    torch.testing.assert_close(aligner(depth[3] * 5), depth[3] * 5)


def test_metric_perfect_flickering_and_aligned(sequences):
    for motion, seq in sequences.items():
        g = seq["disparity"]
        perfect = temporal_consistency(g, g)
        assert perfect["temporal_error"] == pytest.approx(0, abs=1e-9) and perfect["abs_rel"] == pytest.approx(0, abs=1e-9)
        assert perfect["flicker"] == pytest.approx(perfect["true_change"])
        # one global scale and shift changes nothing (the metric is invariant to it)
        assert temporal_consistency(3 * g + 1, g)["temporal_error"] == pytest.approx(0, abs=1e-6)
        flickering, _ = corrupt(g, seed=5)
        noisy = temporal_consistency(flickering, g)
        aligned = temporal_consistency(align_sequence(flickering), g)
        assert noisy["temporal_error"] > 0.05 and noisy["flicker"] > 5 * perfect["flicker"]
        assert aligned["temporal_error"] < noisy["temporal_error"] / 5
        assert aligned["abs_rel"] < noisy["abs_rel"] / 3
    static = temporal_consistency(corrupt(sequences["static"]["disparity"], seed=6)[0])  # no targets
    assert static["flicker"] > 0.05 and "temporal_error" not in static
    region = np.zeros((40, 56), bool)
    region[:10] = True
    assert temporal_consistency(sequences["pan"]["disparity"], static_mask=region)["flicker"] >= 0


def test_evaluate_synthetic_reports_per_motion():
    def oracle_with_flicker(image, state={"i": 0}):
        # a 'model' that knows the scene up to a per-frame scale: it looks its frame up by the image
        state["i"] += 1
        index = next(i for i, im in enumerate(seq["images"]) if np.array_equal(im, image.permute(1, 2, 0).numpy()))
        return torch.from_numpy(seq["disparity"][index]) * (1.5 if state["i"] % 2 else 0.7)

    seq = camera_sequence("pan", num_frames=6, height=24, width=32, seed=0)
    raw = evaluate_synthetic(oracle_with_flicker, motions=["pan"], num_frames=6, height=24, width=32)
    aligned = evaluate_synthetic(oracle_with_flicker, motions=["pan"], num_frames=6, height=24, width=32,
                                 temporal_align=True)
    assert set(raw) == {"pan"} and raw["pan"]["temporal_error"] > 0.1
    assert aligned["pan"]["temporal_error"] < 1e-4


def test_evaluate_command_reports_per_motion(tmp_path, capsys):
    import json

    import dpt_fast
    from dpt_fast.video.evaluate import main
    from model_helpers import TINY, randomize_
    dpt_fast.save_model(randomize_(dpt_fast.DPTDepthModel(**TINY), seed=0, matrix_std=0.1), tmp_path / "tiny")
    with dpt_fast.use_backend("reference"):
        status = main(["--model", str(tmp_path / "tiny"), "--size", "32", "--frames", "3", "--height", "24",
                       "--width", "32", "--motions", "static,pan", "--temporal-align", "--device", "cpu",
                       "--out", str(tmp_path / "report.json")])
    assert status == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["raw"]) == {"static", "pan"} and set(report["aligned"]) == {"static", "pan"}
    assert {"flicker", "temporal_error", "true_change", "abs_rel"} <= set(report["raw"]["pan"])
    assert report["raw"]["static"]["true_change"] == 0
    assert main(["--model", str(tmp_path / "missing.pt"), "--device", "cpu"]) == 2
    assert main(["--model", str(tmp_path / "tiny"), "--motions", "orbit"]) == 2
    assert "error:" in capsys.readouterr().err
