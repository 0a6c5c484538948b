"""The image generator of the synthesis phase (METHOD.md §3)."""

from __future__ import annotations

import torch
import torch.nn as nn


class Generator(nn.Module):
    """DCGAN-style generator (as in DFAD/CMI/DFRD): z -> linear -> BN -> 2 x (upsample, 3x3 conv, BN, LeakyReLU)
    -> 3x3 conv -> sigmoid, so images are in [0,1]. image_size must be divisible by 4 (16, 28, 32, 64, ...)."""

    def __init__(self, latent_dim: int, out_channels: int, image_size: int, *, width: int = 64) -> None:
        super().__init__()
        if image_size % 4 or image_size < 4:
            raise ValueError(f"Generator: image_size must be a positive multiple of 4, got {image_size}")
        self.latent_dim = latent_dim
        self.init_size = image_size // 4
        self.width = width
        self.l1 = nn.Linear(latent_dim, 2 * width * self.init_size ** 2)
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, out_channels, 3, padding=1),
            nn.Sigmoid(),
        )
        self.to(memory_format=torch.channels_last)  # oneDNN's NHWC kernels, as the classifiers (ferd.models)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.l1(z).view(z.shape[0], 2 * self.width, self.init_size, self.init_size)  # (B, 2w, s/4, s/4)
        h = h.contiguous(memory_format=torch.channels_last)
        return self.conv_blocks(h)  # (B, C, s, s)
