"""Training Depth Anything: --init of release-layout files (relative and metric), --arch for a fresh model,
the encoder's own learning rate, the model's normalisation and input multiple, and an exact resume.

The model is a tiny DINOv2 (64 wide, one 64-wide head, five blocks) under a narrow decoder, written as an
original-release file; its encoder is none of the released sizes, so --hooks gives its taps."""
import json
import re
import shlex

import numpy as np
import pytest
import torch

import dpt_fast
from dpt_fast import specs
from dpt_fast import train as trainer
from dpt_fast.data import SyntheticDataset, TrainStream
from dpt_fast.losses import silog_loss
from dpt_fast.models import DepthAnythingModel, DPTDepthModel
from helpers import README
from helpers import one_thread  # noqa: F401 (autouse: one intra-op thread)
from train_helpers import SignalAt, assert_same_run, run_metrics

TAPS = [0, 1, 3, 4]
RUN = dict(data=["synthetic"], hooks=TAPS, size=56, batch_size=4, num_workers=0, backend="reference", device="cpu",
           log_every=1, progress=False)


def _tiny(metric=False, seed=0):
    torch.manual_seed(seed)
    return DepthAnythingModel("da2-metric-hypersim-small" if metric else "da2-small", taps=TAPS, features=32,
                              out_channels=[16, 24, 32, 48], head_hidden=16,
                              vit_kwargs=dict(embed_dim=64, depth=5, num_heads=1, mlp_ratio=2, img_size=224))


def _release_file(folder, metric=False):
    """A release-layout state dict under the release's file name (which tells V2, metric and max_depth)."""
    name = "depth_anything_v2_metric_hypersim_vits.pth" if metric else "depth_anything_v2_vits.pth"
    torch.save(_tiny(metric).state_dict(), folder / name)
    return str(folder / name)


def _fell(losses, fraction):
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < fraction * first, (first, last)


