"""Training and fine-tuning DPT: `dpt-fast train ...` (or `python -m dpt_fast.train ...`) and `train()`.

The paper's protocols are the defaults:
- depth: Adam, learning rate 1e-4 for the decoder and 1e-5 for the backbone (`--lr` sets the decoder's,
  the backbone gets lr/10 unless `--backbone-lr`), the scale-and-shift-invariant trimmed loss on
  inverse depth plus 0.5 x the multi-scale gradient-matching loss, random square crops of `--size`
  (384) after resizing the longer side to it, horizontal flips, datasets mixed uniformly.
- metric fine-tuning (`--depth-loss silog`, NYU/KITTI): the initial network is first aligned (one scale
  and shift for the whole training set, the average of per-sample robust least-squares fits, set as the
  model's scale/shift/invert), then trained with Eigen et al.'s scale-invariant log loss
  (`--grad-loss-weight 0` for sparse ground truth such as KITTI).
- segmentation: SGD (momentum 0.9) with polynomial decay (power 0.9), lr 0.002, cross-entropy plus
  0.2 x the auxiliary head's, crops of 480, random rescaling in (0.5, 2).
- Depth Anything (`--init` of a release file, a transformers folder or a dpt_fast folder, or `--arch
  da2-small` etc. for a fresh model): the original metric fine-tuning's optimiser, AdamW (weight decay
  0.01) with polynomial decay (power 0.9), 5e-5 for the decoder and 10x lower for the DINOv2 encoder,
  crops of 518 cut from images whose shorter side was resized to it, ImageNet normalisation. Relative
  models (disparity) train with the scale-and-shift-invariant loss above; metric models (metres,
  `model.metric`) with the square root of the scale-invariant log loss on depth, pixels beyond the
  model's max_depth left out, no alignment step and no gradient-matching term (`--grad-loss-weight`).
Every default above applies only where the option is not given (RECIPES). Crops (`--size`) must be
multiples of the model's input multiple: 32 for DPT, 14 for Depth Anything.

Multi-GPU: `torchrun --nproc_per_node N -m dpt_fast.train ...` (DDP; nccl on GPUs, gloo on CPU).
`--batch-size` is the global batch, split evenly over the processes. The data stream is a pure
function of (seed, sample index) (dpt_fast.data.TrainStream), so a resumed run, or the same run on
another number of processes, sees exactly the same samples.

Output folder: checkpoint.pt (model, optimizer, scheduler, step, data position, RNG states, the
logging window in progress; written atomically every --save-every steps, at the end, and on Ctrl-C or
SIGTERM after the step in progress, the final save included; a second Ctrl-C, 2 s later or more, stops
at once without saving), metrics.jsonl (one JSON object per --log-every steps: step, loss, lr,
backbone_lr, images_per_s, elapsed_s), args.json (the settings), and at the end model/
(dpt_fast.save_model's format: `dpt_fast.load_model(OUT/model)`, `dpt-fast predict`, `--init`).
One run at a time writes a folder (an flock on OUT/.dpt-fast-train.lock, which dies with its process).
`--resume` continues from OUT/checkpoint.pt (or a given path) exactly where it stopped, with the
recorded settings: only --steps and the options in RESUME_MAY_CHANGE may be given anew; a run killed
before its first checkpoint starts again from step 0 with the settings in OUT/args.json.
Exit status of `dpt-fast train`: 0 done, 1 failed, 2 usage error (UsageError, one line), 130 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import backend, fileio, specs
from .checkpoints import CONFIG_NAME, WEIGHTS_NAME
from .cli_args import add_train_arguments as add_arguments
from .cli_args import features_arg, int_list, train_parser
from .data import StreamSampler, TrainStream, build_datasets
from .distributed import pick_device, process_place
from .losses import ScaleShiftInvariantLoss, align_least_squares, gradient_matching_loss, segmentation_loss, silog_loss
from .models import DepthAnythingModel, DPTDepthModel, DPTSegmentationModel, build_model
from .weights import load_model, save_model

__all__ = ["add_arguments", "main", "train", "estimate_metric_alignment", "param_groups", "CHECKPOINT_FORMAT",
           "UsageError"]

CHECKPOINT_FORMAT = "dpt_fast.train/1"
TASK_DEFAULTS = {  # the DPT paper's settings per task
    "depth": dict(size=384, lr=1e-4, optimizer="adam", weight_decay=0.0, schedule="constant", scale_range=(1.0, 1.0),
                  depth_loss="ssitrim", grad_loss_weight=0.5),
    "segmentation": dict(size=480, lr=2e-3, optimizer="sgd", weight_decay=1e-4, schedule="poly",
                         scale_range=(0.5, 2.0)),
}
# Depth Anything V2's metric fine-tuning: AdamW (betas 0.9, 0.999; weight decay 0.01), encoder lr 5e-6 and
# the decoder 10x that, poly decay (0.9), 518 crops. Relative models take the same optimiser.
_DEPTH_ANYTHING = dict(size=518, lr=5e-5, optimizer="adamw", weight_decay=0.01, schedule="poly",
                       scale_range=(1.0, 1.0))
# Defaults of the options that depend on the model, per (family, task, output): filled in once the model
# is built (RECIPE_KEYS not given keep None until then). The encoder's rate is lr / 10 in every recipe.
RECIPES = {
    ("dpt", "depth"): TASK_DEFAULTS["depth"],
    ("dpt", "segmentation"): TASK_DEFAULTS["segmentation"],
    ("depth_anything", "depth"): {**_DEPTH_ANYTHING, "depth_loss": "ssitrim", "grad_loss_weight": 0.5},
    ("depth_anything_metric", "depth"): {**_DEPTH_ANYTHING, "depth_loss": "silog", "grad_loss_weight": 0.0},
}
RECIPE_KEYS = ("size", "lr", "optimizer", "weight_decay", "schedule", "scale_range", "depth_loss", "grad_loss_weight",
               "backbone_lr")
SYNTHETIC_CLASSES = 8


# --- command line ------------------------------------------------------------------------------------

class UsageError(ValueError):
    """A run that cannot start as asked: bad or contradicting options, an output folder in use or holding
    another run, data or --init that cannot be read. `dpt-fast train` prints the message on one line and
    exits with status 2."""


def _defaults() -> dict:
    return vars(train_parser().parse_args([]))


def _resolve(args) -> argparse.Namespace:
    """Fill task-dependent defaults; `args` is a Namespace or a dict of flag values (underscored)."""
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    defaults = _defaults()
    unknown = set(args) - set(defaults)
    if unknown:
        raise UsageError(f"unknown training options: {sorted(unknown)}")
    # the model's recipe fills these once it is built (_apply_recipe)
    defaults.update(dict.fromkeys(RECIPE_KEYS))
    ns = argparse.Namespace(**{**defaults, **args})
    if not ns.data:
        raise UsageError("no training data: pass --data synthetic or --data FOLDER (repeatable)")
    if isinstance(ns.data, str):
        ns.data = [ns.data]
    if ns.num_workers is None:
        ns.num_workers = min(4, os.cpu_count() or 1)
    if isinstance(ns.hooks, str):
        ns.hooks = int_list(ns.hooks)
    if isinstance(ns.features, str):
        ns.features = features_arg(ns.features)
    if ns.steps < 0 or ns.batch_size < 1:
        raise UsageError("--steps must be >= 0 and --batch-size >= 1")
    if ns.log_every < 1 or ns.save_every < 0:
        raise UsageError("--log-every must be >= 1 and --save-every >= 0")
    if ns.arch is not None:
        if ns.init:
            raise UsageError("--arch builds a fresh model and --init loads one: give only one of them")
        try:
            spec = specs.get(ns.arch)
        except ValueError as error:
            raise UsageError(f"--arch: {error}") from None
        if spec.family == "depth_anything" and ns.task != "depth":
            raise UsageError(f"--arch {ns.arch} is a depth model: --task segmentation builds a DPT (--backbone)")
    if ns.size is not None and ns.size < 1:
        raise UsageError(f"--size must be positive, got {ns.size}")
    return ns


def _family(model: nn.Module) -> str:
    if isinstance(model, DepthAnythingModel):
        return "depth_anything_metric" if model.metric else "depth_anything"
    return "dpt"


def _preprocessing(model: nn.Module) -> specs.Preprocessing:
    """What the model's inputs look like (mean, std, input multiple); DPT models are the 2021 release's."""
    return getattr(model, "preprocessing", specs.DPT_PREPROCESSING)


def _apply_recipe(args: argparse.Namespace, model: nn.Module) -> None:
    """Fill the options not given with the model's recipe (RECIPES), and refuse a crop size or a loss the
    model cannot train with. A resumed run has them all recorded already."""
    recipe = RECIPES[(_family(model), args.task)]
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.backbone_lr is None:
        args.backbone_lr = args.lr / 10
    if args.grad_loss_weight is None:  # segmentation: unused, recorded as the flag's default
        args.grad_loss_weight = _defaults()["grad_loss_weight"]
    if args.depth_loss is None:
        args.depth_loss = _defaults()["depth_loss"]
    # a model's own multiple where it states one (a DPT's follows its patch size), else its preprocessing's
    multiple = getattr(model, "input_multiple", None) or _preprocessing(model).multiple
    if args.size % multiple:
        lower = max(multiple, args.size // multiple * multiple)
        raise UsageError(f"--size {args.size} is not a multiple of {multiple}, the input multiple of this "
                         f"{type(model).__name__}: use --size {lower} or {lower + multiple}")
    if args.task == "depth" and isinstance(model, DepthAnythingModel):
        if model.metric and args.depth_loss != "silog":
            raise UsageError(f"--depth-loss {args.depth_loss}: this Depth Anything model is metric (it predicts "
                             f"metres): train it with --depth-loss silog (its default)")
        if not model.metric and args.depth_loss == "silog":
            raise UsageError("--depth-loss silog needs a metric model, and this Depth Anything model predicts "
                             "relative disparity: fine-tune a metric one (e.g. --init depth_anything_v2_metric_"
                             "hypersim_vits.pth, or --arch da2-metric-hypersim-small) or use ssitrim")


# Options that a resumed run may set anew: how far it goes, and how it runs (not what it computes).
# Everything else is taken from the recorded run, and a contradicting value is refused.
RESUME_MAY_CHANGE = frozenset({"steps", "out", "resume", "save_every", "log_every", "num_workers", "device",
                               "backend", "compile", "progress", "channels_last", "grad_checkpointing"})


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _resume_settings(recorded: dict, given: dict) -> argparse.Namespace:
    """The recorded run's settings with the options `given` for the resumed one; refuses (UsageError)
    given options that contradict the recorded ones, except RESUME_MAY_CHANGE."""
    try:
        base = _resolve(recorded)
    except UsageError as error:
        raise UsageError(f"the recorded settings cannot be used ({error})") from None
    merged = _resolve({**vars(base), **given})
    conflicts = [f"--{key.replace('_', '-')} {_canonical(getattr(merged, key))} (recorded: "
                 f"{_canonical(getattr(base, key))})" for key in sorted(given)
                 if key not in RESUME_MAY_CHANGE and _canonical(getattr(merged, key)) != _canonical(getattr(base, key))]
    if conflicts:
        several = len(conflicts) > 1
        raise UsageError(f"--resume continues the recorded run, but {'; '.join(conflicts)} "
                         f"{'differ' if several else 'differs'}: drop {'them' if several else 'it'} or start a "
                         f"new run in another --out")
    return merged


# --- distributed set-up ------------------------------------------------------------------------------

class _Dist:
    def __init__(self, requested_device: str):
        place = process_place()  # LOCAL_RANK unset: RANK, as dpt-fast predict reads it
        self.world, self.rank = place.world, place.rank
        device = pick_device(requested_device, place, error=UsageError)  # the rule predict follows too
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.device = device
        self.owns_group = False
        self.control = None
        if self.world > 1:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
                self.owns_group = True
            # CPU-side agreement on stopping, without a GPU synchronisation per step
            self.control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        self.main = self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value

    def any(self, flag: bool) -> bool:
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control)
        return bool(value.item())

    def gather(self, obj):
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def close(self):
        if self.owns_group:
            dist.destroy_process_group()


# --- model, optimiser, schedule ----------------------------------------------------------------------

def param_groups(model: nn.Module, lr: float, backbone_lr: float) -> list[dict]:
    """Two groups: the encoder (parameters named `model.encoder_prefix`..., the timm ViT: `pretrained.model.`
    in DPT, `pretrained.` in Depth Anything) at backbone_lr, everything else at lr. Parameters with
    requires_grad=False are left out."""
    prefix = getattr(model, "encoder_prefix", None)
    if not prefix:
        raise ValueError(f"{type(model).__name__} does not name its encoder (an encoder_prefix attribute)")
    backbone, decoder = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith(prefix) else decoder).append(p)
    return [{"params": backbone, "lr": backbone_lr, "name": "backbone"},
            {"params": decoder, "lr": lr, "name": "decoder"}]


def _lr_factor(args):
    def factor(step: int) -> float:
        value = 1.0
        if args.warmup_steps > 0:
            value *= min(1.0, (step + 1) / args.warmup_steps)
        if args.schedule == "poly":
            value *= max(0.0, 1.0 - step / max(args.steps, 1)) ** args.poly_power
        return value
    return factor


# what --task trains: the model classes it accepts from --init
TASK_MODELS = {"depth": (DPTDepthModel, DepthAnythingModel), "segmentation": (DPTSegmentationModel,)}


def _build_model(args, checkpoint) -> nn.Module:
    if checkpoint is not None:
        recorded = checkpoint["config"].get("arch")
        if args.arch is not None and recorded != args.arch:
            raise UsageError(f"the checkpoint holds a {recorded or checkpoint['config'].get('model_class')} model, "
                             f"but its run records --arch {args.arch}: it cannot be resumed (use --init)")
        model = build_model(checkpoint["config"])
        model.load_state_dict(checkpoint["model"])
        return model
    if args.init:
        try:
            model = _load_init(args.init, args.hooks)
        except (OSError, ValueError) as error:
            raise UsageError(f"--init {args.init}: {error}") from error
        wanted = TASK_MODELS[args.task]
        if type(model) not in wanted:
            raise UsageError(f"--init {args.init} holds a {type(model).__name__}, but --task {args.task} "
                             f"trains {' or '.join(w.__name__ for w in wanted)}")
        return model
    if args.arch is not None:
        spec = specs.get(args.arch)
        if spec.family == "depth_anything":
            return DepthAnythingModel(args.arch, taps=args.hooks)
        backbone = spec.dpt_backbone  # the name DPT's backbone= argument knows the entry by
        common = dict(backbone=backbone, hooks=args.hooks)
        return DPTDepthModel(**common) if args.task == "depth" else DPTSegmentationModel(args.num_classes, **common)
    common = dict(backbone=args.backbone, hooks=args.hooks, features=args.features, readout=args.readout,
                  fusion_features=args.fusion_features)
    if args.task == "depth":
        return DPTDepthModel(**common)
    return DPTSegmentationModel(args.num_classes, **common)


def _load_init(path, hooks=None) -> nn.Module:
    """A model to fine-tune: anything dpt_fast.weights.load_model reads (a training checkpoint of this
    module, original .pt/.pth, Hugging Face folder, dpt_fast folder). `hooks` are the taps of a Depth
    Anything release-layout file whose encoder is none of the released sizes (its keys cannot tell them)."""
    from .depth_anything_weights import recognizes  # never a training checkpoint: those record their taps
    if hooks and recognizes(path):
        return load_model(path, taps=list(hooks))
    return load_model(path)


def _freeze_unused(model: nn.Module, device) -> list[str]:
    """Set requires_grad=False on parameters that the training forward never uses (the timm
    classifier head and final norm, blocks after the last tap, refinenet4's first RCU), as DDP
    requires; found by one small probe forward/backward. Returns their names."""
    was_training = model.training
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # BN statistics: untouched by the probe
    model.train()
    probe = torch.zeros(2, 3, 64, 64, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        out = model(probe)
        total = sum(t.float().sum() for t in (out if isinstance(out, tuple) else (out,)))
        used = torch.autograd.grad(total, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    frozen = []
    for (name, p), g in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], used):
        if g is None:
            p.requires_grad_(False)
            frozen.append(name)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    model.train(was_training)
    return frozen


def estimate_metric_alignment(model: DPTDepthModel, batches, trim: float = 0.2) -> tuple[float, float]:
    """The paper's alignment before metric fine-tuning: fit scale and shift per sample from the
    model's relative output (inverse depth) to the ground-truth inverse depth (least squares, refit
    without the worst `trim` residuals), and average them over the samples.

    `batches` yields dicts with "image" [B, 3, H, W], "disparity" (ground-truth inverse depth = 1 /
    metric depth) and "mask". Returns (scale, shift); the model then predicts metric depth as
    1 / (scale * output + shift) with model.scale, model.shift, model.invert = scale, shift, True
    (see `apply_metric_alignment`).
    """
    was_training, was_invert = model.training, model.invert
    model.eval()
    model.invert = False
    device = next(model.parameters()).device
    scales, shifts = [], []
    try:
        with torch.no_grad():
            for batch in batches:
                pred = model(batch["image"].to(device)).float()
                target, mask = batch["disparity"].to(device).float(), batch["mask"].to(device)
                scale, shift = align_least_squares(pred, target, mask, trim=trim)
                ok = (mask.flatten(1).sum(1) >= 2) & (scale > 0)
                scales.append(scale[ok].double().cpu())
                shifts.append(shift[ok].double().cpu())
    finally:
        model.invert = was_invert
        model.train(was_training)
    scales, shifts = torch.cat(scales), torch.cat(shifts)
    if scales.numel() == 0:
        raise ValueError("no sample gave a usable alignment (too few valid pixels, or a constant prediction)")
    return float(scales.mean()), float(shifts.mean())


def apply_metric_alignment(model: DPTDepthModel, scale: float, shift: float) -> None:
    """Make `model` output metric depth 1 / (scale * inverse_depth + shift), recorded in its config."""
    model.scale, model.shift, model.invert = scale, shift, True
    model.config.update(scale=scale, shift=shift, invert=True)


# --- checkpoints -------------------------------------------------------------------------------------

def _rng_state(device) -> dict:
    """RNG states in types that torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# the files _write_atomic writes in an output folder, and (save_model's) in OUT/model
