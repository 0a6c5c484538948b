"""Robust / non-robust feature split (information-bottleneck style, METHOD.md §5).

For teacher features h (B, K, H, W) and labels y, learn per-(sample, channel) noise scales
sigma = softplus(lambda) that the teacher's head tolerates:

    min_lambda  CE(head(h + sigma * eps), y) + beta * mean_bk 1/2 (v/sigma^2 + log(sigma^2/v) - 1)

with v the spatial variance of h_bk and eps one N(0,1) draw per (sample, channel), broadcast over the spatial
positions (as the released code and upstream IFD). Channels whose learned noise is large are *robust* (mask 1).
`per-channel` (default): robust iff sigma^2_bk > v_bk. `batch-max` (released code): sigma^2_bk > max v.
No gradient flows through the mask; h is treated as a constant.
"""

from __future__ import annotations

import math
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
    """(B, K, H, W) -> (B, K, 1, 1) population variance over the spatial positions, in two passes (mean, then mean
    squared deviation): 0.1 ms at 64 x 128 x 4 x 4 against 2 ms for torch.var over the two small dimensions."""
    mean = h.mean(dim=(2, 3), keepdim=True)
    return (h - mean).square().mean(dim=(2, 3), keepdim=True).clamp_min(_VAR_FLOOR)


def robust_mask(sigma2: torch.Tensor, variance: torch.Tensor, rule: str) -> torch.Tensor:
    """The mask rule of METHOD.md §5 as a float tensor of 0/1 with sigma2's shape."""
    if rule == "per-channel":
        return (sigma2 > variance).float()
    if rule == "batch-max":
        return (sigma2 > variance.max()).float()
    raise ValueError(f"unknown mask rule {rule!r}; choose per-channel or batch-max")


def ib_objective(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, y: torch.Tensor,
                 lam: torch.Tensor, variance: torch.Tensor, noise: torch.Tensor, beta: float) -> torch.Tensor:
    """CE of the head on noisy features + beta * KL(N(0, sigma^2) || N(0, v)) averaged over (b, k).

    noise has lam's shape (B, K, 1, 1): one draw per (sample, channel), broadcast over space."""
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
        noise = torch.randn_like(lam)
        loss = ib_objective(head, h, y, lam, variance, noise, beta)
        (grad,) = torch.autograd.grad(loss, lam)
        lam.grad = grad
        opt.step()
    with torch.no_grad():
        sigma2 = F.softplus(lam) ** 2
    return FeatureSplit(mask=robust_mask(sigma2, variance, rule), sigma2=sigma2, variance=variance)


def split_features_pooled_linear(linear: torch.nn.Linear, h: torch.Tensor, y: torch.Tensor, *, steps: int = 50,
                                 lr: float = 0.1, beta: float = 0.3, rule: str = "per-channel",
                                 eps: float = 1e-8, compiled: bool | None = None) -> FeatureSplit:
    """`split_features` for heads of the form linear(avgpool(relu(h))) (every model in ferd.models), with the
    gradient in closed form and Adam written out: no autograd graph per inner step.

    Same objective, same noise draws (all steps' draws taken at once from the global RNG: on the CPU the same
    numbers in the same order as one draw per step), same Adam update as torch.optim.Adam (defaults betas
    0.9/0.999, eps 1e-8): the masks equal the reference up to float rounding (a test compares them). Gradient,
    with z = h + sigma n, p = mean_hw relu(z), logits = p W^T + b:
        dCE/dsigma_bk = [(softmax - onehot) W]_bk / (B H W) * n_bk * #{hw: z_bkhw > 0}
        dKL/dsigma_bk = (1/sigma - v/sigma^3) / (B K)
        d/dlambda = (dCE/dsigma + beta dKL/dsigma) * sigmoid(lambda)
    The loop works on h as (B, H*W, K) (a view of channels_last features), the count as a float sum of
    sign(relu(z)): four passes over the features a step.

    `compiled` (default: float32 features on the CPU) runs the steps as one numba loop (ferd.split_kernel): the same
    computation without torch's per-operation dispatch, equal to the torch steps up to float rounding.
    """
    h = h.detach()
    b, k, hh, ww = h.shape
    weight, bias = linear.weight.detach(), linear.bias.detach()
    variance = spatial_variance(h)  # (B, K, 1, 1)
    hv = h.permute(0, 2, 3, 1).reshape(b, hh * ww, k)  # (B, HW, K); no copy when h is channels_last
    var = variance.view(b, 1, k)
    noises = torch.randn(steps, b, k, 1, 1, device=h.device, dtype=h.dtype).view(steps, b, 1, k)
    compilable = h.device.type == "cpu" and h.dtype == torch.float32
    compiled = compilable if compiled is None else compiled
    if compiled and not compilable:
        raise ValueError(f"the compiled split takes float32 CPU features, got {h.dtype} on {h.device}")
    if compiled:
        from ferd.split_kernel import adam_steps

        arrays = (hv, variance.view(b, k), noises.view(steps, b, k), weight, bias, y)
        lam = adam_steps(*(a.contiguous().numpy() for a in arrays), lr, beta, eps)
        sigma2 = (F.softplus(torch.from_numpy(lam)) ** 2).view(b, k, 1, 1)
        return FeatureSplit(mask=robust_mask(sigma2, variance, rule), sigma2=sigma2, variance=variance)
    onehot = F.one_hot(y, weight.shape[0]).to(h.dtype)
    lam = torch.zeros(b, 1, k, device=h.device, dtype=h.dtype)
    m = torch.zeros_like(lam)
    v2 = torch.zeros_like(lam)
    beta1, beta2 = 0.9, 0.999
    kl_scale = beta / (b * k)
    ce_scale = 1.0 / (b * hh * ww)
    for t in range(1, steps + 1):
        noise = noises[t - 1]  # (B, 1, K), broadcast over space
        sigma = F.softplus(lam)
        r = torch.addcmul(hv, sigma, noise).relu_()  # relu(z), (B, HW, K)
        pooled = r.sum(dim=1).mul_(1.0 / (hh * ww))  # (B, K)
        count = torch.sign(r).sum(dim=1, keepdim=True)  # (B, 1, K): #{hw: z > 0}
        logits = torch.addmm(bias, pooled, weight.t())
        dpooled = ((torch.softmax(logits, dim=1) - onehot) @ weight).view(b, 1, k)  # times 1/B in ce_scale
        grad = (count * noise * dpooled * ce_scale + kl_scale * (1.0 / sigma - var / sigma**3)) * torch.sigmoid(lam)
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v2.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        lam.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
    sigma2 = (F.softplus(lam) ** 2).view(b, k, 1, 1)
    return FeatureSplit(mask=robust_mask(sigma2, variance, rule), sigma2=sigma2, variance=variance)


def split_teacher_features(teacher: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, **kwargs) -> FeatureSplit:
    """The split for `teacher`: the closed-form path when its head is linear(avgpool(relu(h))) (every
    ferd.models Classifier), the autograd reference otherwise."""
    from ferd.models import Classifier

    if isinstance(teacher, Classifier) and type(teacher).head is Classifier.head:
        return split_features_pooled_linear(teacher.classifier, h, y, **kwargs)
    return split_features(teacher.head, h, y, **kwargs)


def uniformity_loss(logits: torch.Tensor) -> torch.Tensor:
    """KL(U || softmax(logits)) averaged over the batch: 0 iff every prediction is uniform."""
    c = logits.shape[1]
    logp = F.log_softmax(logits, dim=1)
    return (-torch.log(torch.tensor(float(c), device=logits.device)) - logp.mean(dim=1)).mean()
