"""Attack invariants over the whole registry and PGD's variants, on a small CNN trained on 8x8 digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

from ferd.attacks import ATTACKS, AttackSpec, autoattack, cw, cw_margin, fgsm, get_attack, pgd
from ferd.config import EVAL_ATTACKS

EPS = 0.1
STEP = EPS / 4
AA_EPS = 0.2
"""AutoAttack breaks nearly every sample of the digits model at this budget with its first attack, which keeps
its tests short (samples still robust after APGD-CE go through APGD-T, FAB-T and 5000 Square queries)."""


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A conv + BN + linear classifier trained for ~2 s on scikit-learn digits; returns it with 100 test samples."""
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:1500]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        for b in range(0, len(train), 200):
            idx = train[b:b + 200]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return model, x[test], y[test]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _registry_case(name: str):
    def run(model, x, y, eps):
        return get_attack(name)(model, x, y, eps=eps, step_size=eps / 4, steps=10, kappa=50.0, device="cpu")
    return run


def _ce_plus_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y) + cw_margin(logits, y, kappa=5.0)


CASES = {
    **{f"registry-{name}": _registry_case(name) for name in ATTACKS},
    "pgd-ce": lambda m, x, y, eps: pgd(m, x, y, eps=eps, steps=10, loss="ce"),
    "pgd-cw": lambda m, x, y, eps: pgd(m, x, y, eps=eps, steps=10, loss="cw", kappa=10.0),
    "pgd-callable": lambda m, x, y, eps: pgd(m, x, y, eps=eps, steps=10, loss=_ce_plus_margin),
    "pgd-targeted": lambda m, x, y, eps: pgd(m, x, y, eps=eps, steps=10, targeted=True, loss="ce"),
    "pgd-init-noise": lambda m, x, y, eps: pgd(m, x, y, eps=eps, steps=10, init_noise=0.001),
    "pgd-no-start": lambda m, x, y, eps: pgd(m, x, y, eps=eps, steps=10, random_start=False),
    "fgsm": lambda m, x, y, eps: fgsm(m, x, y, eps=eps),
    "cw": lambda m, x, y, eps: cw(m, x, y, eps=eps, steps=10),
}
AA_CASES = {"registry-aa"}
UNTARGETED = [name for name in CASES if name != "pgd-targeted"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("training", [True, False])
def test_bounds_and_model_state_restored(digits, case, training):
    model, x, y = digits
    n, eps = (6, AA_EPS) if case in AA_CASES else (16, EPS)
    x, y = x[:n], y[:n]
    if case == "pgd-targeted":
        y = (y + 1) % 10
    bn = model[1]
    running_mean = bn.running_mean.clone()
    flags = [True, False, True, True, False, True]  # a mix, so restoring "all True" would fail
    for p, f in zip(model.parameters(), flags, strict=True):
        p.requires_grad_(f)
    model.train(training)
    try:
        x_adv = CASES[case](model, x, y, eps)
        assert model.training is training
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())
        assert torch.equal(bn.running_mean, running_mean)  # attacks ran in eval mode
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert not torch.equal(x_adv, x)


@pytest.mark.parametrize("case", UNTARGETED)
def test_robust_accuracy_below_clean(digits, case):
    model, x, y = digits
    eps = EPS
    if case in AA_CASES:
        x, y, eps = x[:20], y[:20], AA_EPS
    clean = _accuracy(model, x, y)
    robust = _accuracy(model, CASES[case](model, x, y, eps), y)
    assert clean >= 0.9
    assert robust < clean


def test_pgd20_at_least_as_strong_as_fgsm(digits):
    model, x, y = digits
    acc_fgsm = _accuracy(model, fgsm(model, x, y, eps=EPS), y)
    acc_pgd = _accuracy(model, pgd(model, x, y, eps=EPS, steps=20), y)
    assert acc_pgd <= acc_fgsm


