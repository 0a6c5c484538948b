"""Differentiable batch augmentation: per-sample random crop with zero padding and horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_padding(image_size: int) -> int:
    """Padding of the random crop: 2 px for images up to 16 px, 4 px above (the CIFAR convention)."""
    return 2 if image_size <= 16 else 4


def augment(x: torch.Tensor, *, flip: bool, padding: int | None = None) -> torch.Tensor:
    """(B, C, H, W) -> same shape: each sample shifted by a random crop of the padded image, and
    mirrored with probability 1/2 when `flip`. Gradients flow to x (used on generator outputs)."""
    b, c, h, w = x.shape
    p = crop_padding(h) if padding is None else padding
    dev = x.device
    xp = F.pad(x, (p, p, p, p))
    di = torch.randint(0, 2 * p + 1, (b,), device=dev)
    dj = torch.randint(0, 2 * p + 1, (b,), device=dev)
    rows = di[:, None] + torch.arange(h, device=dev)  # (B, H)
    cols = dj[:, None] + torch.arange(w, device=dev)  # (B, W)
    if flip:
        mirrored = torch.rand(b, device=dev) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
