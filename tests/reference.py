"""Helpers shared by the parity tests: random reference weights and output comparison."""

import torch


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Move every 1-d parameter (norm weights and biases, all biases) away from its initial value.

    Freshly initialised norms are exactly 1 and biases often exactly 0: a loader that dropped them
    would still match. After this, every tensor carries information.
    """
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.ndim == 1:
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, relative to the output's scale (max |a|, at least 1)."""
    return ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp(min=1.0)).item()
