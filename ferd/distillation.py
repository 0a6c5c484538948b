"""Phase C: student distillation on clean + adversarial examples (METHOD.md §6).

Training attacks run PGD on the *student* from x + 0.001 N(0,1):
- `untargeted` (DFRD): maximise KL(p(t) || p(S(x'))).
- `uniform-kl` (UTAE, reference variant): maximise KL(p(t) || p(S(x'))) - lambda_u KL(U || p(S(x'))).
- `sampled-target` (UTAE): each sample gets a target drawn uniformly from the classes != y; PGD minimises
  CE(S(x'), target).
- `marginal-kl` (UTAE at full strength): maximise KL(p(t) || p(S(x'))) - lambda_m KL(U || m_y), m_y the batch's
  mean wrong-class prediction over the samples of true class y: the batch's targets spread, each sample still
  crosses the nearest boundary it can (chosen by measurement, README "A UTAE at full strength").
Student loss: `rslad` = w_nat KL(p(t) || p(S(x))) + w_rob KL(p(t) || p(S(x_adv)));
`reference-code` = 5/6 CE(p(t), p(S(x))) + 1/6 CE(p(t), p(S(x_adv))) (what the released code optimises, §8.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ferd.attacks import isolated_rng, pgd
from ferd.config import Config
from ferd.events import TrainingAttackStrength
from ferd.feature_split import uniformity_loss
from ferd.metrics import target_counts, target_entropy
from ferd.models import folded_batchnorm
from ferd.synthesis import eval_mode, kl_div, kl_from

START_NOISE = 0.001  # sigma of the Gaussian start of the training attacks (reference code)


def sampled_targets(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A target per sample, uniform over the classes != y."""
    return (y + torch.randint(1, num_classes, y.shape, device=y.device)) % num_classes


class WrongClassMarginal:
    """`wrong_class_marginal_loss` for fixed labels y: what depends only on y is computed once (a training attack
    evaluates the loss at each of its steps on the same labels)."""

    def __init__(self, y: torch.Tensor, num_classes: int) -> None:
        c = num_classes
        onehot = F.one_hot(y, c).float()
        counts = onehot.sum(dim=0)
        present = counts > 0
        self.own = onehot.bool()  # (B, C): each sample's own class, dropped from its prediction
        self.average = (onehot / counts.clamp_min(1.0)).t()[present]  # (classes present, B): mean over the class
        self.wrong = (~torch.eye(c, dtype=torch.bool, device=y.device))[present].float() / (c - 1)
        self.offset = math.log(c - 1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        p = F.softmax(logits.masked_fill(self.own, float("-inf")), dim=1)  # prediction restricted to the classes != y
        m = self.average.to(p.dtype) @ p  # (classes present, C), rows sum to 1
        log_m = torch.log(m.clamp_min(1e-12))
        return (-(log_m * self.wrong.to(p.dtype)).sum(dim=1) - self.offset).mean()


def wrong_class_marginal_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the true classes c in the batch of KL(U || m_c), U uniform over the classes != c and m_c the batch
    mean, over the samples of class c, of their predictions restricted to the classes != c (renormalised).

    0 iff each true class's adversarial mass is spread evenly over the other classes *on average*: one sample may
    go wholly to one class as long as its classmates go to the others (unlike `uniformity_loss`, which asks every
    prediction to be uniform)."""
    return WrongClassMarginal(y, logits.shape[1])(logits)


def training_attack(cfg: Config, student: nn.Module, x: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor,
                    num_classes: int) -> torch.Tensor:
    """The adversarial examples the student trains on (mode chosen by cfg.utae_mode), student in eval mode."""
    common = dict(eps=cfg.eps, steps=cfg.train_attack_steps, step_size=cfg.step_size, init_noise=START_NOISE)
    with eval_mode(student), folded_batchnorm(student):
        if cfg.utae_mode == "sampled-target":
            target = sampled_targets(y, num_classes)
            return pgd(student, x, target, loss="ce", targeted=True, **common)
        if cfg.utae_mode == "marginal-kl":
            lam_m = cfg.utae_marginal_weight
            kl, marginal = kl_from(t_logits), WrongClassMarginal(y, num_classes)

            def spread(logits: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
                return kl(logits) - lam_m * marginal(logits)

            return pgd(student, x, y, loss=spread, **common)
        if cfg.utae_mode == "uniform-kl":
            lam, kl = cfg.utae_weight, kl_from(t_logits)

            def objective(logits: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
                return kl(logits) - lam * uniformity_loss(logits)

            return pgd(student, x, y, loss=objective, **common)

        return untargeted_attack(cfg, student, x, y, t_logits)


def untargeted_attack(cfg: Config, student: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      t_logits: torch.Tensor) -> torch.Tensor:
    """Plain KL-PGD (DFRD's training attack, and the reference every training attack's strength is measured by)."""

    kl = kl_from(t_logits)

    def untargeted(logits: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        return kl(logits)

    with eval_mode(student), folded_batchnorm(student):
        return pgd(student, x, y, loss=untargeted, eps=cfg.eps, steps=cfg.train_attack_steps,
                   step_size=cfg.step_size, init_noise=START_NOISE)


def adversarial_predictions(student: nn.Module, x_adv: torch.Tensor) -> torch.Tensor:
    """The student's predicted class on the adversarial examples, in eval mode (running BN statistics, as the
    attack saw it): what the attack-target histogram and the success rate count. The student's mode is restored."""
    with eval_mode(student), folded_batchnorm(student), torch.no_grad():
        return student(x_adv).argmax(dim=1)


