"""DPT (Ranftl, Bochkovskiy, Koltun 2021): encoder -> Reassemble -> 3x3 convs -> fusion -> head.

Argument names, defaults and state_dict keys are those of the original release (isl-org/DPT), so
its checkpoints load with `load_state_dict(..., strict=True)` and give its outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import specs
from .backbone import DPTBackbone, resolve_backbone
from .blocks import FeatureFusionBlock
from .heads import depth_head, segmentation_head

# Inputs of the released models are padded to this multiple (patch 16, then the stride-2 conv of
# stage 4); a model's own is `DPT.input_multiple` (twice its patch size).
SIZE_MULTIPLE = specs.get("dpt-large").input_multiple


def _reassemble_widths(spec, features, fusion_features) -> tuple[list[int], int]:
    """(widths of the four Reassemble outputs, width of the fusion blocks) from `features`:
    an int is the fusion width (and, for a non-released backbone, every Reassemble width too);
    a list of four sets the Reassemble widths, and the fusion width is then 256 as in the original.
    `fusion_features`, when given, sets the fusion width in either case."""
    if isinstance(features, int):
        widths = list(spec.reassemble_features) if any(spec.reassemble_features) else [features] * 4
        return widths, fusion_features or features
    widths = [int(f) for f in features]
    if len(widths) != 4:
        raise ValueError(f"features must be an int or a list of four ints, got {features!r}")
    return widths, fusion_features or 256


class Scratch(nn.Module):
    """The decoder after Reassemble: `layerN_rn` (3x3 to the fusion width) and `refinenetN`."""

    def __init__(self, in_widths, features: int, use_bn: bool):
        super().__init__()
        for i, width in enumerate(in_widths):
            self.add_module(f"layer{i + 1}_rn", nn.Conv2d(width, features, 3, padding=1, bias=False))
        for i in range(4):
            self.add_module(f"refinenet{i + 1}", FeatureFusionBlock(features, use_bn))

    def forward(self, layers: list[torch.Tensor]) -> torch.Tensor:
        rn = [getattr(self, f"layer{i + 1}_rn")(x) for i, x in enumerate(layers)]
        path = self.refinenet4(rn[3])
        path = self.refinenet3(path, rn[2])
        path = self.refinenet2(path, rn[1])
        return self.refinenet1(path, rn[0])


class DPT(nn.Module):
    """Shared body of the depth and segmentation models; `head` maps the last fused map to outputs."""

    # The encoder's parameters (the timm ViT, with the hybrid's ResNet stem): their own learning rate in
    # training (dpt_fast.train.param_groups).
    encoder_prefix = "pretrained.model."

    def __init__(self, head_builder, backbone: str = "vitb_rn50_384", readout: str = "project",
                 features=256, use_bn: bool = False, hooks=None, layer_norm_eps: float | None = None,
                 fusion_features: int | None = None, vit_kwargs: dict | None = None, channels_last: bool = True):
        super().__init__()
        spec = resolve_backbone(backbone, hooks)
        widths, fusion_width = _reassemble_widths(spec, features, fusion_features)
        self.pretrained = DPTBackbone(spec, widths, readout, layer_norm_eps, vit_kwargs)
        if self.pretrained.hybrid:  # stages 1-2 are the ResNet maps: their widths are the ResNet's
            resnet = self.pretrained.model.patch_embed.backbone
            widths[:2] = [resnet.stages[i].blocks[-1].conv3.out_channels for i in range(2)]
        self.scratch = Scratch(widths, fusion_width, use_bn)
        self.scratch.output_conv = head_builder(fusion_width)
        self.channels_last = channels_last
        self.config = {"backbone": backbone, "readout": readout, "features": features, "use_bn": use_bn,
                       "hooks": list(spec.hooks), "layer_norm_eps": layer_norm_eps,
                       "fusion_features": fusion_features, "vit_kwargs": dict(vit_kwargs or {}),
                       "channels_last": channels_last}

    @property
    def input_multiple(self) -> int:
        """What H and W are padded to: the patch grid must be even for the stride-2 conv of stage 4
        and the x2 upsampling of the fusion blocks to meet (32 for the patch-16 ViTs)."""
        return 2 * self.pretrained.patch_size

    @property
    def fusion_width(self) -> int:
        return self.scratch.refinenet1.out_conv.out_channels

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError that says what was expected when `x` cannot be a batch of images."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"expected a torch.Tensor [B, 3, H, W], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D tensor [B, 3, H, W], got {x.dim()}-D with shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            raise ValueError(f"expected 3 channels (RGB) in dim 1, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point image tensor (normalised, see dpt_fast.transforms), "
                             f"got {x.dtype}")
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"expected a non-empty batch, got shape {tuple(x.shape)}")
        device = self.scratch.layer1_rn.weight.device
        if x.device != device:
            raise ValueError(f"input is on {x.device} but the model is on {device}: move one of them")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] (H, W multiples of 32) -> last fused map [B, F, H/2, W/2]."""
        layers = self.pretrained(x)
        if self.channels_last:
            layers = [t.contiguous(memory_format=torch.channels_last) for t in layers]
        return self.scratch(layers)

    def _padded(self, x: torch.Tensor):
        """Pad bottom/right (replicate) to `input_multiple`; returns (padded, (H, W)) to crop back."""
        self.check_input(x)
        param = self.scratch.layer1_rn.weight
        if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(param.dtype)
        height, width = x.shape[-2:]
        multiple = self.input_multiple
        pad_h, pad_w = -height % multiple, -width % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return x, (height, width)


