"""Evaluation: hand-checkable counts, subsets, determinism, and no side effects on the caller."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from ferd.evaluation import Evaluation, Interrupted, evaluate, stratified_subset
from ferd.experiments import AA_PGD20, eval_rows, eval_summary

C = 4
EPS = 0.02
FAST = ("clean", "fgsm", "pgd20", "cw")


class LookupModel(nn.Module):
    """Predicts with margin 10 the class encoded in pixel (0, 0) as c / (C - 1) ("oracle"), or always class 0
    ("constant"); a tiny linear term keeps gradients non-zero without ever changing the prediction at EPS."""

    def __init__(self, constant: bool) -> None:
        super().__init__()
        self.constant = constant
        self.linear = nn.Linear(16, C)
        nn.init.normal_(self.linear.weight, std=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.constant:
            cls = torch.zeros(len(x), dtype=torch.long)
        else:
            cls = torch.round(x[:, 0, 0, 0].detach() * (C - 1)).long()
        return 10.0 * nn.functional.one_hot(cls, C).float() + self.linear(x.flatten(1))


def _data(per_class: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    y = y[torch.randperm(len(y), generator=g)]
    x = torch.rand(len(y), 1, 4, 4, generator=g)
    x[:, 0, 0, 0] = y.float() / (C - 1)
    return x, y


def _evaluate(model, x, y, attacks=FAST, **kw) -> Evaluation:
    kw = {"eps": EPS, "step_size": EPS / 4, "steps": 3, "device": "cpu", **kw}
    return evaluate(model, x, y, num_classes=C, attacks=attacks, **kw)


def test_oracle_model_is_always_correct():
    x, y = _data([5, 3, 4, 2])
    ev = _evaluate(LookupModel(constant=False), x, y, batch_size=5)
    assert ev.totals.tolist() == [5, 3, 4, 2]
    assert set(ev.correct) == set(FAST)
    for counts in ev.correct.values():
        assert counts.tolist() == [5, 3, 4, 2]
    np.testing.assert_array_equal(ev.pgd_targets, np.zeros((C, C)))
    m = ev.metrics()["pgd20"]
    assert m.mean == 1.0 and m.worst == 1.0 and m.nsd == 0.0


def test_constant_model_counts_and_targets():
    x, y = _data([5, 3, 4, 2])
    ev = _evaluate(LookupModel(constant=True), x, y, batch_size=4)
    for counts in ev.correct.values():
        assert counts.tolist() == [5, 0, 0, 0]
    expected = np.zeros((C, C), dtype=int)
    expected[1:, 0] = [3, 4, 2]
    np.testing.assert_array_equal(ev.pgd_targets, expected)
    m = ev.metrics()["clean"]
    assert m.mean == pytest.approx(0.25) and m.worst == 0.0 and m.worst_class == 1
    assert m.nsd == pytest.approx(np.std([1, 0, 0, 0], ddof=1) / 0.25)


def test_no_pgd_targets_without_pgd():
    x, y = _data([2, 2, 2, 2])
    ev = _evaluate(LookupModel(constant=True), x, y, attacks=("clean", "fgsm"))
    assert ev.pgd_targets is None and set(ev.correct) == {"clean", "fgsm"}


def test_unknown_attack_raises():
    x, y = _data([1, 1, 1, 1])
    with pytest.raises(ValueError, match="clean, fgsm, pgd20, cw, aa"):
        _evaluate(LookupModel(constant=True), x, y, attacks=("clean", "pgd7"))


def test_stratified_subset_takes_first_of_each_class():
    y = np.array([2, 0, 0, 1, 2, 0, 1, 2, 3])
    assert stratified_subset(y, 8, 4).tolist() == [0, 1, 2, 3, 4, 6, 8]  # 2 a class, class 3 has only one
    assert stratified_subset(y, 2, 4).tolist() == [0, 1, 3, 8]  # at least one a class


@pytest.mark.slow
def test_autoattack_on_stratified_subset():
    x, y = _data([3, 3, 3, 3])
    ev = _evaluate(LookupModel(constant=False), x, y, attacks=("clean", "aa"), aa_subset=4)
    assert ev.subset_totals["aa"].tolist() == [1, 1, 1, 1]
    assert ev.correct["aa"].tolist() == [1, 1, 1, 1]
    metrics = ev.metrics()
    assert metrics["aa"].totals.tolist() == [1, 1, 1, 1] and metrics["aa"].mean == 1.0
    assert metrics["clean"].totals.tolist() == [3, 3, 3, 3]
    assert ev.aa_pgd20 is None  # no PGD-20 in this evaluation


def test_pgd20_on_autoattack_images_is_the_pgd20_result_restricted_to_the_subset(monkeypatch):
    # AutoAttack stubbed by the identity (it is what it is compared with, not what is tested here).
    from ferd import attacks

    monkeypatch.setitem(attacks.ATTACKS, "aa", attacks.AttackSpec("aa", "AA", lambda m, x, y, **_: x.clone()))
    x, y = _data([3, 3, 3, 3])
    model = LookupModel(constant=True)  # always class 0: PGD-20 keeps exactly the class-0 samples
    ev = _evaluate(model, x, y, attacks=("pgd20", "aa"), aa_subset=8)
    assert ev.subset_totals["aa"].tolist() == [2, 2, 2, 2]
    assert ev.correct["pgd20"].tolist() == [3, 0, 0, 0]
    assert ev.aa_pgd20.tolist() == [2, 0, 0, 0]
    summary = eval_summary(ev.correct, ev.totals, ev.subset_totals, ev.aa_pgd20)
    assert summary["aa"]["pgd20_same_images"] == pytest.approx(0.25)
    assert summary["aa"]["pgd20_same_images_metrics"]["totals"] == [2, 2, 2, 2]
    assert [name for name, _m in eval_rows(summary)] == ["pgd20", "aa", AA_PGD20]


@pytest.mark.slow
def test_autoattack_is_at_most_pgd20_on_the_same_images_for_a_trained_model():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        for b in range(0, 1400, 200):
            loss = nn.functional.cross_entropy(model(x[b:b + 200]), y[b:b + 200])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    ev = evaluate(model, x[1400:1600], y[1400:1600], num_classes=10, attacks=("clean", "pgd20", "aa"), eps=0.05,
                  step_size=0.0125, steps=20, aa_subset=100, device="cpu")
    m = eval_summary(ev.correct, ev.totals, ev.subset_totals, ev.aa_pgd20)
    assert m["clean"]["mean"] > 0.8 and m["aa"]["pgd20_same_images"] > 0.05  # a trained model, not broken by PGD
    assert m["aa"]["mean"] <= m["aa"]["pgd20_same_images"]


def _mlp_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, C))
    x = torch.rand(64, 1, 4, 4)
    with torch.no_grad():
        model.eval()
        y = model(x).argmax(1)  # all clean-correct, so the attacks decide the counts
    return model, x, y


def test_global_rng_untouched():
    model, x, y = _mlp_problem()
    torch.manual_seed(1)
    expected = torch.rand(5)
    torch.manual_seed(1)
    _evaluate(model, x, y, eps=0.2)
    assert torch.equal(torch.rand(5), expected)


def test_deterministic_for_fixed_seed_whatever_the_global_state():
    model, x, y = _mlp_problem()
    torch.manual_seed(5)
    a = _evaluate(model, x, y, eps=0.2, steps=1, seed=3)
    torch.manual_seed(6)
    b = _evaluate(model, x, y, eps=0.2, steps=1, seed=3)
    for name in FAST:
        np.testing.assert_array_equal(a.correct[name], b.correct[name])
    np.testing.assert_array_equal(a.pgd_targets, b.pgd_targets)
    assert a.correct["pgd20"].sum() < a.correct["clean"].sum()


def test_restores_model_mode_and_grad_flags():
    model, x, y = _mlp_problem()
    model.train()
    running_mean = model[2].running_mean.clone()
    flags = [True, False, True, False, True, True]
    for p, f in zip(model.parameters(), flags, strict=True):
        p.requires_grad_(f)
    _evaluate(model, x, y)
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model[2].running_mean, running_mean)


def test_batch_size_does_not_change_deterministic_attacks():
    model, x, y = _mlp_problem()
    a = _evaluate(model, x, y, attacks=("clean", "fgsm"), eps=0.2, batch_size=7)
    b = _evaluate(model, x, y, attacks=("clean", "fgsm"), eps=0.2, batch_size=64)
    for name in ("clean", "fgsm"):
        np.testing.assert_array_equal(a.correct[name], b.correct[name])
    assert a.correct["fgsm"].sum() < a.correct["clean"].sum()


class StopAfter:
    """should_stop callback that turns true on its n-th call; counts the calls."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