_OUTPUT_FILES = ("checkpoint.pt", "metrics.jsonl", "args.json")
_MODEL_FILES = (WEIGHTS_NAME, CONFIG_NAME)


def _write_atomic(path: Path, write) -> None:
    """write(file) into a temporary file in the same folder, flushed to disk, then os.replace: `path`
    holds the old or the new content, never a part. A failed or interrupted write (a full disk,
    a second Ctrl-C) removes its temporary file rather than leaving it to fill the disk."""
    def to_file(tmp: Path) -> None:
        with open(tmp, "xb") as f:
            write(f)

    fileio.atomic_write(path, to_file, durable=True)


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, flushed to disk, then os.replace."""
    _write_atomic(path, lambda f: torch.save(obj, f))


def _remove_stale_temporaries(out: Path) -> list[str]:
    """Delete what interrupted saves of an earlier run left in `out` (and out/model). Called only
    while holding the folder's lock, so no other training process is writing them."""
    removed = fileio.remove_stale_temporaries(out, _OUTPUT_FILES, lock_held=True)
    removed += fileio.remove_stale_temporaries(out / "model", _MODEL_FILES, lock_held=True)
    return [str(path) for path in removed]


class _FolderLock:
    """An exclusive lock on a training output folder (fcntl.flock on OUT/.dpt-fast-train.lock), so that
    two runs never write the same checkpoint. The kernel drops the lock when its process ends, however it
    ends: a lock file left by a dead process blocks nothing. The file is removed on release; a process
    that locked it just before (the removed file) notices and retries on the new one."""

    NAME = ".dpt-fast-train.lock"

    def __init__(self, folder: Path):
        self.path = Path(folder) / self.NAME
        self.fd = None

    def __enter__(self):
        if fcntl is None:  # no flock (Windows): unlocked
            return self
        while True:
            # not inherited by programs the run starts (compile workers may outlive it)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UsageError(f"{self.path.parent} is in use by another dpt-fast train (process {owner}): wait "
                                 f"for it to finish, or choose another --out") from None
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # still locked: see the inode check in __enter__
            os.close(self.fd)
            self.fd = None
        return False


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metrics lines after `step` (written by a run that stopped before its next checkpoint), and
    a line cut short by a killed process; rewritten atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    _write_atomic(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM ask the loop to stop after the current step, so that the checkpoint
    it then writes is the state after a whole step. Another Ctrl-C more than 2 s later stops at once,
    without saving (sooner it is taken for a copy of the first: a terminal's Ctrl-C reaches torchrun's
    workers directly and again through torchrun). Signal handlers exist only in the main thread;
    elsewhere this never requests anything."""

    def __init__(self):
        self.requested = False
        self._first = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.requested and signum == signal.SIGINT and now - self._first > 2.0:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self._first = True, now

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _ignore_interrupts(worker_id: int) -> None:
    """Data-loader workers leave Ctrl-C to the training process (which stops between steps)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# --- the loop ----------------------------------------------------------------------------------------

def _loss_fn(args, model: nn.Module):
    if args.task == "segmentation":
        def seg(output, batch):
            logits, aux = output if isinstance(output, tuple) else (output, None)
            return segmentation_loss(logits, batch["label"], aux, args.aux_weight, args.ignore_index)
        return seg
    if isinstance(model, DepthAnythingModel) and model.metric:  # metres out: the original's root silog
        def metric_depth_anything(pred_depth, batch):
            target = 1.0 / batch["disparity"].clamp_min(1e-12)
            mask = batch["mask"] & (batch["disparity"] > 0) & (target <= model.max_depth)
            loss = silog_loss(pred_depth.float(), torch.where(mask, target, torch.ones_like(target)), mask, root=True)
            if args.grad_loss_weight > 0:
                log_pred = torch.log(pred_depth.float().clamp_min(1e-8))
                loss = loss + args.grad_loss_weight * gradient_matching_loss(
                    log_pred, torch.log(torch.where(mask, target, torch.ones_like(target))), mask)
            return loss
        return metric_depth_anything
    if args.depth_loss == "silog":
        def metric(pred_depth, batch):
            mask = batch["mask"] & (batch["disparity"] > 0)
            target = 1.0 / torch.where(mask, batch["disparity"], torch.ones_like(batch["disparity"]))
            loss = silog_loss(pred_depth.float(), target, mask)
            if args.grad_loss_weight > 0:  # gradient matching of the log-depth residual (Eigen & Fergus)
                log_pred = torch.log(pred_depth.float().clamp_min(1e-8))
                loss = loss + args.grad_loss_weight * gradient_matching_loss(log_pred, torch.log(target), mask)
            return loss
        return metric
    ssi = ScaleShiftInvariantLoss(alpha=args.grad_loss_weight, trimmed=args.depth_loss == "ssitrim")
    return lambda pred, batch: ssi(pred, batch["disparity"], batch["mask"])


def _keys(args) -> tuple[str, ...]:
    return ("image", "label") if args.task == "segmentation" else ("image", "disparity", "mask")


def train(args=None, **overrides) -> dict:
    """Train as `dpt-fast train` does. `args`: a dict of options (the flags' names with underscores), or an
    argparse.Namespace from add_arguments (there, values equal to the parser's defaults count as not
    given); keyword overrides win. With `resume`, options not given are the recorded run's, and given
    ones that contradict it are refused (UsageError), except RESUME_MAY_CHANGE. Returns {"step", "loss",
    "out", "checkpoint", "model"} (loss: the last logged value; model: the trained, unwrapped model)."""
    given = _given(args, overrides)
    if given.get("resume") not in (None, "auto") and "out" not in given:  # --resume CKPT: continue beside it
        given["out"] = str(Path(given["resume"]).parent)
    out = Path(given.get("out") or _defaults()["out"])
    main_process = process_place(error=UsageError).main
    created = main_process and not out.exists()
    if main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"--out {out}: {error.strerror or error}") from error
    try:
        return _locked_train(given, out, main_process)
    except UsageError:
        if created:  # a refused run leaves no empty folder behind
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _locked_train(given: dict, out: Path, main_process: bool) -> dict:
    # every check of what OUT holds happens under its lock: two runs cannot both pass them
    with _FolderLock(out) if main_process else contextlib.nullcontext():
        if main_process:
            for path in _remove_stale_temporaries(out):
                print(f"removed {path}, left by an interrupted save", file=sys.stderr)
        checkpoint, args = _settings(given, out, main_process)
        env = _Dist(args.device)
        try:
            with backend.use_backend(args.backend):  # this thread only; backwards follow their forward's choice
                return _train(args, env, env.device, out, checkpoint)
        finally:
            env.close()