class AttackTally:
    """One epoch of training-attack outcomes: the (true, predicted) histogram, how many adversarial examples the
    student (eval mode) assigns to a class other than y, the label the attack works against (the sampled class of a
    synthetic sample, the true label on real data), and the same for the untargeted reference where it ran."""

    def __init__(self, num_classes: int, *, cfg: Config | None = None, epoch: int = 0) -> None:
        """With cfg, `observe` runs the untargeted reference on this epoch when it is a reference epoch (every
        cfg.attack_reference_every epochs and the last)."""
        every = cfg.attack_reference_every if cfg is not None else 0
        self.cfg = cfg
        self.epoch = epoch
        self.with_reference = every > 0 and (epoch % every == 0 or epoch == cfg.epochs)
        self.num_classes = num_classes
        self.counts = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.reference_counts = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.samples = 0
        self.reference_samples = 0

    def add(self, y: torch.Tensor, pred: torch.Tensor, reference_pred: torch.Tensor | None = None) -> None:
        y_np = y.cpu().numpy()
        self.counts += target_counts(y_np, pred.cpu().numpy(), self.num_classes)
        self.samples += len(y_np)
        if reference_pred is not None:
            self.reference_counts += target_counts(y_np, reference_pred.cpu().numpy(), self.num_classes)
            self.reference_samples += len(y_np)

    def observe(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor,
                x_adv: torch.Tensor, step: int) -> None:
        """Count one training batch: the student's eval-mode predictions on x_adv and, on reference epochs, on an
        untargeted KL-PGD of the same batch, drawn from a private random stream so that it never changes training."""
        reference = None
        if self.with_reference:
            with isolated_rng(self.cfg.seed * 1_000_003 + self.epoch * 1_000 + step):
                reference = adversarial_predictions(student, untargeted_attack(self.cfg, student, x, y, t_logits))
        self.add(y, adversarial_predictions(student, x_adv), reference)

    def event(self, epoch: int) -> TrainingAttackStrength:
        ref = self.reference_samples > 0
        nan = float("nan")
        return TrainingAttackStrength(
            epoch=epoch, samples=self.samples, success_rate=_share(self.counts.sum(), self.samples),
            target_entropy=target_entropy(self.counts),
            reference_success_rate=_share(self.reference_counts.sum(), self.reference_samples) if ref else nan,
            reference_target_entropy=target_entropy(self.reference_counts) if ref else nan)


def _share(hits: int, n: int) -> float:
    return float(hits) / n if n else float("nan")


def soft_ce(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """CE(p(t), p(s)) = -sum p(t) log p(s), batch mean."""
    return -(F.softmax(t_logits, dim=1) * F.log_softmax(s_logits, dim=1)).sum(dim=1).mean()


@dataclass(frozen=True)
class StudentLoss:
    total: torch.Tensor
    nat: torch.Tensor
    rob: torch.Tensor


def student_loss(cfg: Config, t_logits: torch.Tensor, s_clean: torch.Tensor, s_adv: torch.Tensor) -> StudentLoss:
    if cfg.student_loss == "reference-code":
        nat, rob = soft_ce(t_logits, s_clean), soft_ce(t_logits, s_adv)
        return StudentLoss(total=5 / 6 * nat + 1 / 6 * rob, nat=nat, rob=rob)
    nat, rob = kl_div(t_logits, s_clean), kl_div(t_logits, s_adv)
    return StudentLoss(total=cfg.w_nat * nat + cfg.w_rob * rob, nat=nat, rob=rob)