@pytest.mark.parametrize("attacks", [FAST, ("aa",)])
def test_should_stop_interrupts_at_the_next_forward_and_leaves_no_trace(attacks):
    model, x, y = _mlp_problem()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    torch.manual_seed(1)
    expected = torch.rand(5)
    torch.manual_seed(1)
    stop = StopAfter(5)
    with pytest.raises(Interrupted):
        _evaluate(model, x, y, attacks=attacks, eps=0.2, should_stop=stop)
    assert stop.calls == 5  # nothing ran past the first forward that saw the request
    assert torch.equal(torch.rand(5), expected)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert not model._forward_pre_hooks  # the model is usable again, unhooked
    model(x)


def test_should_stop_never_true_changes_nothing():
    model, x, y = _mlp_problem()
    a = _evaluate(model, x, y, eps=0.2, seed=3)
    b = _evaluate(model, x, y, eps=0.2, seed=3, should_stop=lambda: False)
    for name in FAST:
        np.testing.assert_array_equal(a.correct[name], b.correct[name])


def test_progress_names_each_attack_per_batch_and_ends_complete():
    x, y = _data([5, 3, 4, 2])
    calls = []
    _evaluate(LookupModel(constant=False), x, y, attacks=("clean", "fgsm", "pgd20"), batch_size=8,
              progress=lambda label, done, total: calls.append((label, done, total)))
    assert calls == [("FGSM", 0, 4), ("PGD-20", 1, 4), ("FGSM", 2, 4), ("PGD-20", 3, 4), ("done", 4, 4)]


def test_progress_reports_autoattack_sub_attacks_in_order():
    model, x, y = _mlp_problem()
    calls = []
    _evaluate(model, x, y, attacks=("clean", "aa"), eps=0.2, aa_subset=8,
              progress=lambda label, done, total: calls.append((label, done, total)))
    labels = [c[0] for c in calls]
    assert labels[0] == "AutoAttack: APGD-CE" and labels[-1] == "done"
    assert [c[1] for c in calls] == sorted(c[1] for c in calls) and all(c[2] == 4 for c in calls)
    assert labels[1:-1] == [f"AutoAttack: {s}" for s in ("APGD-T", "FAB-T", "Square")][:len(labels) - 2]