def _given(args, overrides) -> dict:
    """The options a caller set: a dict's entries, or a Namespace's values that differ from the defaults
    (None means not given)."""
    if isinstance(args, argparse.Namespace):
        defaults = _defaults()
        args = {k: v for k, v in vars(args).items() if k not in defaults or v != defaults[k]}
    return {k: v for k, v in {**(args or {}), **overrides}.items() if v is not None}


def _load_checkpoint(path: Path) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights-only unpickling, truncated file, ...: all mean "not usable"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"--resume {path}: not a readable checkpoint ({first_line})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a dpt_fast training checkpoint (use --init to fine-tune from it)")
    if not isinstance(checkpoint.get("args"), dict):
        raise UsageError(f"{path} does not record its run's settings: it cannot be resumed (use --init)")
    return checkpoint


def _settings(given: dict, out: Path, main_process: bool) -> tuple[dict | None, argparse.Namespace]:
    """The checkpoint to continue from (or None) and the run's settings, refusing what would overwrite
    another run or contradict the recorded one."""
    checkpoint_path = out / "checkpoint.pt"
    say = (lambda text: print(text, file=sys.stderr)) if main_process else (lambda text: None)
    resume = given.get("resume")
    if not resume:
        if checkpoint_path.exists():  # starting afresh would overwrite that run's checkpoint at the first save
            raise UsageError(f"{checkpoint_path} exists: pass --resume to continue that run, or choose another "
                             f"--out (--init {checkpoint_path} fine-tunes from it in a new folder)")
        args = _resolve(given)
        if (out / "args.json").exists() or (out / "metrics.jsonl").exists():
            say(f"{out} holds a run that stopped before its first checkpoint: starting over (its args.json "
                f"and metrics.jsonl are replaced)")
        return None, args
    path = checkpoint_path if resume == "auto" else Path(resume)
    if path.exists():
        checkpoint = _load_checkpoint(path)
        args = _resume_settings(checkpoint["args"], given)
        if args.steps < checkpoint["step"]:
            raise UsageError(f"--steps {args.steps} is before the checkpoint's step {checkpoint['step']}: pass "
                             f"--steps {checkpoint['step']} or more")
        return checkpoint, args
    if resume != "auto":
        raise UsageError(f"--resume {path}: no such checkpoint")
    recorded = out / "args.json"
    if recorded.exists():  # killed before its first save: its settings are all there is to continue
        try:
            settings = json.loads(recorded.read_text())
        except (OSError, ValueError) as error:
            raise UsageError(f"{recorded} cannot be read ({error}): start a new run without --resume") from error
        if not isinstance(settings, dict):
            raise UsageError(f"{recorded} does not hold a run's settings: start a new run without --resume")
        args = _resume_settings(settings, given)
        say(f"no {checkpoint_path}: the run recorded in {recorded} stopped before its first save; "
            f"starting it again from step 0 with its settings")
        return None, args
    try:
        args = _resolve(given)
    except UsageError as error:
        raise UsageError(f"--resume: {out} holds no checkpoint.pt or args.json to continue ({error})") from None
    say(f"no {checkpoint_path}: nothing to resume, starting a new run")
    return None, args


