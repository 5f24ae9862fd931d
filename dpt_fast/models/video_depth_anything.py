"""Video Depth Anything (Chen et al., 2025): Depth Anything V2 with temporal attention in its decoder.

The encoder and the DPT decoder are Depth Anything V2's (`DepthAnythingModel`, relative head); the
decoder is named `head` (not `depth_head`) as in the release, and holds four temporal modules
(`head.motion_modules.0..3`) applied, over the frames of a window, to the Reassemble maps of stages 3
and 4 and to the outputs of fusion blocks 4 and 3. Key names follow the release's checkpoints
(`video_depth_anything_vits.pth`, `_vitb`, `_vitl`), so they load with strict=True.

One temporal module (the release's AnimateDiff-style motion module; facts of its architecture):
GroupNorm(32 groups, eps 1e-6) -> per-pixel Linear `proj_in` -> one transformer block -> Linear
`proj_out` -> + the input. The block: two attention blocks, each LayerNorm -> sinusoidal position
encoding over time (`pos_encoder.pe`, a saved buffer of `num_frames` positions) -> 8-head
self-attention across the frames at each pixel (q/k/v without bias, `to_out.0` with bias) -> + its
input; then LayerNorm -> GEGLU feed-forward (4x, exact GELU on the gate half) -> + its input.
The attention runs through `dpt_fast::attention` (packed q/k/v, one sequence per pixel).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .depth_anything import DepthAnythingModel

__all__ = ["VideoDepthAnythingModel", "TemporalModule", "VDA_ENCODERS", "window_predictor", "load_video_depth_anything",
           "is_metric_release_file", "VideoDepthAnythingStream"]

# The release's encoder codes -> Depth Anything V2 architectures (same fusion widths and Reassemble widths).
VDA_ENCODERS = {"vits": "da2-small", "vitb": "da2-base", "vitl": "da2-large"}
NUM_FRAMES = 32  # the release's window length; also the length of its position encodings


class _PositionalEncoding(nn.Module):
    """`pos_encoder`: sin on even channels, cos on odd ones, 10000^(-2i/d) frequencies, added to the input."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        frequency = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(position * frequency)
        pe[0, :, 1::2] = torch.cos(position * frequency)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.pe.shape[1]:
            raise ValueError(f"{x.shape[1]} frames, but the temporal position encoding has {self.pe.shape[1]}")
        return x + self.pe[:, :x.shape[1]].to(x.dtype)


