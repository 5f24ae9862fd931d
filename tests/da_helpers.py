"""Tiny Depth Anything fixtures shared by the tests/test_depth_anything*.py files.

A transformers DepthAnythingForDepthEstimation with a 64-wide, 1-head (head dim 64, what the fused
attention kernel runs) DINOv2 of five blocks on a 16 x 16 position grid (image_size 224), perturbed
away from its init so that every parameter matters.
"""
import torch

DEPTH = 5
GRID = 16
IMAGE_SIZE = GRID * 14
# transformers' out_indices (1-based stages): V1 taps the last four blocks, V2 spreads them.
OUT_INDICES = {1: [2, 3, 4, 5], 2: [1, 2, 4, 5]}


def hf_model(version: int = 2, metric: bool = False, max_depth: int = 20, seed: int = 0):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
    backbone = Dinov2Config(hidden_size=64, num_hidden_layers=DEPTH, num_attention_heads=1, mlp_ratio=2,
                            image_size=IMAGE_SIZE, patch_size=14, out_indices=OUT_INDICES[version],
                            reshape_hidden_states=False)
    extra = {"depth_estimation_type": "metric", "max_depth": max_depth} if metric else {}
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=64, neck_hidden_sizes=[16, 24, 32, 48],
                                 fusion_hidden_size=32, head_hidden_size=16, **extra)
    torch.manual_seed(seed)
    model = DepthAnythingForDepthEstimation(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            scale = 0.1 if p.dim() > 1 else 0.2
            if "layer_scale" in name or "lambda1" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def hf_predict(model, x):
    with torch.no_grad():
        return model(pixel_values=x).predicted_depth