def _train(args, env: _Dist, device, out: Path, checkpoint: dict | None) -> dict:
    """The run itself, in the order its random draws must keep (a resumed run repeats them exactly)."""
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
    env.barrier()
    _seed_everything(args.seed)  # the same initial weights on every rank (DDP also broadcasts them from rank 0)
    _settle_num_classes(args, checkpoint)
    model = _build_model(args, checkpoint)
    _apply_recipe(args, model)
    datasets, inputs = _training_data(args, model)
    stream = TrainStream(datasets, args.size, seed=args.seed, keys=_keys(args), scale_range=args.scale_range,
                         flip=args.flip, ignore_index=args.ignore_index, **inputs)
    _place_model(model, args, device)
    if _needs_metric_alignment(args, model, checkpoint):
        _align_to_metric(model, args, datasets, inputs, env)
    # DDP needs it; one process does it too, so that the optimizer's parameter groups, and so its
    # checkpointed state, are the same whatever the number of processes (--resume on another count).
    frozen = _freeze_unused(model, device)
    optimizer, scheduler = _optimizer_and_schedule(args, model)
    net = _wrap_for_processes(model, args, env, device)
    run = _Run(args, env, device, out, model, optimizer, scheduler)
    log = _restore_progress(run, checkpoint)
    if env.main:
        _record_start(run, datasets, frozen)
    loader = _loader(stream, run)
    bar = _progress_bar(run)
    metrics_file = open(out / "metrics.jsonl", "a") if env.main else None
    try:
        last_loss = _train_and_save(run, net, loader, _LogWindow(run, log), bar, metrics_file)
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
    return {"step": run.step, "loss": last_loss, "out": str(out), "checkpoint": str(out / "checkpoint.pt"),
            "model": model}


