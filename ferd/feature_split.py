"""Robust / non-robust feature split (information-bottleneck style, METHOD.md §5).

For teacher features h (B, K, H, W) and labels y, learn per-(sample, channel) noise scales
sigma = softplus(lambda) that the teacher's head tolerates:

    min_lambda  CE(head(h + sigma * eps), y) + beta * mean_bk 1/2 (v/sigma^2 + log(sigma^2/v) - 1)

with v the spatial variance of h_bk. Channels whose learned noise is large are *robust* (mask 1).
`per-channel` (default): robust iff sigma^2_bk > v_bk. `batch-max` (released code): sigma^2_bk > max v.
No gradient flows through the mask; h is treated as a constant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_VAR_FLOOR = 1e-8  # a constant channel has zero spatial variance; keep the KL finite


@dataclass(frozen=True)
class FeatureSplit:
    mask: torch.Tensor
    """(B, K, 1, 1) float, 1 = robust (sample, channel) pair."""
    sigma2: torch.Tensor
    """(B, K, 1, 1) learned noise variance."""
    variance: torch.Tensor
    """(B, K, 1, 1) spatial variance of h (floored)."""

    @property
    def robust_fraction(self) -> float:
        return float(self.mask.mean())


def spatial_variance(h: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) -> (B, K, 1, 1) population variance over the spatial positions."""
    return h.var(dim=(2, 3), keepdim=True, unbiased=False).clamp_min(_VAR_FLOOR)


def robust_mask(sigma2: torch.Tensor, variance: torch.Tensor, rule: str) -> torch.Tensor:
    """The mask rule of METHOD.md §5 as a float tensor of 0/1 with sigma2's shape."""
    if rule == "per-channel":
        return (sigma2 > variance).float()
    if rule == "batch-max":
        return (sigma2 > variance.max()).float()
    raise ValueError(f"unknown mask rule {rule!r}; choose per-channel or batch-max")


def ib_objective(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, y: torch.Tensor,
                 lam: torch.Tensor, variance: torch.Tensor, noise: torch.Tensor, beta: float) -> torch.Tensor:
    """CE of the head on noisy features + beta * KL(N(0, sigma^2) || N(0, v)) averaged over (b, k)."""
    sigma = F.softplus(lam)
    s2 = sigma * sigma
    ce = F.cross_entropy(head(h + sigma * noise), y)
    kl = 0.5 * (variance / s2 + torch.log(s2 / variance) - 1.0).mean()
    return ce + beta * kl


def split_features(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, y: torch.Tensor, *,
                   steps: int = 50, lr: float = 0.1, beta: float = 0.3, rule: str = "per-channel") -> FeatureSplit:
    """Learn the noise scales with Adam (lambda_0 = 0) and threshold them with `rule`.

    `head` must not need gradients for its own parameters (a frozen teacher's head); the loop only
    differentiates with respect to lambda. Uses the global torch RNG for the noise draws.
    """
    h = h.detach()
    b, k = h.shape[:2]
    variance = spatial_variance(h)
    lam = torch.zeros(b, k, 1, 1, device=h.device, dtype=h.dtype, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    for _ in range(steps):
        noise = torch.randn_like(h)
        loss = ib_objective(head, h, y, lam, variance, noise, beta)
        (grad,) = torch.autograd.grad(loss, lam)
        lam.grad = grad
        opt.step()
    with torch.no_grad():
        sigma2 = F.softplus(lam) ** 2
    return FeatureSplit(mask=robust_mask(sigma2, variance, rule), sigma2=sigma2, variance=variance)


def uniformity_loss(logits: torch.Tensor) -> torch.Tensor:
    """KL(U || softmax(logits)) averaged over the batch: 0 iff every prediction is uniform."""
    c = logits.shape[1]
    logp = F.log_softmax(logits, dim=1)
    return (-torch.log(torch.tensor(float(c), device=logits.device)) - logp.mean(dim=1)).mean()
