"""dpt_fast.inference, the batch-inference library: its Python API, the output manifest (outputs are
never written over files it did not write; "done" means same model and settings), hostile input
folders (link loops, FIFOs, huge headers), allocation failures, and the original's segmentation
post-processing. CPU, reference operators, tiny models."""
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpt_fast import DPTDepthModel, DPTSegmentationModel, image_io, inference, use_backend
from dpt_fast.transforms import preprocess, resize_prediction, segmentation_labels
from model_helpers import TINY, randomize_

SIZES = {"a.png": (40, 56), "b.jpg": (50, 38), "sub/c.png": (33, 45)}


@pytest.fixture(scope="module")
def depth_model():
    torch.manual_seed(0)
    return randomize_(DPTDepthModel(**TINY), matrix_std=0.05).eval()


@pytest.fixture(scope="module")
def seg_model():
    torch.manual_seed(0)
    return randomize_(DPTSegmentationModel(5, **TINY), seed=1, matrix_std=0.05).eval()


@pytest.fixture()
def photos(tmp_path):
    rng = np.random.default_rng(0)
    for rel, (h, w) in SIZES.items():
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "in" / rel)
    return tmp_path / "in"


def _run(model, inputs, out, **kwargs):
    with use_backend("reference"):
        return inference.predict_images(model, inputs, out, **{"size": 64, "formats": ("npy",), **kwargs})


def _direct(model, path, size=64):
    image = torch.from_numpy(image_io.read_image(path)).permute(2, 0, 1)
    with torch.no_grad(), use_backend("reference"):
        return resize_prediction(model(preprocess(image, size=size)), image.shape[-2:])[0].numpy()


def test_predict_images_api_writes_what_the_model_predicts(depth_model, photos, tmp_path):
    out = tmp_path / "out"
    summary = _run(depth_model, [photos], out)
    assert summary.ok and summary.written == 3 and summary.skipped == 0, summary
    for rel in SIZES:
        got = np.load(out / (os.path.splitext(rel)[0] + ".npy"))
        np.testing.assert_allclose(got, _direct(depth_model, photos / rel), rtol=1e-4, atol=1e-5)
    again = _run(depth_model, [photos], out)
    assert again.written == 0 and again.skipped == 3


def test_other_model_or_settings_recompute_and_the_manifest_says_which(depth_model, photos, tmp_path):
    out = tmp_path / "out"
    _run(depth_model, [photos], out, model_id="first")
    records = [json.loads(line) for line in (out / inference.MANIFEST_NAME).read_text().splitlines()]
    assert {r["output"] for r in records} == {"a.npy", "b.npy", "sub/c.npy"}
    assert all(r["settings"]["model"] == "first" and r["settings"]["size"] == 64 and r["settings"]["format"] == "npy"
               for r in records)
    assert _run(depth_model, [photos], out, model_id="second").written == 3   # another model: recomputed
    assert _run(depth_model, [photos], out, model_id="second", size=96).written == 3  # another size
    assert np.load(out / "a.npy").shape == SIZES["a.png"]
    np.testing.assert_allclose(np.load(out / "a.npy"), _direct(depth_model, photos / "a.png", 96), rtol=1e-4, atol=1e-5)
    assert _run(depth_model, [photos], out, model_id="second", size=96).skipped == 3