# --- setting up a run ---------------------------------------------------------------------------------

def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _settle_num_classes(args, checkpoint: dict | None) -> None:
    """A new segmentation model needs its class count: synthetic data state theirs, folders do not."""
    if args.task == "segmentation" and args.num_classes is None and not args.init and checkpoint is None:
        if all(str(d).split(":")[0] == "synthetic" for d in args.data):
            args.num_classes = SYNTHETIC_CLASSES
        else:
            raise UsageError("--num-classes is needed to build a segmentation model for folder datasets")


def _training_data(args, model: nn.Module) -> tuple[list, dict]:
    """The datasets of --data, and how the model wants its inputs made (TrainStream's keyword arguments)."""
    num_classes = getattr(model, "num_classes", None) or SYNTHETIC_CLASSES
    try:
        datasets = build_datasets(args.data, args.task, synthetic_resolution=math.ceil(args.size * 1.25),
                                  num_classes=num_classes, seed=args.seed)
    except (OSError, ValueError) as error:
        raise UsageError(f"--data: {error}") from error
    preprocessing = _preprocessing(model)
    # the model's normalisation; Depth Anything crops lie inside the image (it reads padding as near)
    inputs = dict(mean=preprocessing.mean, std=preprocessing.std, cover=isinstance(model, DepthAnythingModel))
    return datasets, inputs


