"""L-infinity attacks on models that take [0,1] pixels (METHOD.md §6-7).

Every attack has one signature, `attack(model, x, y, *, eps, ...) -> x_adv`, returns a detached tensor
with ||x_adv - x||_inf <= eps and x_adv in [0,1], and leaves the model's train/eval mode and its
parameters' requires_grad flags as it found them. Attacks run the model in eval mode.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from pyautoattack import AutoAttack

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration of an attack; both restored on exit."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        model.train(was_training)
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)


def cw_margin(logits: torch.Tensor, y: torch.Tensor, kappa: float = 50.0) -> torch.Tensor:
    """CW loss to maximise (METHOD.md §7): -clamp(z_y - max_{j != y} z_j + kappa, min=0), batch mean.

    Every sample not yet misclassified by a margin of kappa has a gradient, however far its true logit leads."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return -torch.clamp(true - other + kappa, min=0).mean()


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 20,
        step_size: float | None = None, loss: str | Loss = "ce", random_start: bool = True,
        init_noise: float | None = None, targeted: bool = False, kappa: float = 50.0) -> torch.Tensor:
    """Projected gradient descent with sign steps (Madry et al. 2018), L-inf, inputs in [0,1].

    loss: "ce" (cross-entropy on y), "cw" (CW margin with confidence kappa) or a callable
    `(logits, y) -> scalar` to maximise. targeted: y holds target classes and the loss is minimised.
    Start: x + N(0, init_noise^2) when init_noise is given, else uniform in the eps-ball when
    random_start, else x.
    """
    if step_size is None:
        step_size = eps / 4
    if loss == "ce":
        objective: Loss = F.cross_entropy
    elif loss == "cw":
        def objective(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return cw_margin(logits, t, kappa)
    elif callable(loss):
        objective = loss
    else:
        raise ValueError(f"unknown PGD loss {loss!r}; use 'ce', 'cw' or a callable")
    sign = -1.0 if targeted else 1.0
    x = x.detach()
    with attack_mode(model):
        if init_noise is not None:
            x_adv = x + init_noise * torch.randn_like(x)
        elif random_start:
            x_adv = x + torch.empty_like(x).uniform_(-eps, eps)
        else:
            x_adv = x.clone()
        lo, hi = (x - eps).clamp_min(0.0), (x + eps).clamp_max(1.0)  # _project's bounds, once: clamp(., lo, hi)
        x_adv = torch.clamp(x_adv, lo, hi)  # equals _project(x_adv, x, eps) bit for bit (min and max are exact)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                value = objective(model(x_adv), y)
                (grad,) = torch.autograd.grad(value, x_adv)
            x_adv = torch.clamp(x_adv.detach() + sign * step_size * grad.sign(), lo, hi)
    return x_adv.detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size eps on CE, no random start."""
    return pgd(model, x, y, eps=eps, steps=1, step_size=eps, random_start=False)


def cw(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 20,
       step_size: float | None = None, kappa: float = 50.0) -> torch.Tensor:
    """CW-inf: PGD with random start on the Carlini-Wagner margin loss (Carlini & Wagner 2017), L-inf,
    inputs in [0,1]; kappa = 50 as in the robust-distillation literature. step_size defaults to eps/4."""
    return pgd(model, x, y, eps=eps, steps=steps, step_size=step_size, loss="cw", kappa=kappa)


@contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU and CUDA generators for a block and restore their previous states on exit, so random
    starts inside the block neither depend on nor disturb the caller's random stream."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed_all(seed)
        yield


AA_STAGES = {"apgd": "APGD-CE", "apgd_targeted": "APGD-T", "fab": "FAB-T", "square": "Square"}
"""AutoAttack's (standard) sub-attacks in the order they run: the adversary's attribute -> display label."""


def _report_sub_attacks(adversary: AutoAttack, on_stage: Callable[[str], None]) -> None:
    """Call `on_stage(label)` when each of the adversary's sub-attacks starts (its first batch)."""
    for attr, label in AA_STAGES.items():
        attack = getattr(adversary, attr)
        perturb = attack.perturb

        def announced(*args: object, _perturb: Callable = perturb, _label: str = label, **kwargs: object):
            on_stage(_label)
            return _perturb(*args, **kwargs)

        attack.perturb = announced


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, device: str | torch.device,
               version: str = "standard", batch_size: int = 256, seed: int = 0,
               on_stage: Callable[[str], None] | None = None) -> torch.Tensor:
    """AutoAttack (Croce & Hein 2020), L-inf, inputs in [0,1], from the reference implementation (`pyautoattack`).

    `standard` runs APGD-CE, APGD-T, FAB-T and Square and keeps, per sample, the first adversarial example
    that fools the model (x itself where none does). Batches of `batch_size` run on `device` (where the model
    must live); the result is on x's device. AutoAttack reseeds torch's global generators with `seed`: they
    are restored on exit. With fewer than 10 classes the targeted attacks use every other class as a target.
    `on_stage(label)` is called with an `AA_STAGES` label before each batch of a sub-attack.
    """
    x = x.detach()
    y = y.detach()
    tracer = sys.gettrace()  # AutoAttack's dynamic-defence check replaces the trace function (debuggers, coverage)
    try:
        with attack_mode(model), isolated_rng(seed):
            adversary = AutoAttack(model, device=device, eps=eps, norm="Linf", seed=seed, version=version)
            adversary.verbose = False
            if on_stage is not None:
                _report_sub_attacks(adversary, on_stage)
            with torch.no_grad():
                num_classes = model(x[:1].to(device)).shape[1]
            for attack in (adversary.apgd_targeted, adversary.fab):
                attack.n_target_classes = min(attack.n_target_classes, num_classes - 1)
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        sys.settrace(tracer)
    # AutoAttack's own projection can overshoot the ball by float rounding.
    return _project(x_adv.detach().to(x.device), x, eps)


