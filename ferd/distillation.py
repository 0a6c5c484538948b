"""Phase C: student distillation on clean + adversarial examples (METHOD.md §6).

Training attacks run PGD on the *student* from x + 0.001 N(0,1):
- `untargeted` (DFRD): maximise KL(p(t) || p(S(x'))).
- `uniform-kl` (UTAE, reference variant): maximise KL(p(t) || p(S(x'))) - lambda_u KL(U || p(S(x'))).
- `sampled-target` (UTAE): each sample gets a target drawn uniformly from the classes != y; PGD minimises
  CE(S(x'), target).
Student loss: `rslad` = w_nat KL(p(t) || p(S(x))) + w_rob KL(p(t) || p(S(x_adv)));
`reference-code` = 5/6 CE(p(t), p(S(x))) + 1/6 CE(p(t), p(S(x_adv))) (what the released code optimises, §8.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ferd.attacks import pgd
from ferd.config import Config
from ferd.feature_split import uniformity_loss
from ferd.synthesis import eval_mode, kl_div

START_NOISE = 0.001  # sigma of the Gaussian start of the training attacks (reference code)


def sampled_targets(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A target per sample, uniform over the classes != y."""
    return (y + torch.randint(1, num_classes, y.shape, device=y.device)) % num_classes


def training_attack(cfg: Config, student: nn.Module, x: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor,
                    num_classes: int) -> torch.Tensor:
    """The adversarial examples the student trains on (mode chosen by cfg.utae_mode), student in eval mode."""
    common = dict(eps=cfg.eps, steps=cfg.train_attack_steps, step_size=cfg.step_size, init_noise=START_NOISE)
    with eval_mode(student):
        if cfg.utae_mode == "sampled-target":
            target = sampled_targets(y, num_classes)
            return pgd(student, x, target, loss="ce", targeted=True, **common)
        if cfg.utae_mode == "uniform-kl":
            lam = cfg.utae_weight

            def objective(logits: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
                return kl_div(t_logits, logits) - lam * uniformity_loss(logits)

            return pgd(student, x, y, loss=objective, **common)

        def untargeted(logits: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
            return kl_div(t_logits, logits)

        return pgd(student, x, y, loss=untargeted, **common)


def adversarial_predictions(student: nn.Module, x_adv: torch.Tensor) -> torch.Tensor:
    """The student's predicted class on the adversarial examples, in eval mode (running BN statistics, as the
    attack saw it): what the attack-target histogram and the success rate count. The student's mode is restored."""
    with eval_mode(student), torch.no_grad():
        return student(x_adv).argmax(dim=1)


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