def test_a_file_it_did_not_write_is_never_replaced(depth_model, photos, tmp_path):
    # the user's own photo.png beside the depth map of photo.jpg: a conflict, even with overwrite
    (photos / "photo.jpg").write_bytes((photos / "b.jpg").read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    mine = b"the user's own picture"
    (out / "photo.png").write_bytes(mine)
    for overwrite in (False, True):
        summary = _run(depth_model, [photos], out, formats=("png16",), overwrite=overwrite)
        assert (out / "photo.png").read_bytes() == mine
        assert [src for src, _ in summary.conflicts] == [str(photos / "photo.jpg")]
        assert "not written by dpt-fast" in summary.conflicts[0][1] and not summary.ok
    # its own outputs, even touched since, stay its own: a re-run skips them
    os.utime(out / "a.png", (1_000_000_000, 1_000_000_000))
    assert _run(depth_model, [photos], out, formats=("png16",)).skipped == 3


def test_a_file_appearing_while_writing_is_not_replaced(depth_model, photos, tmp_path):
    out = tmp_path / "out"
    manifest = inference.OutputManifest(out)
    job = inference.Job(photos / "a.png", "a", {"npy": out / "a.npy"})
    out.mkdir()
    (out / "a.npy").write_bytes(b"someone else's")
    with pytest.raises(inference.OutputConflict):
        inference.write_outputs(job, torch.zeros(2, 2), manifest=manifest, settings={})
    assert (out / "a.npy").read_bytes() == b"someone else's" and not [p for p in out.iterdir() if p.suffix == ".tmp"]


def test_folder_walk_survives_link_loops_and_skips_fifos(photos):
    (photos / "sub" / "up").symlink_to("..")               # a loop
    (photos / "sub" / "again").symlink_to(photos / "sub")  # the same folder twice
    os.mkfifo(photos / "pipe.png")                         # would block a reader forever
    skipped = []
    result = {}
    walker = threading.Thread(target=lambda: result.update(
        found=inference.collect_inputs([photos], skipped=skipped)), daemon=True)
    walker.start()
    walker.join(60)
    assert "found" in result, "the folder walk did not end"
    items, problems = result["found"]
    assert sorted(rel for _, rel in items) == sorted(SIZES) and not problems
    assert skipped == [(str(photos / "pipe.png"), "not a regular file (a FIFO, socket, device or broken link)")]
    items, problems = inference.collect_inputs([photos / "pipe.png"])  # named explicitly: a problem, not a hang
    assert not items and "not a regular file" in problems[0][1]


def test_read_image_never_opens_a_fifo_for_blocking_reads(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    result = {}

    def read():
        try:
            image_io.read_image(tmp_path / "pipe.png")
        except Exception as e:  # noqa: BLE001
            result["error"] = e
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    assert isinstance(result.get("error"), image_io.ImageReadError), "read_image blocked on a FIFO"
    assert "not a regular file" in str(result["error"])


def _png_header(path, width, height):
    """A PNG that claims width x height but holds no pixel data: tiny on disk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_pixel_limit_is_the_documented_one_and_checked_from_the_header(tmp_path):
    # 1.2 gigapixels: over the documented 2**30, under Pillow's own refusal at twice its limit
    _png_header(tmp_path / "huge.png", 40000, 30000)
    with pytest.raises(image_io.ImageReadError, match="over the limit of 1073741824 pixels"):
        image_io.read_image(tmp_path / "huge.png")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "small.png")
    assert image_io.read_image(tmp_path / "small.png", max_pixels=120).shape == (10, 12, 3)  # exactly at the limit
    with pytest.raises(image_io.ImageReadError, match="over the limit of 119 pixels"):
        image_io.read_image(tmp_path / "small.png", max_pixels=119)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(image_io.ImageReadError, match="not an image file"):
        image_io.read_image(tmp_path / "notes.png")


class _AllocatorLimit(torch.nn.Module):
    """The model, failing as an allocator does for inputs of `limit` pixels or more."""

    def __init__(self, model, limit, error):
        super().__init__()
        self.model, self.limit, self.error = model, limit, error

    def forward(self, x):
        if x.shape[-2] * x.shape[-1] >= self.limit:
            raise self.error
        return self.model(x)


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("DefaultCPUAllocator: not enough memory: you tried "
                                                                "to allocate 123456789 bytes")])
def test_allocation_failure_skips_that_image_and_the_run_goes_on(depth_model, photos, tmp_path, error):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8) + 100).save(photos / "small.png")
    limited = _AllocatorLimit(depth_model, 32 * 32, error)
    with use_backend("reference"):
        summary = inference.predict_images(depth_model, [photos], tmp_path / "out", size="native", formats=("npy",),
                                           compiled=limited, model_id="m")
    failed = sorted(Path(src).name for src, _ in summary.failures)
    assert failed == ["a.png", "b.jpg", "c.png"] and all("out of memory" in why for _, why in summary.failures)
    assert summary.written == 1 and np.load(tmp_path / "out" / "small.npy").shape == (20, 30)


def test_constant_output_is_reported(photos, tmp_path):
    dead = DPTDepthModel(**TINY).eval()
    with torch.no_grad():
        last = dead.scratch.output_conv[4]  # the conv before the final ReLU: negative everywhere
        last.weight.zero_()
        last.bias.fill_(-1.0)
    summary = _run(dead, [photos], tmp_path / "out")
    assert sorted(Path(p).name for p in summary.constant) == ["a.png", "b.jpg", "c.png"]


def test_stale_temporaries_of_dead_processes_are_removed_on_start(depth_model, photos, tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    dead_pid = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = out / "sub" / f".c.npy.{dead_pid}-0123abcd.tmp"
    live = out / f".a.npy.{os.getpid()}-0123abcd.tmp"  # a live writer's file is left alone
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    _run(depth_model, [photos], out)
    assert not stale.exists() and live.exists()


def test_stop_event_ends_the_run_with_everything_computed_written(depth_model, photos, tmp_path):
    stop = threading.Event()
    stop.set()
    summary = _run(depth_model, [photos], tmp_path / "out", stop=stop)
    assert summary.stopped and summary.written == 0 and summary.remaining == 3
    summary = _run(depth_model, [photos], tmp_path / "out")
    assert summary.written == 3


def test_segmentation_follows_the_original_post_processing_and_picture(seg_model, photos, tmp_path):
    out = tmp_path / "out"
    with use_backend("reference"):
        summary = inference.predict_images(seg_model, [photos / "a.png"], out, size=64,
                                           formats=("png", "npy", "color"))
    assert summary.ok
    image = image_io.read_image(photos / "a.png")
    with torch.no_grad(), use_backend("reference"):
        logits = seg_model(preprocess(torch.from_numpy(image).permute(2, 0, 1), size=64))
    # the original: logits resized bicubically (align_corners=False), argmax, + 1 (ADE20K's ids)
    expected = torch.nn.functional.interpolate(logits, size=image.shape[:2], mode="bicubic",
                                               align_corners=False).argmax(1)[0].numpy() + 1
    labels = np.load(out / "a.npy")
    assert np.array_equal(labels, expected)
    assert np.array_equal(segmentation_labels(logits, image.shape[:2])[0].numpy(), expected)
    palette_png = Image.open(out / "a.png")
    assert np.array_equal(np.asarray(palette_png), labels)
    assert palette_png.getpalette()[:6] == [0, 0, 0, 120, 120, 120]  # ADE20K's colours
    # the colour picture as the original draws it: ADE20K palette blended 50/50 with the photo by PIL
    mask = Image.fromarray(labels.astype(np.uint8), "P")
    mask.putpalette(image_io.ADE20K_PALETTE.reshape(-1).tolist())
    drawn = Image.blend(Image.fromarray(image).convert("RGBA"), mask.convert("RGBA"), 0.5)
    assert np.array_equal(np.asarray(Image.open(out / "a-color.png")), np.asarray(drawn)[..., :3])


def test_cudnn_autotune_is_scoped_to_the_run():
    before = torch.backends.cudnn.benchmark
    with inference._cudnn_autotune(torch.device("cuda"), not before):
        assert torch.backends.cudnn.benchmark is (not before)
    assert torch.backends.cudnn.benchmark is before  # the process's setting is left as it was
    with inference._cudnn_autotune(torch.device("cpu"), not before):
        assert torch.backends.cudnn.benchmark is before


def test_native_size_is_the_size_depth_anything_runs_at():
    """Rounding to the patch multiple is written once (transforms.nearest_multiple): the engine's
    processed size at native resolution is the size DepthAnythingModel.prepare_input runs the image at."""
    from types import SimpleNamespace

    from dpt_fast import DepthAnythingModel
    from dpt_fast.specs import DEPTH_ANYTHING_PREPROCESSING
    from dpt_fast.transforms import nearest_multiple
    stub = SimpleNamespace(pretrained=SimpleNamespace(cls_token=torch.zeros(1)), patch_size=14)
    predictor = inference.Predictor(torch.nn.Identity(), "cpu", size=None,
                                    preprocessing=DEPTH_ANYTHING_PREPROCESSING)
    for side in (1, 6, 7, 8, 21, 35, 40, 518, 531):
        _, (run_h, run_w) = DepthAnythingModel.prepare_input(stub, torch.zeros(1, 3, side, 2 * side))
        assert (run_h, run_w) == predictor.processed_size(side, 2 * side)
        assert run_h == nearest_multiple(side, 14) and run_h % 14 == 0 and run_h > 0
    assert nearest_multiple(21, 14) == 28 and nearest_multiple(35, 14) == 28  # ties to even, as numpy


def test_a_bfloat16_depth_model_runs_its_head_in_float32(tmp_path):
    """predict_images, like `dpt-fast predict`, keeps a 16-bit depth model's head in float32: the
    prediction has float32's resolution, so the 16-bit PNG is not banded to bfloat16's 8 bits."""
    torch.manual_seed(0)
    model = randomize_(DPTDepthModel(**TINY), matrix_std=0.05).eval().to(torch.bfloat16)
    (tmp_path / "in").mkdir()
    # 64x64 at size 64: the prediction is the head's output itself, not resized
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in/a.png")
    summary = _run(model, [tmp_path / "in"], tmp_path / "out", formats=("npy", "png16"), dtype=torch.bfloat16)
    assert summary.ok and summary.written == 1, summary
    depth = np.load(tmp_path / "out/a.npy")
    assert not np.array_equal(torch.from_numpy(depth).bfloat16().float().numpy(), depth)  # not bfloat16 values
    assert len(np.unique(np.asarray(Image.open(tmp_path / "out/a.png")))) > 256
    head = model.scratch.output_conv
    assert all(p.dtype == torch.float32 for p in head.parameters())
    assert next(model.parameters()).dtype == torch.bfloat16  # the rest stays in bfloat16
    # the model keeps one identity: a second run finds its outputs done, and the head one hook
    again = _run(model, [tmp_path / "in"], tmp_path / "out", formats=("npy", "png16"), dtype=torch.bfloat16)
    assert again.skipped == 1
    assert len(head._forward_pre_hooks) == 1 and not inference.keep_head_float32(model)
    # the caller's model still runs in bfloat16 after `model.to(...)`, its head included
    x = torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)
    assert model.to(torch.bfloat16)(x).dtype == torch.bfloat16


def test_float32_head_false_leaves_the_model_as_it_is(seg_model, tmp_path):
    torch.manual_seed(0)
    model = randomize_(DPTDepthModel(**TINY), matrix_std=0.05).eval().to(torch.bfloat16)
    assert not inference.keep_head_float32(seg_model)  # segmentation: labels, not 16-bit depth
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "in/a.png")
    _run(model, [tmp_path / "in"], tmp_path / "out", dtype=torch.bfloat16, float32_head=False)
    head = model.scratch.output_conv
    assert head[0].weight.dtype == torch.bfloat16 and not head._forward_pre_hooks