def _place_model(model: nn.Module, args, device) -> None:
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model.channels_last = args.channels_last
    model.pretrained.grad_checkpointing = args.grad_checkpointing


def _needs_metric_alignment(args, model: nn.Module, checkpoint: dict | None) -> bool:
    """A relative DPT learns metres through one alignment first (a fresh run's, not a resumed one's)."""
    return (args.task == "depth" and args.depth_loss == "silog" and checkpoint is None
            and isinstance(model, DPTDepthModel) and not model.invert)


def _align_to_metric(model: nn.Module, args, datasets: list, inputs: dict, env: _Dist) -> None:
    # its own stream (another seed, no flips): the training stream's samples stay those of a run without it
    align_stream = TrainStream(datasets, args.size, seed=args.seed + 7919, keys=_keys(args), flip=False, **inputs)
    batch = max(1, min(args.batch_size, args.align_samples))
    batches = (torch.utils.data.default_collate([align_stream[i] for i in range(s, min(s + batch, args.align_samples))])
               for s in range(0, args.align_samples, batch))
    scale, shift = estimate_metric_alignment(model, batches)
    apply_metric_alignment(model, scale, shift)
    if env.main:
        print(f"metric alignment of the initial model: scale {scale:.6g}, shift {shift:.6g}", file=sys.stderr)