class DPTDepthModel(DPT):
    """Monocular depth: returns relative inverse depth [B, H, W] (or depth if `invert`).

    Any input size works: sizes that are not multiples of 32 are padded (replicate, bottom/right)
    and the prediction is cropped back, so H and W of the output always equal the input's.
    """

    def __init__(self, path=None, non_negative: bool = True, scale: float = 1.0, shift: float = 0.0,
                 invert: bool = False, backbone: str = "vitb_rn50_384", readout: str = "project",
                 features=256, use_bn: bool = False, hooks=None, layer_norm_eps: float | None = None,
                 **kwargs):
        super().__init__(lambda width: depth_head(width, non_negative), backbone=backbone, readout=readout,
                         features=features, use_bn=use_bn, hooks=hooks, layer_norm_eps=layer_norm_eps, **kwargs)
        self.scale, self.shift, self.invert = scale, shift, invert
        self.config.update(model_class="DPTDepthModel", non_negative=non_negative, scale=scale, shift=shift,
                           invert=invert)
        if path is not None:
            load_original_checkpoint(self, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (height, width) = self._padded(x)
        inv_depth = self.scratch.output_conv(self.forward_features(x)).squeeze(1)[:, :height, :width]
        if not self.invert:
            return inv_depth
        depth = self.scale * inv_depth + self.shift
        return 1.0 / depth.clamp(min=1e-8)


class DPTSegmentationModel(DPT):
    """Semantic segmentation: logits [B, num_classes, H, W]; in training mode (logits, aux_logits),
    aux_logits [B, num_classes, H/2, W/2] from `auxlayer` on the last fused map (loss weight 0.2)."""

    def __init__(self, num_classes: int, path=None, backbone: str = "vitb_rn50_384", readout: str = "project",
                 features=256, use_bn: bool = True, hooks=None, layer_norm_eps: float | None = None, **kwargs):
        super().__init__(lambda width: segmentation_head(width, num_classes), backbone=backbone, readout=readout,
                         features=features, use_bn=use_bn, hooks=hooks, layer_norm_eps=layer_norm_eps, **kwargs)
        self.num_classes = num_classes
        self.auxlayer = segmentation_head(self.fusion_width, num_classes, upsample=False)
        self.config.update(model_class="DPTSegmentationModel", num_classes=num_classes)
        if path is not None:
            load_original_checkpoint(self, path)

    def forward(self, x: torch.Tensor):
        x, (height, width) = self._padded(x)
        fused = self.forward_features(x)
        logits = self.scratch.output_conv(fused)[:, :, :height, :width]
        if not self.training:
            return logits
        aux = self.auxlayer(fused)[:, :, : (height + 1) // 2, : (width + 1) // 2]
        return logits, aux


def load_original_checkpoint(model: nn.Module, path) -> None:
    """The original's `path=` argument: load a release .pt (optionally wrapped as {"model": ...})."""
    from ..checkpoints import load_state_dict_into  # below the models: reads files, builds nothing
    load_state_dict_into(model, path)