class _TemporalAttention(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.pos_encoder = _PositionalEncoding(dim, max_len)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> torch.Tensor:
        """x [sequences, frames, dim] -> the same shape (attention across frames). With `cache`
        [sequences, earlier, dim] (the inputs of earlier frames), x's frames are the newest positions
        of the sequence: they attend to the cache and themselves, and only they are returned."""
        if cache is None:
            x = self.pos_encoder(x)
            weight = torch.cat((self.to_q.weight, self.to_k.weight, self.to_v.weight))
            out = ops.attention(F.linear(x, weight), self.heads)
        else:
            full = self.pos_encoder(torch.cat((cache.to(x.dtype), x), dim=1))
            split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731  [S, H, N, D]
            q = split(self.to_q(full[:, cache.shape[1]:]))
            out = F.scaled_dot_product_attention(q, split(self.to_k(full)), split(self.to_v(full)))
            out = out.transpose(1, 2).flatten(2)
        return self.to_out[1](self.to_out[0](out))


class _GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([_GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class _TemporalBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, attention_blocks: int = 2):
        super().__init__()
        self.attention_blocks = nn.ModuleList(_TemporalAttention(dim, heads, max_len) for _ in range(attention_blocks))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(attention_blocks))
        self.ff = _FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, frames: int, caches=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [batch * frames, pixels, dim] -> (the same shape, each attention's input [batch * pixels,
        frames, dim], which is what a streaming caller caches for later frames)."""
        bf, pixels, dim = x.shape
        states = []
        for i, (attention, norm) in enumerate(zip(self.attention_blocks, self.norms)):
            seq = norm(x).unflatten(0, (bf // frames, frames)).transpose(1, 2).flatten(0, 1)  # [b*pixels, f, c]
            states.append(seq)
            out = attention(seq, None if caches is None else caches[i])
            x = out.unflatten(0, (bf // frames, pixels)).transpose(1, 2).flatten(0, 1) + x
        return self.ff(self.ff_norm(x)) + x, states


class _TemporalTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, max_len: int, groups: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([_TemporalBlock(channels, heads, max_len)])
        self.proj_out = nn.Linear(channels, channels)


class TemporalModule(nn.Module):
    """`head.motion_modules.N`: maps [batch * frames, C, h, w] -> the same, mixing each pixel across frames."""

    def __init__(self, channels: int, heads: int = 8, max_len: int = NUM_FRAMES):
        super().__init__()
        if channels % 32 or channels % heads:
            raise ValueError(f"a temporal module needs channels divisible by 32 (GroupNorm) and by {heads} heads, "
                             f"got {channels}")
        self.temporal_transformer = _TemporalTransformer(channels, heads, max_len)
        nn.init.zeros_(self.temporal_transformer.proj_out.weight)  # starts as the identity, as released
        nn.init.zeros_(self.temporal_transformer.proj_out.bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return self.run(x, frames)[0]

    def run(self, x: torch.Tensor, frames: int, caches=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(output, the attention inputs to cache); `caches` (one per attention, [batch * pixels, earlier,
        C]) makes x's frames the newest of a longer sequence (streaming)."""
        t = self.temporal_transformer
        bf, channels, height, width = x.shape
        if bf % frames:
            raise ValueError(f"{bf} maps are not a whole number of {frames}-frame clips")
        hidden = t.norm(x).permute(0, 2, 3, 1).reshape(bf, height * width, channels)
        hidden = t.proj_in(hidden)
        states = []
        for i, block in enumerate(t.transformer_blocks):
            per_block = len(block.attention_blocks)
            block_caches = None if caches is None else caches[i * per_block:(i + 1) * per_block]
            hidden, block_states = block(hidden, frames, block_caches)
            states += block_states
        hidden = t.proj_out(hidden).reshape(bf, height, width, channels).permute(0, 3, 1, 2)
        return hidden + x, states