def _optimizer_and_schedule(args, model: nn.Module):
    groups = param_groups(model, args.lr, args.backbone_lr)
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=args.lr, weight_decay=args.weight_decay)
    elif args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(args))


def _wrap_for_processes(model: nn.Module, args, env: _Dist, device) -> nn.Module:
    """What the steps call: the model itself, under DDP (with synchronised batch norm on GPUs) when there
    are several processes, compiled with --compile. The checkpoint always saves the bare model."""
    net = model
    if env.distributed:
        if device.type == "cuda" and any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            net = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over the global batch
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)
    return net


class _Run:
    """What a checkpoint saves of a run, and where: settings, processes, model, optimiser, schedule, and
    how far it has come (steps done, samples drawn from the stream)."""

    def __init__(self, args, env: _Dist, device, out: Path, model: nn.Module, optimizer, scheduler):
        self.args, self.env, self.device, self.out = args, env, device, out
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.step = self.samples = 0

    def save(self, window: _LogWindow) -> None:
        """Write OUT/checkpoint.pt atomically (rank 0; every rank takes part in gathering its state)."""
        rng = self.env.gather(_rng_state(self.device))  # every rank's, so that dropout resumes exactly too
        log = window.state()
        if self.env.main:
            save_atomic({"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(), "config": self.model.config,
                         "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "step": self.step, "samples": self.samples, "global_batch": self.args.batch_size,
                         "rng": rng, "world": self.env.world, "args": vars(self.args), "log": log},
                        self.out / "checkpoint.pt")
        self.env.barrier()


def _restore_progress(run: _Run, checkpoint: dict | None) -> dict:
    """Continue where the checkpoint stopped (optimiser, schedule, step, stream position, RNG states) or
    seed a fresh run's dropout; returns the logging window the checkpoint fell into."""
    env = run.env
    if checkpoint is None:
        torch.manual_seed(run.args.seed + env.rank)  # dropout differs between ranks
        return {}
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.step, run.samples = checkpoint["step"], checkpoint["samples"]
    states = checkpoint["rng"]
    if len(states) == env.world:
        _set_rng_state(states[env.rank], run.device)
    else:  # another number of processes: the data stay exact, dropout masks cannot
        torch.manual_seed(run.args.seed + 1000003 * run.step + env.rank)
    return checkpoint.get("log") or {}


def _record_start(run: _Run, datasets: list, frozen: list[str]) -> None:
    """args.json, metrics.jsonl cut back to the checkpoint's step, and the run's one-line description."""
    args, model, step = run.args, run.model, run.step
    settings = json.dumps(vars(args), indent=2, default=str) + "\n"
    _write_atomic(run.out / "args.json", lambda f: f.write(settings.encode()))
    _trim_metrics(run.out / "metrics.jsonl", step)  # lines after the checkpoint (or of a run without one)
    n_params = sum(p.numel() for p in model.parameters())
    loss = args.depth_loss if args.task == "depth" else "cross-entropy"
    start = "from step " + str(step) if step else "from scratch" if not args.init else "from " + args.init
    print(f"dpt-fast train: {type(model).__name__} {model.config.get('arch') or model.config.get('backbone')} "
          f"({n_params / 1e6:.1f}M params, {loss} loss), {' + '.join(map(repr, datasets))}, "
          f"{run.env.world} process(es) on {run.device}, {start}"
          + (f"; {len(frozen)} unused parameters frozen" if frozen else ""), file=sys.stderr)


def _loader(stream: TrainStream, run: _Run) -> torch.utils.data.DataLoader:
    """This process's share of each global batch, from the stream position the run has reached."""
    args, env = run.args, run.env
    sampler = StreamSampler(args.batch_size, start_sample=run.samples, rank=env.rank, world=env.world)
    return torch.utils.data.DataLoader(stream, batch_size=args.batch_size // env.world, sampler=sampler,
                                       num_workers=args.num_workers, pin_memory=run.device.type == "cuda",
                                       worker_init_fn=_ignore_interrupts, drop_last=True,
                                       # its own generator: creating the iterator must not draw from the
                                       # global RNG whose state a checkpoint restores (dropout)
                                       generator=torch.Generator().manual_seed(args.seed))


def _progress_bar(run: _Run):
    show = run.args.progress if run.args.progress is not None else sys.stderr.isatty()
    if not (run.env.main and show and run.step < run.args.steps):
        return None
    from tqdm import tqdm
    return tqdm(total=run.args.steps, initial=run.step, unit="step", dynamic_ncols=True)


# --- the steps ----------------------------------------------------------------------------------------