def test_init_of_a_relative_release_file_learns_with_the_encoder_ten_times_slower(tmp_path):
    init = _release_file(tmp_path)
    result = trainer.train(RUN, init=init, steps=40, lr=1e-3, out=str(tmp_path / "run"))
    model = result["model"]
    assert isinstance(model, DepthAnythingModel) and not model.metric
    _fell([r["loss"] for r in run_metrics(tmp_path / "run")], 0.7)

    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["optimizer"] == "adamw" and args["schedule"] == "poly" and args["weight_decay"] == 0.01
    assert args["depth_loss"] == "ssitrim" and args["backbone_lr"] == pytest.approx(1e-4)
    first = run_metrics(tmp_path / "run")[0]
    assert first["lr"] == 1e-3 and first["backbone_lr"] == pytest.approx(1e-4)
    # the encoder group is the whole DINOv2 (pretrained.*), the decoder group everything else
    groups = trainer.param_groups(model, 1.0, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    encoder = {names[id(p)] for p in groups[0]["params"]}
    assert "pretrained.blocks.0.attn.qkv.weight" in encoder and "pretrained.patch_embed.proj.weight" in encoder
    assert encoder == {n for n, p in model.named_parameters() if n.startswith("pretrained.") and p.requires_grad}
    assert groups[0]["lr"] == 0.1 and groups[1]["lr"] == 1.0
    assert all(not names[id(p)].startswith("pretrained.") for p in groups[1]["params"])
    # what it saved is a Depth Anything model again
    saved = dpt_fast.load_model(tmp_path / "run" / "model")
    assert isinstance(saved, DepthAnythingModel) and saved.config["arch"] == "da2-small"


def test_the_recipe_defaults_are_the_original_metric_fine_tuning():
    recipe = trainer.RECIPES[("depth_anything_metric", "depth")]
    assert (recipe["optimizer"], recipe["lr"], recipe["weight_decay"], recipe["schedule"]) == ("adamw", 5e-5, 0.01, "poly")
    assert recipe["depth_loss"] == "silog" and recipe["size"] == specs.get("da2-small").train_size == 518
    args = trainer._resolve({"data": ["synthetic"]})
    trainer._apply_recipe(args, _tiny(metric=True))
    assert args.backbone_lr == pytest.approx(5e-6) and args.grad_loss_weight == 0.0
    # a DPT keeps the DPT paper's
    dpt = trainer._resolve({"data": ["synthetic"]})
    trainer._apply_recipe(dpt, DPTDepthModel(backbone="vit_tiny_patch16_224", hooks=[0, 1, 2, 3], features=32))
    assert (dpt.optimizer, dpt.lr, dpt.backbone_lr, dpt.size) == ("adam", 1e-4, pytest.approx(1e-5), 384)


def test_init_of_a_metric_release_file_trains_metres_with_silog(tmp_path, monkeypatch):
    init = _release_file(tmp_path, metric=True)
    calls = []
    original = silog_loss

    def recording(pred, target, mask=None, **kw):
        calls.append((pred.detach(), target, mask, kw))
        return original(pred, target, mask, **kw)
    monkeypatch.setattr(trainer, "silog_loss", recording)
    monkeypatch.setattr(trainer, "estimate_metric_alignment", lambda *a, **k: pytest.fail("no alignment for metric"))
    result = trainer.train(RUN, init=init, steps=40, lr=1e-3, out=str(tmp_path / "run"))
    model = result["model"]
    assert model.metric and model.max_depth == 20.0 and not hasattr(model, "invert")
    assert json.loads((tmp_path / "run" / "args.json").read_text())["depth_loss"] == "silog"
    _fell([r["loss"] for r in run_metrics(tmp_path / "run")], 0.8)

    # the loss sees the prediction in metres against depth = 1 / disparity, the original's root form,
    # without the pixels beyond max_depth
    pred, target, mask, kw = calls[0]
    assert kw == {"root": True} and len(calls) == 40
    assert 0 < pred.min() and pred.max() < 20.0
    assert target[mask].max() <= 20.0 and target[mask].min() > 0
    # and the trained model predicts metres at the scale of the data
    sample = TrainStream([SyntheticDataset(4, 70, seed=99)], 56, keys=("image", "disparity", "mask"),
                         flip=False, mean=model.preprocessing.mean, std=model.preprocessing.std, cover=True)
    batch = torch.utils.data.default_collate([sample[i] for i in range(4)])
    with torch.no_grad():
        depth = model.eval()(batch["image"])
    truth = 1 / batch["disparity"][batch["mask"]]
    ratio = depth[batch["mask"]].median() / truth.median()
    assert 0.5 < ratio < 2.0, ratio


def _readme_lines() -> list[list[str]]:
    section = README.read_text().split("## Training", 1)[1].split("\n## ", 1)[0]
    return [shlex.split(line)[2:] for line in re.findall(r"^dpt-fast train .*$", section, re.M)]


def test_the_readme_training_lines_parse_and_their_depth_anything_sizes_fit():
    lines = _readme_lines()
    assert any("--arch" in flags for flags in lines) and any("--init" in flags and any(
        "depth_anything" in f for f in flags) for flags in lines)
    for flags in lines:
        args = trainer.train_parser().parse_args(flags)
        if args.arch and specs.get(args.arch).family == "depth_anything" and args.size:
            assert args.size % 14 == 0, flags


def test_the_readme_fresh_arch_line_learns_and_its_output_varies(tmp_path):
    flags = next(flags for flags in _readme_lines() if "--arch" in flags)
    flags[flags.index("--out") + 1] = str(tmp_path / "run")
    assert trainer.main([*flags, "--num-workers", "0", "--backend", "reference", "--device", "cpu",
                         "--log-every", "1", "--no-progress"]) == 0
    _fell([r["loss"] for r in run_metrics(tmp_path / "run")], 0.8)
    model = dpt_fast.load_model(tmp_path / "run" / "model").eval()
    assert isinstance(model, DepthAnythingModel) and model.config["arch"] == "da2-small"
    size = int(flags[flags.index("--size") + 1])
    with torch.no_grad(), dpt_fast.use_backend("reference"):
        out = model(torch.randn(2, 3, size, size))
    assert out.std() > 1e-3 * out.abs().mean()


@pytest.mark.parametrize("metric", [False, True])
def test_a_fresh_head_starts_alive(metric):
    """Relative: the final ReLU's input is positive at every pixel (else no gradient ever flows);
    metric: the sigmoid starts at its steepest point, half of max_depth."""
    for seed in range(4):
        model = _tiny(metric, seed=seed).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 56, 56))
        if metric:
            assert torch.allclose(out, torch.full_like(out, model.max_depth / 2), rtol=0.1), seed
        else:
            assert (out > 0).all(), seed


