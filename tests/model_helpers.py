"""Small model fixtures shared by test files (imported as a plain module: pytest puts tests/ on sys.path)."""
import torch

TINY = dict(backbone="vit_tiny_patch16_224", hooks=[2, 5, 8, 11], features=32)


def randomize_(model, seed=0, matrix_std=0.02):
    """Random weights everywhere, BN statistics included (fresh init leaves some zeros/ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if p.is_floating_point():
                if "running_var" in name:
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * (matrix_std if p.dim() > 1 else 0.1))
    return model
