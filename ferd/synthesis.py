"""Phase A of an epoch: synthesise a batch by inverting the teacher (METHOD.md §3).

    L_G = w_bn L_BN + w_oh L_oh + w_adv L_adv + w_uni L_uni

The generator G and the latent z are optimised for N_G steps; the batch x* with the lowest L_G is kept.
With `generator_reset = "epoch"` G is re-initialised every epoch (the reference); with "never" G and its
optimiser persist and only z is drawn afresh (METHOD.md §10).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ferd.augment import augment
from ferd.config import Config
from ferd.feature_split import split_teacher_features, uniformity_loss
from ferd.models import folded_batchnorm


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or infinite; the run stops with this reason."""


@contextmanager
def no_param_grads(model: nn.Module) -> Iterator[None]:
    """Temporarily stop gradients into `model`'s parameters (they still flow through it to its input)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class BNStatLoss:
    """DeepInversion's loss on the teacher's BN layers: sum over layers of
    ||mu_batch - mu_running||_2 + ||var_batch - var_running||_2 of each BN layer's input."""

    def __init__(self, model: nn.Module) -> None:
        self._terms: list[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._hook) for m in model.modules()
                         if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not self._handles:
            raise ValueError("the teacher has no BatchNorm layers: the BN-statistics loss needs them")
        self.active = False

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        if not self.active:
            return
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        self._terms.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))

    @contextmanager
    def collect(self) -> Iterator[list[torch.Tensor]]:
        self._terms = []
        self.active = True
        try:
            yield self._terms
        finally:
            self.active = False

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def init_generator(gen: nn.Module) -> None:
    """DCGAN initialisation: conv/linear weights ~ N(0, 0.02), BN weights ~ N(1, 0.02), biases 0."""
    for m in gen.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.weight is not None:
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)
            m.reset_running_stats()


def kl_from(p_logits: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """q_logits -> KL(softmax(p) || softmax(q)), batch mean (T = 1), with p's log-probabilities computed once (an
    attack evaluates it at each step against the same teacher logits)."""
    p_log = F.log_softmax(p_logits, dim=1)
    return lambda q_logits: F.kl_div(F.log_softmax(q_logits, dim=1), p_log, reduction="batchmean", log_target=True)


def kl_div(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)), batch mean (T = 1)."""
    return kl_from(p_logits)(q_logits)


@dataclass(frozen=True)
class SynthesisResult:
    x: torch.Tensor
    """(B, C, H, W) kept batch x* in [0,1], detached, not augmented."""
    y: torch.Tensor
    """(B,) sampled classes."""
    loss: float
    """L_G of the kept batch."""


@dataclass(frozen=True)
class GeneratorStep:
    step: int
    losses: dict[str, float]
    robust_fraction: float


class Synthesizer:
    """Owns the generator, its optimiser and the BN hooks on the teacher."""

    def __init__(self, cfg: Config, teacher: nn.Module, generator: nn.Module, *, num_classes: int, flip: bool,
                 device: torch.device) -> None:
        self.cfg = cfg
        self.teacher = teacher
        self.generator = generator.to(device)
        self.num_classes = num_classes
        self.flip = flip
        self.device = device
        self.bn_loss = BNStatLoss(teacher)
        init_generator(self.generator)
        self.optimizer = self._new_optimizer()

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.generator.parameters(), lr=self.cfg.lr_generator, betas=(0.5, 0.999))

    def close(self) -> None:
        self.bn_loss.close()

    def synthesise(self, weights: torch.Tensor, student: nn.Module,
                   should_stop: Callable[[], bool] = lambda: False
                   ) -> Generator[GeneratorStep, None, SynthesisResult | None]:
        """Run N_G generator steps, yielding each step's losses; returns the kept batch x*
        (None if stopped before the first step finished, or stopped part-way: a partial batch is not kept)."""
        cfg = self.cfg
        if cfg.generator_reset == "epoch":
            init_generator(self.generator)
            self.optimizer = self._new_optimizer()
        y = torch.multinomial(weights.to(self.device), cfg.batch_size, replacement=True)
        z = torch.randn(cfg.batch_size, cfg.latent_dim, device=self.device, requires_grad=True)
        z_opt = torch.optim.Adam([z], lr=cfg.lr_latent, betas=(0.5, 0.999))
        self.generator.train()
        best: SynthesisResult | None = None
        with eval_mode(student), no_param_grads(student), folded_batchnorm(student):
            for step in range(1, cfg.generator_steps + 1):
                if should_stop():
                    break
                x = self.generator(z)
                xa = augment(x, flip=self.flip) if cfg.augment else x
                with self.bn_loss.collect() as terms:
                    h = self.teacher.features(xa)
                l_bn = torch.stack(terms).sum()
                t_logits = self.teacher.head(h)
                l_oh = F.cross_entropy(t_logits, y)
                l_adv = -kl_div(t_logits, student(xa)) if cfg.w_adv > 0 else torch.zeros((), device=self.device)
                frac = float("nan")
                if cfg.w_uni > 0:
                    split = split_teacher_features(self.teacher, h, y, steps=cfg.split_steps, lr=cfg.split_lr,
                                           beta=cfg.split_beta, rule=cfg.mask_rule)
                    l_uni = uniformity_loss(self.teacher.head(h * (1.0 - split.mask)))
                    frac = split.robust_fraction
                else:
                    l_uni = torch.zeros((), device=self.device)
                loss = cfg.w_bn * l_bn + cfg.w_oh * l_oh + cfg.w_adv * l_adv + cfg.w_uni * l_uni
                value = float(loss.detach())
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"generator loss is {value} at step {step}")
                if best is None or value < best.loss:
                    best = SynthesisResult(x=x.detach().clone(), y=y.clone(), loss=value)
                self.optimizer.zero_grad(set_to_none=True)
                z_opt.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                z_opt.step()
                parts = {"bn": l_bn, "oh": l_oh, "adv": l_adv, "uni": l_uni}
                yield GeneratorStep(step=step, robust_fraction=frac,
                                    losses={"total": value, **{k: float(v.detach()) for k, v in parts.items()}})
        return None if should_stop() else best
