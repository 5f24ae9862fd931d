"""Data: file formats, the folder layout, augmentation, the synthetic scenes, mixing and sharding."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dpt_fast.data import (FolderDataset, StreamSampler, SyntheticDataset, TrainStream, augment, build_datasets,
                           read_array, read_pfm, write_pfm)


def _image(path, height=6, width=8, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def test_pfm_round_trip_and_orientation(tmp_path):
    array = np.arange(12, dtype=np.float32).reshape(3, 4) - 2.5
    write_pfm(tmp_path / "a.pfm", array)
    np.testing.assert_array_equal(read_pfm(tmp_path / "a.pfm"), array)
    # big-endian file written by hand (positive scale), rows stored bottom-to-top
    with open(tmp_path / "b.pfm", "wb") as f:
        f.write(b"Pf\n2 2\n1.0\n")
        np.array([[3, 4], [1, 2]], dtype=">f4").tofile(f)
    np.testing.assert_array_equal(read_pfm(tmp_path / "b.pfm"), [[1, 2], [3, 4]])


def test_read_array_16_bit_png_and_npy(tmp_path):
    values = np.array([[0, 1000], [65535, 4242]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    np.testing.assert_array_equal(read_array(tmp_path / "d.png"), values.astype(np.float32))
    np.save(tmp_path / "d.npy", values.astype(np.float64) / 7)
    np.testing.assert_allclose(read_array(tmp_path / "d.npy"), values / 7, rtol=1e-6)


def test_folder_dataset_depth_png_with_scale_masks_and_invalid_zero(tmp_path):
    for d in ("images", "depth", "masks"):
        (tmp_path / d).mkdir()
    _image(tmp_path / "images" / "a.jpg", 2, 2)
    _image(tmp_path / "images" / "no_target.png", 2, 2)
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)).save(tmp_path / "depth" / "a.png")
    Image.fromarray(np.array([[255, 255], [255, 0]], dtype=np.uint8)).save(tmp_path / "masks" / "a.png")
    (tmp_path / "dataset.json").write_text(json.dumps({"depth_scale": 0.001}))
    ds = FolderDataset(tmp_path)
    assert len(ds) == 1
    s = ds.load(0)
    assert s["image"].shape == (2, 2, 3) and s["image"].dtype == np.uint8
    np.testing.assert_array_equal(s["mask"], [[False, True], [True, False]])  # 0 = invalid; masks/ = invalid
    np.testing.assert_allclose(s["disparity"], [[0, 1.0], [0.5, 0.25]])


def test_folder_dataset_disparity_pfm_and_segmentation_labels(tmp_path):
    for d in ("images", "disparity", "labels"):
        (tmp_path / d).mkdir()
    _image(tmp_path / "images" / "x.png", 2, 3)
    write_pfm(tmp_path / "disparity" / "x.pfm", np.array([[0.0, 1, np.inf], [2, 3, 4]], np.float32))
    s = FolderDataset(tmp_path).load(0)
    np.testing.assert_array_equal(s["mask"], [[True, True, False], [True, True, True]])  # 0 disparity is valid
    np.testing.assert_array_equal(s["disparity"], [[0, 1, 0], [2, 3, 4]])
    Image.fromarray(np.array([[0, 1, 2], [150, 3, 0]], np.uint8)).save(tmp_path / "labels" / "x.png")
    seg = FolderDataset(tmp_path, task="segmentation", reduce_zero_label=True).load(0)
    np.testing.assert_array_equal(seg["label"], [[255, 0, 1], [149, 2, 255]])
    assert "disparity" not in seg


def test_folder_dataset_explains_a_wrong_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="images/"):
        FolderDataset(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="depth/ or disparity/"):
        FolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="labels/"):
        FolderDataset(tmp_path, task="segmentation")


def _coordinate_sample(height, width):
    """An image and targets that all encode the column index, to follow flips and crops."""
    cols = np.broadcast_to(np.arange(width, dtype=np.float32), (height, width))
    image = np.repeat((cols * 255 / max(width - 1, 1)).round().astype(np.uint8)[..., None], 3, -1)
    return {"image": image, "disparity": cols + 1.0, "mask": np.ones((height, width), bool),
            "label": np.broadcast_to(np.arange(width), (height, width)).astype(np.int64)}


def test_augment_resizes_longer_side_pads_and_flips_consistently():
    sample = _coordinate_sample(20, 40)  # landscape: resized to 16 x 32 for size 32, padded to 32 x 32
    flipped, tops = 0, set()
    for seed in range(40):
        out = augment(sample, 32, np.random.default_rng(seed))
        assert out["image"].shape == (3, 32, 32) and out["disparity"].shape == (32, 32)
        rows = out["mask"].any(1)
        assert rows.sum() == 16 and out["mask"][rows].all()  # 16 image rows, placed at random, padding invalid
        assert (out["label"][~rows] == 255).all() and (out["image"][:, ~rows] == 0).all()
        tops.add(int(rows.float().argmax()))
        disparity = out["disparity"][rows][0]
        increasing = bool((disparity[1:] >= disparity[:-1]).all())
        decreasing = bool((disparity[1:] <= disparity[:-1]).all())
        assert increasing != decreasing  # flipped or not, never scrambled
        image_row = out["image"][0][rows][0]
        assert bool((image_row[1:] >= image_row[:-1] - 1e-6).all()) == increasing  # image flipped with it
        assert bool((out["label"][rows][0][1:] >= out["label"][rows][0][:-1]).all()) == increasing
        flipped += decreasing
    assert 5 < flipped < 35 and len(tops) > 5


def test_augment_random_scale_crops_a_larger_image():
    sample = _coordinate_sample(30, 30)
    out = augment(sample, 16, np.random.default_rng(0), scale_range=(2.0, 2.0), flip=False)
    assert out["mask"].all()  # 32 x 32 resized, a 16 x 16 window inside it
    np.testing.assert_array_equal(out["image"].shape, (3, 16, 16))


def test_synthetic_scenes_are_deterministic_and_consistent():
    ds = SyntheticDataset(length=50, resolution=48, num_classes=6, seed=3)
    a, b = ds.load(7), ds.load(7)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["disparity"][:8, :8], ds.load(8)["disparity"][:8, :8])
    for i in range(10):
        s = ds.load(i)
        assert max(s["image"].shape[:2]) == 48
        assert s["image"].shape[:2] == s["disparity"].shape == s["mask"].shape == s["label"].shape
        assert np.isfinite(s["disparity"]).all() and (s["disparity"] > 0).all()
        assert s["label"].min() >= 0 and s["label"].max() < 6
        floor = s["label"] == 0
        if floor.any():  # the floor is a plane: disparity is affine in the image row (z-depth of a plane)
            rows, cols = np.nonzero(floor)
            design = np.stack([rows, cols, np.ones_like(rows)], 1).astype(np.float64)
            coef, *_ = np.linalg.lstsq(design, s["disparity"][floor].astype(np.float64), rcond=None)
            np.testing.assert_allclose(design @ coef, s["disparity"][floor], rtol=1e-4, atol=1e-6)
    with pytest.raises(IndexError):
        ds.load(50)


def test_stream_is_a_pure_function_of_the_index_and_one_dataset_epochs_are_permutations():
    ds = SyntheticDataset(length=10, resolution=40)
    one, two = TrainStream([ds], 32, seed=1), TrainStream([ds], 32, seed=1)
    for i in (0, 13, 5):
        for key, value in one[i].items():
            assert torch.equal(value, two[i][key])
    assert sorted(one.locate(i)[1] for i in range(10)) == list(range(10))
    assert sorted(one.locate(i)[1] for i in range(10, 20)) == list(range(10))
    assert [one.locate(i)[1] for i in range(10)] != [one.locate(i)[1] for i in range(10, 20)]


def test_mixing_draws_datasets_uniformly_whatever_their_size():
    small, large = SyntheticDataset(length=2, resolution=32), SyntheticDataset(length=1000, resolution=32)
    stream = TrainStream([small, large], 32)
    picks = [stream.locate(i)[0] for i in range(2000)]
    assert 0.45 < picks.count(0) / 2000 < 0.55


def test_rank_shards_of_the_sampler_make_up_the_single_process_batches():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    single = take(StreamSampler(8, start_sample=16), 24)
    ranks = [take(StreamSampler(8, start_sample=16, rank=r, world=2), 12) for r in range(2)]
    for step in range(3):
        assert single[step * 8:(step + 1) * 8] == ranks[0][step * 4:(step + 1) * 4] + ranks[1][step * 4:(step + 1) * 4]
    with pytest.raises(ValueError):
        StreamSampler(6, world=4)


def test_build_datasets_mixes_synthetic_and_folders(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "disparity").mkdir()
    _image(tmp_path / "images" / "a.png")
    np.save(tmp_path / "disparity" / "a.npy", np.ones((6, 8), np.float32))
    datasets = build_datasets(["synthetic:20", str(tmp_path)], "depth")
    assert len(datasets[0]) == 20 and isinstance(datasets[1], FolderDataset)
    batch = torch.utils.data.default_collate([TrainStream(datasets, 16)[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].dtype == torch.bool