class VideoDepthAnythingModel(DepthAnythingModel):
    """Video Depth Anything (relative): clips [B, T, 3, H, W] (ImageNet-normalised frames, T <= 32)
    -> relative disparity [B, T, H, W].

    `encoder` is the release's code ("vits", "vitb", "vitl"); `taps`, `features`, `out_channels` and
    `vit_kwargs` override the architecture's facts (tiny test models). H and W that are not multiples
    of 14 are resized to the nearest multiples and the prediction back, as DepthAnythingModel does.
    Whole videos go through `dpt_fast.video.windows.windowed_video_depth` with `window_predictor`.
    """

    def __init__(self, encoder: str = "vits", taps=None, features: int | None = None, out_channels=None,
                 vit_kwargs: dict | None = None, num_frames: int = NUM_FRAMES, heads: int = 8,
                 channels_last: bool = True):
        if encoder not in VDA_ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(VDA_ENCODERS)}, got {encoder!r}")
        arch = VDA_ENCODERS[encoder]
        super().__init__(arch, taps=taps, features=features, out_channels=out_channels, vit_kwargs=vit_kwargs,
                         metric=False, channels_last=channels_last)
        self.head = self._modules.pop("depth_head")  # the release names the decoder `head`
        widths = self.config["out_channels"]
        features = self.config["features"]
        self.head.motion_modules = nn.ModuleList([
            TemporalModule(widths[2], heads, num_frames), TemporalModule(widths[3], heads, num_frames),
            TemporalModule(features, heads, num_frames), TemporalModule(features, heads, num_frames)])
        self.num_frames = num_frames
        self.config.update(model_class="VideoDepthAnythingModel", encoder=encoder, num_frames=num_frames, heads=heads)

    @property
    def depth_head(self):
        return self.head

    def forward_raw(self, clips: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] with H, W multiples of 14 -> [B, T, H, W] (the release's forward)."""
        return self.forward_cached(clips)[0]

    def forward_cached(self, clips: torch.Tensor, caches=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The forward with the temporal attentions' inputs returned (8: two per motion module) and,
        given `caches` (the same 8, of earlier frames), the clip's frames taken as the newest of a
        longer sequence (the release's streaming mode)."""
        batch, frames = clips.shape[:2]
        taps, grid_h, grid_w = self.encode(clips.flatten(0, 1))
        head = self.head
        maps = head.reassemble(taps, grid_h, grid_w)
        if self.channels_last:
            maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
        motion = head.motion_modules
        states = []

        def temporal(i, x):
            per = len(motion[i].temporal_transformer.transformer_blocks) * 2
            out, new = motion[i].run(x, frames, None if caches is None else caches[i * per:(i + 1) * per])
            states.extend(new)
            return out
        maps[2] = temporal(0, maps[2])
        maps[3] = temporal(1, maps[3])
        s = head.scratch
        rn = [getattr(s, f"layer{i + 1}_rn")(x) for i, x in enumerate(maps)]
        path = temporal(2, s.refinenet4(rn[3], size=rn[2].shape[2:]))
        path = temporal(3, s.refinenet3(path, rn[2], size=rn[1].shape[2:]))
        path = s.refinenet2(path, rn[1], size=rn[0].shape[2:])
        path = s.refinenet1(path, rn[0])
        out = s.output_conv1(path)
        out = F.interpolate(out, size=(grid_h * self.patch_size, grid_w * self.patch_size), mode="bilinear",
                            align_corners=True)
        with torch.autocast(out.device.type, enabled=False):  # the release runs the last convolutions in fp32
            out = s.output_conv2(out.float())
        # the release then resizes to the input size (the identity here: the sizes are equal) and ReLUs
        return F.relu(out).squeeze(1).unflatten(0, (batch, frames)), states

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        if not isinstance(clips, torch.Tensor) or clips.dim() != 5 or clips.shape[2] != 3:
            shape = tuple(clips.shape) if isinstance(clips, torch.Tensor) else type(clips).__name__
            raise ValueError(f"expected clips [B, T, 3, H, W], got {shape}")
        if clips.shape[1] > self.num_frames:
            raise ValueError(f"a clip holds at most {self.num_frames} frames, got {clips.shape[1]}")
        self.check_input(clips[:, 0])
        clips, (run_h, run_w) = self.prepare_input(clips)
        height, width = clips.shape[-2:]
        if (run_h, run_w) == (height, width):
            return self.forward_raw(clips)
        batch, frames = clips.shape[:2]
        x = F.interpolate(clips.flatten(0, 1), size=(run_h, run_w), mode="bilinear", align_corners=False)
        out = self.forward_raw(x.unflatten(0, (batch, frames)))
        out = F.interpolate(out.flatten(0, 1).unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)
        return out.squeeze(1).unflatten(0, (batch, frames))


def window_predictor(model: VideoDepthAnythingModel, preprocess, device=None, autocast_dtype=None):
    """A window function for `dpt_fast.video.windows.windowed_video_depth`: a list of frames ->
    [T, H, W] depth at the frames' size (bilinear, align_corners=True, as the release).

    preprocess: frame -> normalised [3, h, w] tensor (e.g. Depth Anything's preprocessing at 518).
    """
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device

    def predict(frames: list) -> torch.Tensor:
        clip = torch.stack([preprocess(f) for f in frames]).to(device).unsqueeze(0)
        with torch.inference_mode(), torch.autocast(device.type, autocast_dtype or torch.float32,
                                                    enabled=autocast_dtype is not None):
            depth = model(clip)[0].float()
        first = frames[0]
        size = tuple((first.image if hasattr(first, "image") else first).shape[-2:])
        return F.interpolate(depth.unsqueeze(1), size=size, mode="bilinear", align_corners=True).squeeze(1).cpu()
    return predict


_ENCODER_BY_WIDTH = {384: "vits", 768: "vitb", 1024: "vitl"}


def is_metric_release_file(path) -> bool:
    """The release's metric models are `metric_video_depth_anything_{vits,vitb,vitl}.pth`: the same
    architecture, whose depth (metres) the windowed procedure must not rescale (metric=True)."""
    from pathlib import Path
    return Path(path).name.startswith("metric_")


def load_video_depth_anything(path, device=None, dtype=None, **overrides) -> VideoDepthAnythingModel:
    """A VideoDepthAnythingModel in eval mode from a release file (`video_depth_anything_vits.pth`, ...),
    read with torch.load(weights_only=True) and loaded strictly. The encoder is read from the file
    (its embedding width) unless `encoder=` is given; other `overrides` go to the constructor (tiny
    models). Raises dpt_fast.weights.CheckpointError naming the problem keys when the file does not fit.
    """
    from pathlib import Path

    from ..checkpoints import CheckpointError, fit_state_dict, torch_load_weights_only, unwrap_state_dict
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    state = unwrap_state_dict(torch_load_weights_only(p), p)
    if not any(k.startswith("head.motion_modules.") for k in state):
        raise CheckpointError(f"{p}: not a Video Depth Anything checkpoint (no head.motion_modules.* keys)")
    if "encoder" not in overrides:
        width = tuple(state["pretrained.cls_token"].shape)[-1] if "pretrained.cls_token" in state else None
        if width not in _ENCODER_BY_WIDTH:
            raise CheckpointError(f"{p}: cannot tell the encoder from its width {width}; pass encoder=")
        overrides["encoder"] = _ENCODER_BY_WIDTH[width]
    try:
        with torch.device("meta"):
            model = VideoDepthAnythingModel(**overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: cannot build VideoDepthAnythingModel({overrides}): {e}") from None
    state = fit_state_dict(model, state, fmt="original", source=p, config=model.config,
                           fill_keys=("pretrained.mask_token",))
    model.to_empty(device=device if device is not None else "cpu")
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


class VideoDepthAnythingStream:
    """Video Depth Anything's streaming mode: one frame in, its depth out, attending to cached
    temporal-attention inputs of earlier frames instead of re-running a window.

    The release's bookkeeping: the first frame's cached inputs stand in for a full window (32 copies);
    each new frame attends to the cached inputs of 31 earlier entries (the first two entries of the
    cache list and its last 29) and is appended; once the frame count passes 10, the entry at position
    1 is dropped for every new frame, so the list holds at most 42 entries (memory is bounded). No
    scale/shift alignment is applied (the release's streaming mode has none).

    preprocess: frame -> normalised [3, h, w] (e.g. Depth Anything's at 518); every frame must have
    the first frame's size. Returns float32 [H, W] at the frame's size on the CPU; `reset()` starts over.
    Usable as the `predict` of `dpt_fast.video.stream.DepthStream`.
    """

    WINDOW = NUM_FRAMES
    GAP = 41  # (32 - 10) * 2 - 1 - (10 - 8): the release's limit on the cache list

    def __init__(self, model: VideoDepthAnythingModel, preprocess, device=None, autocast_dtype=None):
        self.model = model.eval()
        self.preprocess = preprocess
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.autocast_dtype = autocast_dtype
        self.reset()

    def reset(self) -> None:
        self.frame_index = -1
        self.entries: list[list[torch.Tensor]] = []  # per entry: the 8 cached attention inputs of one frame
        self.size = None

    def __call__(self, frame) -> torch.Tensor:
        image = frame.image if hasattr(frame, "image") else frame
        size = tuple(image.shape[-2:])
        if self.size is not None and size != self.size:
            raise ValueError(f"frame {self.frame_index + 1} is {size}, the stream's frames are {self.size}: "
                             "reset() before a change of size")
        x = self.preprocess(frame).to(self.device).unsqueeze(0).unsqueeze(0)
        self.frame_index += 1
        with torch.inference_mode(), torch.autocast(self.device.type, self.autocast_dtype or torch.float32,
                                                    enabled=self.autocast_dtype is not None):
            if not self.entries:
                depth, states = self.model.forward_cached(x)
                self.entries = [states] * self.WINDOW
            else:
                window = self.entries[:2] + self.entries[-(self.WINDOW - 3):]
                caches = [torch.cat([entry[i] for entry in window], dim=1) for i in range(len(window[0]))]
                depth, states = self.model.forward_cached(x, caches)
                self.entries.append(states)
        if self.frame_index + self.WINDOW > self.GAP + 1:
            del self.entries[1]
        self.size = size
        depth = F.interpolate(depth[0].float().unsqueeze(1), size=size, mode="bilinear", align_corners=True)
        return depth[0, 0].cpu()
