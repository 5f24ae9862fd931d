"""`dpt-fast predict` with Depth Anything: each model's own preprocessing (multiples of 14, ImageNet mean
and std), metric depth in metres in PFM/npy, and the manifest saying what the values are."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dpt_fast import DepthAnythingModel, image_io, predict, use_backend
from dpt_fast.transforms import depth_anything_preprocess, resize_prediction
from da_helpers import hf_model, hf_predict
from helpers import relative_error
from model_helpers import randomize_

FAST = ["--backend", "reference", "--num-workers", "0", "--size", "42"]


@pytest.fixture(scope="module")
def metric_release(tmp_path_factory):
    """A V2 metric (Hypersim) model in the release's layout, under the release's file name: the
    architecture is read from its keys (ViT-S), max_depth 20 from the name."""
    torch.manual_seed(0)
    model = randomize_(DepthAnythingModel("da2-metric-hypersim-small"), seed=0, matrix_std=0.05).eval()
    path = tmp_path_factory.mktemp("da") / "depth_anything_v2_metric_hypersim_vits.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _photos(folder, sizes=((40, 60), (50, 36))):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def _expected(run, photo, size=42):
    """The prediction as Depth Anything's release computes it: keep-aspect resize (shorter side >= size,
    multiples of 14), ImageNet mean/std, output resized back bilinearly."""
    image = torch.from_numpy(image_io.read_image(photo)).permute(2, 0, 1)
    with torch.no_grad(), use_backend("reference"):
        out = run(depth_anything_preprocess(image, size=size))
    return resize_prediction(out, image.shape[-2:], mode="bilinear")[0].numpy()


def _records(out):
    return [json.loads(line) for line in (out / ".dpt-fast-manifest.jsonl").read_text().splitlines()]


def test_metric_release_file_writes_metres(metric_release, tmp_path, capsys):
    model, path = metric_release
    photos = _photos(tmp_path / "photos")
    out = tmp_path / "out"
    rc = predict.main([str(photos), "-o", str(out), "--model", str(path), "--format", "npy,pfm,png16", *FAST])
    assert rc == 0, capsys.readouterr().err
    for photo in sorted(photos.iterdir()):
        depth = np.load(out / f"{photo.stem}.npy")
        expected = _expected(model, photo)
        assert depth.shape == expected.shape
        np.testing.assert_allclose(depth, expected, rtol=1e-4, atol=1e-5)
        assert 0 < depth.min() and depth.max() < 20 and depth.max() > depth.min()  # metres: sigmoid x 20
        np.testing.assert_array_equal(image_io.read_pfm(out / f"{photo.stem}.pfm"), depth)
        png = np.asarray(Image.open(out / f"{photo.stem}.png"))
        assert png.dtype == np.uint16 and png.min() == 0 and png.max() == 65535  # normalised, as for DPT
    settings = [r["settings"] for r in _records(out)]
    assert len(settings) == 6
    assert all(s["output"] == "metric_depth" and s["unit"] == "m" and s["max_depth"] == 20.0 and s["size"] == 42
               for s in settings)


def test_native_size_rounds_to_multiples_of_14(metric_release, tmp_path, capsys):
    model, path = metric_release
    photos = _photos(tmp_path / "photos", sizes=((40, 60),))
    out = tmp_path / "out"
    rc = predict.main([str(photos), "-o", str(out), "--model", str(path), "--format", "npy", *FAST, "--size", "native"])
    assert rc == 0, capsys.readouterr().err
    np.testing.assert_allclose(np.load(out / "p0.npy"), _expected(model, photos / "p0.png", size=None),
                               rtol=1e-4, atol=1e-5)


def test_transformers_folder_matches_transformers(tmp_path, capsys):
    hf = hf_model(2)
    hf.save_pretrained(tmp_path / "hf")
    photos = _photos(tmp_path / "photos")
    out = tmp_path / "out"
    rc = predict.main([str(photos), "-o", str(out), "--model", str(tmp_path / "hf"), "--format", "npy", *FAST])
    assert rc == 0, capsys.readouterr().err
    for photo in sorted(photos.iterdir()):
        expected = _expected(lambda x: hf_predict(hf, x), photo)
        assert relative_error(torch.from_numpy(np.load(out / f"{photo.stem}.npy")), torch.from_numpy(expected)) < 1e-4
    assert {r["settings"]["output"] for r in _records(out)} == {"relative_disparity"}


def test_video_model_refuses_images(tmp_path, capsys):
    from dpt_fast.models.video_depth_anything import VideoDepthAnythingModel
    path = tmp_path / "video_depth_anything_vits.pth"
    torch.save(VideoDepthAnythingModel("vits").state_dict(), path)
    rc = predict.main([str(_photos(tmp_path / "photos")), "-o", str(tmp_path / "out"), "--model", str(path), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "takes videos" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_metric_video_keeps_metres(metric_release, tmp_path, capsys):
    """Videos through a metric model: npy frames in metres, and the 16-bit video's codes map 0 .. 20 m."""
    pytest.importorskip("av")
    from dpt_fast.video.io import VideoWriter, dequantize_depth, read_depth16_video
    _, path = metric_release
    rng = np.random.default_rng(0)
    with VideoWriter(tmp_path / "clip.mp4", 10) as writer:
        for _ in range(2):
            writer.write(rng.integers(0, 256, (28, 42, 3), dtype=np.uint8))
    out = tmp_path / "out"
    rc = predict.main([str(tmp_path / "clip.mp4"), "-o", str(out), "--model", str(path), "--format", "video16,npy",
                       *FAST])
    assert rc == 0, capsys.readouterr().err
    codes, value_range = read_depth16_video(out / "clip-depth.mkv")
    assert value_range == (0.0, 20.0)
    for i, frame in enumerate(codes):
        metres = np.load(out / "clip" / f"{i:06d}.npy")
        assert 0 < metres.min() < metres.max() < 20
        np.testing.assert_allclose(dequantize_depth(frame, value_range), metres, atol=20 / 65535)
    assert json.loads((out / ".clip.done.json").read_text())["output"] == "metric_depth"