class _LogWindow:
    """The steps since the last metrics line: their summed loss (a line shows its mean over the steps and
    the ranks) and timing. A checkpoint stores it, so that a resumed run logs what an uninterrupted one
    does."""

    def __init__(self, run: _Run, saved: dict):
        self.env, self.device, self.batch_size = run.env, run.device, run.args.batch_size
        self.loss_sum = saved["loss_sum"].to(self.device) if "loss_sum" in saved else self._zero()
        self.steps, self.timed_steps = int(saved.get("steps", 0)), 0
        self.elapsed_before = float(saved.get("elapsed_s", 0.0))
        self.tick = self.start = time.perf_counter()

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), device=self.device)

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach()
        self.steps += 1
        self.timed_steps += 1

    def close(self, step: int, lrs: list[float]) -> dict:
        """The metrics line of the window ending at `step` (lrs: the rates that step used); a new window
        starts."""
        mean_loss = float(self.env.mean(self.loss_sum) / self.steps)
        now = time.perf_counter()
        record = {"step": step, "loss": mean_loss, "lr": lrs[1], "backbone_lr": lrs[0],
                  "images_per_s": self.timed_steps * self.batch_size / max(now - self.tick, 1e-9),
                  "elapsed_s": self.elapsed_before + now - self.start}
        self.loss_sum, self.tick = self._zero(), now
        self.steps = self.timed_steps = 0
        return record

    def state(self) -> dict:
        """What a checkpoint keeps: the window's loss (averaged over the ranks), its steps, the time so far."""
        return {"loss_sum": self.env.mean(self.loss_sum).detach().cpu().clone(), "steps": self.steps,
                "elapsed_s": self.elapsed_before + time.perf_counter() - self.start}


def _step_function(run: _Run, net: nn.Module, loss_fn):
    """One optimiser step on a batch from the loader: returns its loss and the learning rates it used."""
    args, device = run.args, run.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda"))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    trainable = [p for p in run.model.parameters() if p.requires_grad]

    def step(batch: dict) -> tuple[torch.Tensor, list[float]]:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        images = batch["image"].contiguous(memory_format=memory_format)
        with autocast:
            output = net(images)
        loss = loss_fn(output, batch)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(trainable, args.clip_grad)
        run.optimizer.step()
        lrs = [group["lr"] for group in run.optimizer.param_groups]  # the rates this step used
        run.scheduler.step()
        run.step, run.samples = run.step + 1, run.samples + args.batch_size
        return loss, lrs
    return step


def _train_and_save(run: _Run, net: nn.Module, loader, window: _LogWindow, bar, metrics_file) -> float:
    """Steps up to --steps, a metrics line every --log-every, a checkpoint every --save-every and at a stop
    request; then the final checkpoint and OUT/model. Returns the last logged loss."""
    args, env = run.args, run.env
    one_step = _step_function(run, net, _loss_fn(args, run.model))
    last_loss = float("nan")
    net.train()
    data = iter(loader) if run.step < args.steps else None
    try:
        with _StopRequest() as stop:
            while run.step < args.steps:
                loss, lrs = one_step(next(data))
                window.add(loss)
                if bar is not None:
                    bar.update(1)
                if run.step % args.log_every == 0 or run.step == args.steps:
                    last_loss = _write_metrics_line(window.close(run.step, lrs), metrics_file, bar)
                if env.any(stop.requested):  # every rank stops after the same step
                    if env.main:
                        print(f"\ninterrupted: saving the checkpoint at step {run.step}", file=sys.stderr)
                    run.save(window)
                    raise KeyboardInterrupt
                if args.save_every and run.step % args.save_every == 0 and run.step < args.steps:
                    run.save(window)
            # still under the stop handler: a Ctrl-C or SIGTERM now waits for the checkpoint and model/
            run.save(window)
            if env.main:
                save_model(run.model, run.out / "model")  # its atomic writes remove their own temporaries
            if stop.requested and env.main:
                print("\nstop requested during the final save: the run is complete", file=sys.stderr)
    finally:
        del data  # the loader's worker processes end here, even when an exception's traceback lives on
    return last_loss


def _write_metrics_line(record: dict, metrics_file, bar) -> float:
    """Append the line (rank 0), show it on the bar; a loss that is not finite ends the run."""
    if metrics_file is not None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
    if bar is not None:
        bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
    if not math.isfinite(record["loss"]):
        raise FloatingPointError(f"loss is {record['loss']} at step {record['step']}; last checkpoint kept")
    return record["loss"]


def _given_flags(parser: argparse.ArgumentParser, argv) -> dict:
    """The options on the command line (not the defaults), so that --resume can tell them apart."""
    unset = argparse.Namespace(**{a.dest: None for a in parser._actions if a.dest != "help"})
    return {k: v for k, v in vars(parser.parse_args(argv, unset)).items() if v is not None}


def main(argv=None) -> int:
    """`dpt-fast train`; exit status 0 done, 1 failed, 2 usage error, 130 interrupted."""
    try:
        result = train(_given_flags(train_parser(), argv))
    except UsageError as error:
        print(f"dpt-fast train: error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:
        print(f"dpt-fast train: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if process_place().main:  # train() has read it already: a bad value was a usage error there
        print(f"done: step {result['step']}, loss {result['loss']:.5f}, checkpoint {result['checkpoint']}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