def test_training_images_carry_the_models_normalisation(tmp_path, monkeypatch):
    seen = {}
    original = trainer.TrainStream

    def recording(*a, **kw):
        seen.update(kw)
        return original(*a, **kw)
    monkeypatch.setattr(trainer, "TrainStream", recording)
    trainer.train(RUN, init=_release_file(tmp_path), steps=1, out=str(tmp_path / "run"))
    assert seen["mean"] == specs.IMAGENET_MEAN and seen["std"] == specs.IMAGENET_STD and seen["cover"]
    # the stream normalises with them: a mid-grey image becomes (0.5 - mean) / std per channel
    grey = {"image": np.full((30, 40, 3), 128, np.uint8), "disparity": np.ones((30, 40), np.float32)}
    stream = TrainStream([_Fixed(grey)], 28, keys=("image", "disparity"), mean=specs.IMAGENET_MEAN,
                         std=specs.IMAGENET_STD, cover=True, flip=False)
    image = stream[0]["image"]
    expected = (128 / 255 - np.array(specs.IMAGENET_MEAN)) / np.array(specs.IMAGENET_STD)
    torch.testing.assert_close(image[:, 0, 0], torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    # cover: the shorter side is resized to the crop, so the crop holds no padding
    assert stream[0]["disparity"].min() == 1.0


class _Fixed:
    def __init__(self, sample):
        self.sample = sample

    def __len__(self):
        return 1

    def load(self, index):
        return dict(self.sample)


def test_a_size_that_is_no_multiple_of_14_is_refused(tmp_path, capsys):
    init = _release_file(tmp_path)
    code = trainer.main(["--data", "synthetic", "--init", init, "--hooks", "0,1,3,4", "--size", "64", "--steps", "1",
                         "--num-workers", "0", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == ("dpt-fast train: error: --size 64 is not a multiple of 14, the input multiple of this "
                       "DepthAnythingModel: use --size 56 or 70")
    assert not (tmp_path / "run").exists()


def test_losses_that_do_not_fit_the_model_are_refused(tmp_path):
    with pytest.raises(trainer.UsageError, match="is metric .*--depth-loss silog"):
        trainer.train(RUN, init=_release_file(tmp_path, metric=True), depth_loss="ssimse", steps=1,
                      out=str(tmp_path / "a"))
    with pytest.raises(trainer.UsageError, match="needs a metric model"):
        trainer.train(RUN, init=_release_file(tmp_path), depth_loss="silog", steps=1, out=str(tmp_path / "b"))
    with pytest.raises(trainer.UsageError, match="only one of them"):
        trainer.train(RUN, init=_release_file(tmp_path), arch="da2-small", steps=1, out=str(tmp_path / "c"))
    with pytest.raises(trainer.UsageError, match="unknown architecture"):
        trainer.train(RUN, arch="da9-tiny", steps=1, out=str(tmp_path / "d"))


def test_resumed_depth_anything_run_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    options = dict(RUN, init=_release_file(tmp_path, metric=True), steps=6, batch_size=2, lr=1e-3, save_every=2)
    whole = trainer.train(options, out=str(tmp_path / "whole"))
    # Ctrl-C during step 3: the step finishes, then the run saves and stops
    monkeypatch.setattr(trainer, "_loss_fn", SignalAt(3))
    with pytest.raises(KeyboardInterrupt):
        trainer.train(options, out=str(tmp_path / "parts"))
    monkeypatch.undo()
    resumed = trainer.train({"resume": "auto", "out": str(tmp_path / "parts")})
    assert resumed["step"] == 6 and isinstance(resumed["model"], DepthAnythingModel) and resumed["model"].metric
    assert_same_run(whole, resumed, tmp_path / "whole", tmp_path / "parts", steps=6)


def test_an_arch_run_records_its_architecture_and_resumes_only_as_it(tmp_path):
    out = str(tmp_path / "run")
    trainer.train(dict(RUN, arch="da2-small", hooks=[0, 1, 2, 3], size=42), steps=0, out=out)
    assert json.loads((tmp_path / "run" / "args.json").read_text())["arch"] == "da2-small"
    with pytest.raises(trainer.UsageError, match=r'--arch "da2-base" \(recorded: "da2-small"\) differs'):
        trainer.train({"resume": "auto", "out": out, "arch": "da2-base", "steps": 1})
    resumed = trainer.train({"resume": "auto", "out": out, "steps": 1})
    assert resumed["model"].config["arch"] == "da2-small" and resumed["step"] == 1


def test_init_of_a_transformers_folder_fine_tunes_it(tmp_path):
    pytest.importorskip("transformers")
    from da_helpers import hf_model
    hf_model(2, metric=True, max_depth=20).save_pretrained(tmp_path / "hf")
    result = trainer.train({**RUN, "hooks": None}, init=str(tmp_path / "hf"), steps=2, out=str(tmp_path / "run"))
    model = result["model"]
    assert isinstance(model, DepthAnythingModel) and model.metric and model.max_depth == 20
    assert model.pos_embed_rule == "bicubic_size"  # transformers' position resize travels with its weights
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["depth_loss"] == "silog" and args["optimizer"] == "adamw"
    assert dpt_fast.load_model(tmp_path / "run" / "model").pos_embed_rule == "bicubic_size"


def test_root_silog_is_the_square_root_of_silog():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(3, 8, 8, generator=g) * 10 + 0.1, torch.rand(3, 8, 8, generator=g) * 10 + 0.1
    mask = torch.rand(3, 8, 8, generator=g) > 0.3
    per_image = silog_loss(pred, target, mask, reduction="none")
    torch.testing.assert_close(silog_loss(pred, target, mask, reduction="none", root=True), per_image.sqrt())
    torch.testing.assert_close(silog_loss(pred, target, mask, root=True), per_image.sqrt().mean())
    # reduction="batch": over all valid pixels of the batch, as the original's loss over a GPU's batch
    d = torch.log(pred[mask]) - torch.log(target[mask])
    torch.testing.assert_close(silog_loss(pred, target, mask, reduction="batch", root=True),
                               (d.pow(2).mean() - 0.5 * d.mean() ** 2).sqrt())


def test_init_of_a_depth_anything_training_checkpoint_starts_from_its_weights_and_config(tmp_path):
    first = trainer.train(RUN, init=_release_file(tmp_path, metric=True), steps=2, out=str(tmp_path / "a"))
    # --hooks given again: a training checkpoint records its taps, the flag must not re-read its keys
    second = trainer.train(RUN, init=str(tmp_path / "a" / "checkpoint.pt"), steps=0, out=str(tmp_path / "b"))
    model = second["model"]
    assert isinstance(model, DepthAnythingModel) and model.metric and model.config == first["model"].config
    trained = first["model"].state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)