@dataclass(frozen=True)
class AttackSpec:
    """An evaluation attack (METHOD.md §7): its name, a display label and how to run it from the evaluation's
    shared settings. Call it as `spec(model, x, y, eps=..., step_size=..., steps=..., kappa=..., device=...)`."""

    name: str
    label: str
    run: Callable[..., torch.Tensor]

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float,
                 steps: int = 20, kappa: float = 50.0, device: str | torch.device = "cpu",
                 seed: int = 0) -> torch.Tensor:
        return self.run(model, x, y, eps=eps, step_size=step_size, steps=steps, kappa=kappa, device=device, seed=seed)


def _run_fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, **_: object) -> torch.Tensor:
    return fgsm(model, x, y, eps=eps)


def _run_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int,
             **_: object) -> torch.Tensor:
    return pgd(model, x, y, eps=eps, steps=steps, step_size=step_size, loss="ce", random_start=True)


def _run_cw(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int,
            kappa: float, **_: object) -> torch.Tensor:
    return cw(model, x, y, eps=eps, steps=steps, step_size=step_size, kappa=kappa)


def _run_aa(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, device: str | torch.device,
            seed: int, **_: object) -> torch.Tensor:
    return autoattack(model, x, y, eps=eps, device=device, seed=seed)


ATTACKS: dict[str, AttackSpec] = {
    "fgsm": AttackSpec("fgsm", "FGSM", _run_fgsm),
    "pgd20": AttackSpec("pgd20", "PGD-20", _run_pgd),
    "cw": AttackSpec("cw", "CW-inf", _run_cw),
    "aa": AttackSpec("aa", "AutoAttack", _run_aa),
}
"""Evaluation attacks by name (the clean accuracy is not an attack: evaluation handles it)."""


def get_attack(name: str) -> AttackSpec:
    """The evaluation attack called `name`; ValueError listing the valid names otherwise."""
    try:
        return ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}") from None