def test_targeted_pgd_reaches_target(digits):
    """At eps 0.2 the targeted attack lands on a random wrong target far more often than an untargeted one
    (whose predictions hit that target at about chance, 1/9)."""
    model, x, y = digits
    eps = 0.2
    target = (y + 1 + torch.randint(0, 9, y.shape, generator=torch.Generator().manual_seed(0))) % 10
    x_targeted = pgd(model, x, target, eps=eps, steps=20, step_size=eps / 4, targeted=True)
    x_untargeted = pgd(model, x, y, eps=eps, steps=20, step_size=eps / 4)
    with torch.no_grad():
        hit = (model(x_targeted).argmax(1) == target).float().mean().item()
        hit_untargeted = (model(x_untargeted).argmax(1) == target).float().mean().item()
    assert hit > 0.5
    assert hit > 2 * hit_untargeted


def test_pgd_calls_a_callable_loss_each_step(digits):
    model, x, y = digits
    calls = []

    def loss(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(logits.shape)
        return F.cross_entropy(logits, t)

    pgd(model, x[:4], y[:4], eps=EPS, steps=3, loss=loss)
    assert calls == [torch.Size([4, 10])] * 3


def test_pgd_unknown_loss_raises(digits):
    model, x, y = digits
    with pytest.raises(ValueError, match="unknown PGD loss"):
        pgd(model, x[:2], y[:2], eps=EPS, loss="hinge")


def test_registry_names_match_config_and_unknown_lists_valid():
    assert set(ATTACKS) == set(EVAL_ATTACKS) - {"clean"}
    assert all(isinstance(s, AttackSpec) and s.name == n for n, s in ATTACKS.items())
    with pytest.raises(ValueError, match="fgsm, pgd20, cw, aa"):
        get_attack("clean")


def test_registry_steps_and_kappa_are_used(digits):
    model, x, y = digits
    x, y = x[:16], y[:16]
    torch.manual_seed(0)
    a = ATTACKS["pgd20"](model, x, y, eps=EPS, step_size=STEP, steps=1)
    torch.manual_seed(0)
    b = ATTACKS["pgd20"](model, x, y, eps=EPS, step_size=STEP, steps=10)
    torch.manual_seed(0)
    c = pgd(model, x, y, eps=EPS, step_size=STEP, steps=10)
    assert not torch.equal(a, b) and torch.equal(b, c)
    torch.manual_seed(0)
    d = ATTACKS["cw"](model, x, y, eps=EPS, step_size=STEP, steps=10, kappa=0.0)
    torch.manual_seed(0)
    e = cw(model, x, y, eps=EPS, step_size=STEP, steps=10, kappa=0.0)
    assert torch.equal(d, e)


def test_autoattack_restores_global_rng_and_is_deterministic(digits):
    model, x, y = digits
    x, y = x[:6], y[:6]
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    a = autoattack(model, x, y, eps=AA_EPS, device="cpu", seed=1)
    assert torch.equal(torch.rand(4), expected)
    b = autoattack(model, x, y, eps=AA_EPS, device="cpu", seed=1)
    assert torch.equal(a, b)
    assert _accuracy(model, a, y) < _accuracy(model, x, y)


def test_cw_margin_hand_computed():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 5.0, 2.0]])
    y = torch.tensor([0, 2])
    # z_y - max other + kappa: sample 0: 3 - 1 + kappa; sample 1: 2 - 5 + kappa
    assert cw_margin(logits, y, kappa=50.0).item() == pytest.approx(-(52.0 + 47.0) / 2)
    assert cw_margin(logits, y, kappa=1.0).item() == pytest.approx(-(3.0 + 0.0) / 2)  # sample 1 clamped to 0


def test_cw_margin_has_a_gradient_where_the_true_logit_leads_by_more_than_kappa():
    logits = torch.tensor([[100.0, 1.0, 0.0], [0.0, 5.0, -60.0]], requires_grad=True)
    y = torch.tensor([0, 2])  # sample 0 leads by 99 > kappa; sample 1 is misclassified by 65 > kappa
    (grad,) = torch.autograd.grad(cw_margin(logits, y, kappa=50.0), logits)
    assert grad[0].tolist() == pytest.approx([-0.5, 0.5, 0.0])  # pushes z_y down and the runner-up up
    assert grad[1].tolist() == [0.0, 0.0, 0.0]  # beyond the kappa margin: done
