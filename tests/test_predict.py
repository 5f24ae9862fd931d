"""`dpt-fast predict` end to end on CPU with a tiny model saved by save_model.

The operators run their reference implementations here (--backend reference) to keep the suite fast;
the fused kernels are proven against the reference by the kernel and model tests.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpt_fast import DPTDepthModel, DPTSegmentationModel, cli, image_io, inference, predict, use_backend
from dpt_fast.transforms import normalize_depth, preprocess, resize_prediction
from dpt_fast.weights import load_model, save_model
from model_helpers import TINY, randomize_

GOOD = {"a.png": (60, 80), "b.jpg": (90, 70), "sub/c.png": (64, 64), "sub/d.jpg": (50, 100), "sub/deeper/e.png": (45, 33)}
FAST = ["--backend", "reference", "--num-workers", "0"]


@pytest.fixture(scope="module")
def depth_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(randomize_(DPTDepthModel(**TINY), matrix_std=0.05), tmp_path_factory.mktemp("models") / "tiny-depth")


@pytest.fixture(scope="module")
def seg_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(randomize_(DPTSegmentationModel(5, **TINY), seed=1, matrix_std=0.05), tmp_path_factory.mktemp("models") / "tiny-seg")


def _make_images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for rel, (h, w) in GOOD.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        # smooth-ish content so JPEG does not matter much, plus noise
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)), ((xx + yy) * 3) % 256], -1)
        arr = np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        if rel == "sub/d.jpg":
            img = img.convert("L")  # greyscale input
        if rel == "sub/deeper/e.png":
            img = img.convert("RGBA")  # alpha is dropped
        img.save(path)
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"hidden files are ignored")
    return root


@pytest.fixture()
def images(tmp_path):
    return _make_images(tmp_path / "in")


def _direct_depth(model, path, size):
    """What predict must produce: the model called on the same preprocessed input, at batch 1."""
    image = torch.from_numpy(image_io.read_image(path)).permute(2, 0, 1)
    h, w = image.shape[-2:]
    with torch.no_grad(), use_backend("reference"):
        if size is None:
            out = model(preprocess(image, size=(h, w)))
        else:
            out = resize_prediction(model(preprocess(image, size=size)), (h, w))
    return out.float()


def _stem(rel):
    return os.path.splitext(rel)[0]


def test_predict_folder_end_to_end(images, tmp_path, depth_model_dir, capsys):
    out = tmp_path / "out"
    rc = cli.main(["predict", str(images), "-o", str(out), "--model", str(depth_model_dir), "--size", "96",
                   "--format", "png16,pfm,npy,color", "--batch-size", "2", *FAST])
    err = capsys.readouterr().err
    assert rc == 1, err  # the corrupt file makes the run fail ...
    assert "bad.jpg" in err and "cannot read the image" in err
    assert "5 written" in err and "1 failed" in err
    assert not list(out.rglob("bad*"))
    model = load_model(depth_model_dir)
    for rel, (h, w) in GOOD.items():  # ... and every other input is written, names mirroring the inputs
        stem = out / _stem(rel)
        png = image_io.read_png16(f"{stem}.png")
        npy = np.load(f"{stem}.npy")
        pfm = image_io.read_pfm(f"{stem}.pfm")
        color = np.asarray(Image.open(f"{stem}-color.png"))
        assert png.shape == npy.shape == pfm.shape == (h, w) and color.shape == (h, w, 3)
        assert npy.dtype == np.float32 and np.array_equal(npy, pfm)
        expected = _direct_depth(model, images / rel, 96)
        np.testing.assert_allclose(npy, expected.numpy()[0], rtol=1e-4, atol=1e-5)
        assert np.array_equal(png, normalize_depth(torch.from_numpy(npy)[None])[0].numpy())
        expected_png = normalize_depth(expected)[0].numpy()
        diff = np.abs(png.astype(np.int64) - expected_png.astype(np.int64))
        assert diff.max() <= 1 and diff.mean() < 0.05, rel  # batch 2 vs 1 may flip a truncation by one level
        assert png.min() == 0 and png.max() >= 65534  # min-max normalised (truncated, as the original)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # atomic writes left nothing behind
    assert not list(out.rglob("notes*")) and not list(out.rglob(".hidden*"))


def test_resume_skips_finished_outputs_and_overwrite_rewrites(images, tmp_path, depth_model_dir, capsys):
    out = tmp_path / "out"
    (images / "bad.jpg").rename(images / "sub" / "bad.jpg")
    for rel in ("b.jpg", "sub/deeper/e.png"):
        (images / rel).unlink()
    args = ["predict", str(images), "-o", str(out), "--model", str(depth_model_dir), "--size", "64",
            "--format", "png16,npy", *FAST]
    assert cli.main(args) == 1
    capsys.readouterr()
    outputs = sorted(p for p in out.rglob("*") if p.is_file() and p.name != inference.MANIFEST_NAME)
    assert len(outputs) == 2 * 3
    old = 1_000_000_000
    for p in outputs:
        os.utime(p, (old, old))
    (out / "a.npy").unlink()  # an interrupted job: one of its outputs is missing
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "2 input(s) already have all outputs" in err and "1 written" in err
    assert (out / "a.npy").is_file() and os.stat(out / "a.png").st_mtime != old  # a is recomputed
    assert all(os.stat(p).st_mtime == old for p in outputs if p.stem != "a")    # the rest is untouched
    assert cli.main(args + ["--overwrite"]) == 1
    assert "3 written" in capsys.readouterr().err
    assert all(os.stat(p).st_mtime != old for p in outputs)


def test_native_size_and_tiles(images, tmp_path, depth_model_dir, capsys):
    model = load_model(depth_model_dir)
    out = tmp_path / "native"
    rc = cli.main(["predict", str(images / "a.png"), str(images / "sub" / "deeper"), "-o", str(out), "--model",
                   str(depth_model_dir), "--size", "native", "--format", "npy", *FAST])
    assert rc == 0, capsys.readouterr().err
    for rel, name in {"a.png": "a", "sub/deeper/e.png": "e"}.items():  # 60x80 and 45x33: padded, cropped back
        got = np.load(out / f"{name}.npy")
        assert got.shape == GOOD[rel]
        np.testing.assert_allclose(got, _direct_depth(model, images / rel, None).numpy()[0], rtol=1e-4, atol=1e-5)
    # an image larger than the tile runs in blended tiles; the result keeps the input's shape
    out = tmp_path / "tiled"
    rc = cli.main(["predict", str(images / "b.jpg"), "-o", str(out), "--model", str(depth_model_dir),
                   "--size", "native", "--tile", "64", "--format", "npy", *FAST])
    assert rc == 0, capsys.readouterr().err
    got = np.load(out / "b.npy")
    assert got.shape == GOOD["b.jpg"] and np.isfinite(got).all() and got.std() > 0


def test_single_tile_equals_plain_inference(images, depth_model_dir):
    model = load_model(depth_model_dir)
    image = torch.from_numpy(image_io.read_image(images / "sub" / "deeper" / "e.png"))
    with torch.inference_mode(), use_backend("reference"):
        p = predict.Predictor(model, "cpu", size=None, batch_size=2)
        key = p.processed_size(*image.shape[:2])
        plain = p.predict_batch([image], key)[0]
        tiled = p.predict_tiled(image, key, tile=max(key))  # one tile: blending and alignment are identities
    torch.testing.assert_close(tiled, plain, rtol=1e-4, atol=1e-4)


def test_out_of_memory_retries_with_smaller_batches(images, depth_model_dir):
    model = load_model(depth_model_dir)
    calls = []

    def flaky(x):
        calls.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return model(x)

    imgs = [torch.from_numpy(image_io.read_image(images / n)) for n in ("a.png", "sub/c.png", "sub/d.jpg")]
    with torch.inference_mode(), use_backend("reference"):
        p = predict.Predictor(model, "cpu", size=64, compiled=flaky, batch_size=4)
        key = (64, 64)
        got = p.predict_batch(imgs, key)
        one_by_one = [predict.Predictor(model, "cpu", size=64).predict_batch([im], key)[0] for im in imgs]
    assert calls[0] == 3 and calls.count(1) == 3
    assert p.batch_limit[key] == 1 and p.batch_for(key) == 1  # later batches of this size start small
    for a, b in zip(got, one_by_one):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_out_of_memory_on_one_image_falls_back_to_tiles(images, tmp_path, depth_model_dir, monkeypatch, capsys):
    real_load = load_model

    def load_small_memory_model(*args, **kwargs):
        model = real_load(*args, **kwargs)
        forward = model.forward

        def limited(x):
            if x.shape[0] * x.shape[-1] * x.shape[-2] > 64 * 64:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return forward(x)
        model.forward = limited
        return model

    monkeypatch.setattr("dpt_fast.weights.load_model", load_small_memory_model)
    out = tmp_path / "out"
    rc = cli.main(["predict", str(images / "b.jpg"), "-o", str(out), "--model", str(depth_model_dir),
                   "--size", "native", "--format", "npy", *FAST])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "falling back to" in err
    assert np.load(out / "b.npy").shape == GOOD["b.jpg"]


def test_out_of_memory_in_a_batch_of_large_images_tiles_every_one(tmp_path, depth_model_dir, monkeypatch, capsys):
    real_load = load_model
    calls = []

    def load_small_memory_model(*args, **kwargs):
        model = real_load(*args, **kwargs)
        forward = model.forward

        def limited(x):  # even one image of more than 64x64 pixels does not fit
            calls.append(tuple(x.shape))
            if x.shape[-1] * x.shape[-2] > 64 * 64:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return forward(x)
        model.forward = limited
        return model

    monkeypatch.setattr("dpt_fast.weights.load_model", load_small_memory_model)
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name in ("p", "q", "r", "s"):
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    out = tmp_path / "out"
    rc = cli.main(["predict", str(folder), "-o", str(out), "--model", str(depth_model_dir), "--size", "native",
                   "--batch-size", "3", "--format", "npy", *FAST])
    err = capsys.readouterr().err
    assert rc == 0 and "4 written" in err, err
    assert sorted(p.name for p in out.iterdir() if p.name != inference.MANIFEST_NAME) == ["p.npy", "q.npy", "r.npy", "s.npy"]
    assert all(np.load(out / f"{n}.npy").shape == (70, 90) for n in "pqrs")
    # the batch of 3 (then its first half, of 1) runs out of memory, then all 3 are tiled; the 4th image
    # of that size goes to tiles directly
    # (the model pads to multiples of 32 itself: predict hands it the images at their own size)
    assert [s[0] for s in calls if s[-2:] == (70, 90)] == [3, 1]


def test_segmentation_palette_png(images, tmp_path, seg_model_dir, capsys):
    out = tmp_path / "seg"
    rc = cli.main(["predict", str(images / "a.png"), str(images / "b.jpg"), "-o", str(out), "--model",
                   str(seg_model_dir), "--size", "64", "--format", "png,npy,color", *FAST])
    assert rc == 0, capsys.readouterr().err
    model = load_model(seg_model_dir)
    for rel in ("a.png", "b.jpg"):
        png = Image.open(out / f"{_stem(rel)}.png")
        labels = np.load(out / f"{_stem(rel)}.npy")
        assert png.mode == "P" and np.array_equal(np.asarray(png), labels) and labels.shape == GOOD[rel]
        assert np.asarray(Image.open(out / f"{_stem(rel)}-color.png")).shape == GOOD[rel] + (3,)
        image = torch.from_numpy(image_io.read_image(images / rel)).permute(2, 0, 1)
        with torch.no_grad(), use_backend("reference"):
            logits = model(preprocess(image, size=64))
        # the original's post-processing: logits (not probabilities) resized bicubically, argmax, + 1
        resized = torch.nn.functional.interpolate(logits, size=GOOD[rel], mode="bicubic", align_corners=False)
        expected = resized.argmax(1)[0].numpy() + 1
        assert np.array_equal(labels, expected)
    rc = cli.main(["predict", str(images / "a.png"), "-o", str(out), "--model", str(seg_model_dir),
                   "--format", "pfm", *FAST])
    assert rc == 2 and "not a segmentation output" in capsys.readouterr().err


def test_missing_model_explains_where_to_get_weights(images, tmp_path, capsys):
    assert cli.main(["predict", str(images), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    for name in ("dpt_large-midas-2f21e586.pt", "dpt_hybrid-midas-501f0c75.pt", "isl-org/DPT", "Intel/dpt-large",
                 "Intel/dpt-hybrid-midas", "Intel/dpt-large-ade", "save_pretrained"):
        assert name in err
    assert cli.main(["predict", str(images), "-o", str(tmp_path / "o"), "--model", str(tmp_path / "nope.pt")]) == 2
    assert "Intel/dpt-large" in capsys.readouterr().err


def test_collect_inputs_and_names(tmp_path):
    root = tmp_path / "photos"
    for rel in ("x/photo.jpg", "x/photo.png", "y/z/pic.PNG", "y/.skip/pic.png", "top.webp"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    out = root / "depth"  # an output folder inside the input folder is never read back as input
    (out / "old.png").parent.mkdir(parents=True)
    (out / "old.png").write_bytes(b"")
    items, problems = predict.collect_inputs([root, str(root / "x" / "photo.jpg"), str(tmp_path / "missing"),
                                              str(root / "y" / "**" / "*.PNG")], exclude=out)
    rels = sorted(rel for _, rel in items)
    assert rels == ["top.webp", "x/photo.jpg", "x/photo.png", "y/z/pic.PNG"]  # duplicates kept once
    assert problems == [(str(tmp_path / "missing"), "no such file or directory")]
    jobs = predict.plan_jobs(items, out, ("png16", "color"))
    names = {j.rel: sorted(p.name for p in j.outputs.values()) for j in jobs}
    assert names["x/photo.jpg"] == ["photo.jpg-color.png", "photo.jpg.png"]  # colliding stems keep the extension
    assert names["top"] == ["top-color.png", "top.png"]
    items, _ = predict.collect_inputs([str(root / "y" / "*" / "*.PNG")])
    assert [rel for _, rel in items] == ["z/pic.PNG"]  # a glob names matches relative to its fixed prefix


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shard_covers_everything_once(world):
    jobs = list(range(23))
    shards = [predict.shard(jobs, rank, world) for rank in range(world)]
    assert sorted(j for s in shards for j in s) == jobs
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_torchrun_two_processes_shard_without_duplicates(images, tmp_path, depth_model_dir):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dpt_fast.cli", "predict", str(images), "-o", str(out), "--model", str(depth_model_dir),
           "--size", "64", "--format", "npy", *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log  # the corrupt file: both ranks agree that the run failed
    per_rank = {int(r): int(n) for r, n in re.findall(r"rank (\d) of 2: (\d+) written", log)}
    assert sorted(per_rank) == [0, 1], log
    assert sum(per_rank.values()) == len(GOOD) and min(per_rank.values()) >= 2  # no duplicates, both worked
    assert f"{len(GOOD)} written, 0 skipped (already done), 1 failed across 2 processes" in log
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))
    assert written == sorted(_stem(r) + ".npy" for r in GOOD)  # no misses


def test_image_io_round_trips(tmp_path):
    values = np.random.default_rng(0).random((7, 5)).astype(np.float32)
    image_io.write_pfm(tmp_path / "v.pfm", values)
    assert np.array_equal(image_io.read_pfm(tmp_path / "v.pfm"), values)
    levels = (values * 65535).astype(np.uint16)
    image_io.write_png16(tmp_path / "v.png", levels)
    assert np.array_equal(image_io.read_png16(tmp_path / "v.png"), levels)
    labels = np.arange(35, dtype=np.uint8).reshape(7, 5)
    image_io.write_palette_png(tmp_path / "l.png", labels)
    img = Image.open(tmp_path / "l.png")
    assert img.mode == "P" and np.array_equal(np.asarray(img), labels)
    assert image_io.colorize(values).shape == (7, 5, 3)
    assert len({tuple(c) for c in image_io.label_palette(256)}) == 256
    assert sorted(os.listdir(tmp_path)) == ["l.png", "v.pfm", "v.png"]  # no temporary files left


def test_same_names_from_two_folders_never_share_an_output(tmp_path):
    # `predict cam0 cam1` with cam0/f1.jpg and cam1/f1.jpg: both are named f1; neither output may
    # overwrite the other (nor may X.JPG and x.jpg on a case-insensitive file system).
    for rel in ("cam0/f1.jpg", "cam0/sub/f2.png", "cam1/f1.jpg", "cam1/sub/f2.png", "cam1/F3.JPG", "cam1/f3.jpg",
                "cam0/f4.jpg", "cam0/f4-color.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    items, _ = predict.collect_inputs([tmp_path / "cam0", tmp_path / "cam1"])
    formats = ("png16", "npy", "color")
    jobs = predict.plan_jobs(items, tmp_path / "out", formats)
    assert len(jobs) == 8
    outputs = [str(p).casefold() for j in jobs for p in j.outputs.values()]
    assert len(set(outputs)) == len(outputs) == 8 * len(formats)
    names = {j.src.relative_to(tmp_path).as_posix(): j.rel for j in jobs}
    assert names["cam0/f1.jpg"] == "cam0/f1" and names["cam1/f1.jpg"] == "cam1/f1"
    assert names["cam0/sub/f2.png"] == "cam0/sub/f2" and names["cam1/sub/f2.png"] == "cam1/sub/f2"
    again = predict.plan_jobs(list(reversed(items)), tmp_path / "out", formats)  # the same plan on every rank
    assert sorted((j.rel, str(j.src)) for j in again) == sorted((j.rel, str(j.src)) for j in jobs)


def test_outputs_never_overwrite_inputs(images, tmp_path, depth_model_dir, capsys):
    before = (images / "a.png").read_bytes()
    rc = cli.main(["predict", str(images / "a.png"), "-o", str(images), "--model", str(depth_model_dir), *FAST])
    assert rc == 2 and "would overwrite an input" in capsys.readouterr().err
    rc = cli.main(["predict", str(images), "-o", str(images), "--model", str(depth_model_dir), *FAST])
    assert rc == 2 and "is the input folder" in capsys.readouterr().err
    assert (images / "a.png").read_bytes() == before and not list(images.rglob("*.npy"))


def test_read_image_16_bit_exif_rotation_and_modes(tmp_path):
    rng = np.random.default_rng(1)
    levels = rng.integers(0, 65536, (9, 13)).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "g16.png")  # 16-bit greyscale: scaled to 8 bits, not clipped
    got = image_io.read_image(tmp_path / "g16.png")
    assert got.shape == (9, 13, 3) and got.dtype == np.uint8
    assert np.abs(got[..., 0].astype(int) - np.rint(levels / 257)).max() == 0 and (got[..., 0] == got[..., 2]).all()
    rgb = rng.integers(0, 256, (9, 13, 3)).astype(np.uint8)
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display", as phones write it
    img.save(tmp_path / "rot.png", exif=exif)
    assert np.array_equal(image_io.read_image(tmp_path / "rot.png"), np.rot90(rgb, -1))
    for mode in ("RGBA", "LA", "P", "CMYK", "I", "F"):  # alpha dropped, palette/CMYK/int/float converted
        path = tmp_path / f"m-{mode}.{'tif' if mode in ('CMYK', 'I', 'F') else 'png'}"
        img.convert(mode).save(path)
        assert image_io.read_image(path).shape == (9, 13, 3), mode
