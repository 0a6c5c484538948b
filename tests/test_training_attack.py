"""The training attacks as the student sees them: predictions in eval mode, success rate, target spread."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ferd import engine
from ferd.config import ConfigError
from ferd.diagnostics import attack_problems
from ferd.distillation import AttackTally, adversarial_predictions, training_attack, wrong_class_marginal_loss
from ferd.events import AttackTargets, Evaluated, RunWarning, TrainingAttackStrength
from ferd.experiments import ablation_configs, run_record
from ferd.feature_split import uniformity_loss
from ferd.metrics import target_entropy


def _bn_model_whose_modes_disagree() -> tuple[nn.Module, torch.Tensor]:
    """A BN model and a batch where batch statistics (train mode) and running statistics (eval mode) give
    different predictions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    x = torch.tensor([[5.0, 0.0], [6.0, 0.0], [7.0, 0.0]])  # eval: class 0 (running mean 0); train: centred
    model.train()
    return model, x


def test_adversarial_predictions_use_eval_mode_and_restore_train_mode():
    model, x = _bn_model_whose_modes_disagree()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        train_pred = model(x).argmax(1)
    model.load_state_dict(state)  # undo the running-statistics update of that train-mode forward
    pred = adversarial_predictions(model, x)
    assert pred.tolist() == [0, 0, 0]
    assert train_pred.tolist() != pred.tolist()  # the case really separates the two modes
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # no running-statistics update


def test_target_entropy_hand_computed():
    counts = np.array([[0, 2, 2], [0, 0, 0], [3, 0, 0]])  # row 0 spread evenly over 2 classes, row 2 on one
    assert target_entropy(counts) == pytest.approx(0.5)  # the empty row 1 does not count
    assert math.isnan(target_entropy(np.zeros((3, 3))))


def test_attack_tally_counts_against_the_attacked_label():
    tally = AttackTally(3)
    y = torch.tensor([0, 0, 1, 2])
    tally.add(y, torch.tensor([1, 2, 1, 0]), reference_pred=torch.tensor([1, 1, 1, 0]))
    tally.add(torch.tensor([2]), torch.tensor([2]))  # a batch without the reference
    ev = tally.event(4)
    assert (ev.epoch, ev.samples) == (4, 5)
    assert ev.success_rate == pytest.approx(3 / 5)
    assert ev.target_entropy == pytest.approx((1.0 + 0.0) / 2)  # row 0: {1, 2}; row 2: {0}
    assert ev.reference_success_rate == pytest.approx(3 / 4)
    assert ev.reference_target_entropy == pytest.approx(0.0)
    assert math.isnan(AttackTally(3).event(1).reference_success_rate)


def test_attack_problems_below_half_of_the_reference():
    assert set(attack_problems(0.1, 0.4)) == {"attack_strength"}
    assert attack_problems(0.25, 0.4) == {}
    assert attack_problems(0.1, float("nan")) == {}


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_bad_utae_weight_names_the_field(tiny_cfg, value):
    with pytest.raises(ConfigError, match="utae_weight"):
        tiny_cfg.replace(utae_weight=value)


def test_ablate_utae_weight_grid(tiny_cfg):
    configs = ablation_configs(tiny_cfg, "utae_weight", [0.1, 10], [0, 1])
    assert [(c.utae_weight, c.seed) for c in configs] == [(0.1, 0), (0.1, 1), (10.0, 0), (10.0, 1)]
    with pytest.raises(ConfigError, match="utae_weight"):
        ablation_configs(tiny_cfg, "utae_weight", [-1], [0])


def _strengths(events):
    return [e for e in events if isinstance(e, TrainingAttackStrength)]


def test_every_distillation_epoch_reports_the_attack_strength_and_the_reference_never_changes_training(tiny_cfg):
    cfg = tiny_cfg.replace(attack_reference_every=2)  # smoke: epochs 3, warm-up 1 -> student epochs 2 and 3
    events = list(engine.run(cfg))
    strengths = _strengths(events)
    assert [e.epoch for e in strengths] == [2, 3]
    assert all(e.samples == cfg.student_steps * cfg.batch_size for e in strengths)
    assert all(not math.isnan(e.reference_success_rate) for e in strengths)  # epoch 2 (every 2) and the last
    train_targets = {e.epoch: e.counts for e in events if isinstance(e, AttackTargets) and e.source == "train"}
    for e in strengths:
        assert e.success_rate == pytest.approx(train_targets[e.epoch].sum() / e.samples)
    record = run_record(events)["training_attack"]
    assert record["per_epoch"]["epoch"] == [2, 3] and record["reference_epochs"] == [2, 3]
    assert record["success_rate"] == pytest.approx(np.mean([e.success_rate for e in strengths]))
    json.dumps(record)

    without = list(engine.run(cfg.replace(attack_reference_every=0)))
    assert all(math.isnan(e.reference_success_rate) for e in _strengths(without))
    assert [e.success_rate for e in _strengths(without)] == [e.success_rate for e in strengths]
    final = [e for e in events if isinstance(e, Evaluated)][-1]
    final_without = [e for e in without if isinstance(e, Evaluated)][-1]
    for attack, correct in final.correct.items():
        np.testing.assert_array_equal(correct, final_without.correct[attack])


def test_a_disarmed_training_attack_warns_once(tiny_cfg, monkeypatch):
    monkeypatch.setattr(engine, "attack_problems", lambda s, r: {"attack_strength": f"weak {s:.2f}"})
    warnings = [e for e in engine.run(tiny_cfg) if isinstance(e, RunWarning) and e.key == "attack_strength"]
    assert len(warnings) == 1 and warnings[0].epoch == 2


def _strength_events():
    nan = float("nan")
    return [TrainingAttackStrength(epoch=2, samples=10, success_rate=0.1, target_entropy=0.2),
            TrainingAttackStrength(epoch=3, samples=10, success_rate=0.2, target_entropy=0.4,
                                   reference_success_rate=0.5, reference_target_entropy=0.6),
            TrainingAttackStrength(epoch=4, samples=10, success_rate=0.1, target_entropy=nan)]


def test_strength_frame_chart_and_story():
    from app.charts import attack_strength_chart
    from app.frames import attack_strength_frame, attack_strength_text
    from ferd.experiments import training_attack_summary

    frame = attack_strength_frame(_strength_events())
    assert frame["epoch"].tolist() == [2, 3, 4] and frame["success_rate"].tolist() == [0.1, 0.2, 0.1]
    fig = attack_strength_chart(frame)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["success rate, untargeted reference"].x) == [3]  # markers only where the reference ran
    assert list(by_name["success rate"].y) == pytest.approx([10, 20, 10])
    summary = training_attack_summary(_strength_events())
    assert summary["success_rate"] == pytest.approx(0.4 / 3)
    assert summary["target_entropy"] == pytest.approx(0.3)  # the NaN epoch (nothing flipped) is left out
    assert summary["reference_epochs"] == [3] and summary["strength_ratio"] == pytest.approx(0.4)
    text = attack_strength_text("ferd", summary)
    assert "13%" in text and "50%" in text and "40%" in text and "switched the attack off" in text
    assert attack_strength_text("dfrd", {}) == ""
    nothing_flipped = TrainingAttackStrength(epoch=1, samples=4, success_rate=0.0, target_entropy=float("nan"),
                                             reference_success_rate=0.5)
    no_flips = training_attack_summary([nothing_flipped])
    assert "target entropy –" in attack_strength_text("ferd", no_flips)


def test_compare_attack_strength_table():
    from app.analysis import attack_strength_table
    from ferd.experiments import training_attack_summary

    record = {"run_id": "r1", "method": "ferd", "seed": 0, "config": {"utae_mode": "uniform-kl", "utae_weight": 10.0},
              "training_attack": training_attack_summary(_strength_events())}
    table = attack_strength_table([record, {**record, "run_id": "r2", "training_attack": {}}])
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["attack success"], row["untargeted reference"], row["ratio"]) == ("13%", "50%", "40%")


def test_utae_weight_slider_and_marginal_weight_reach_the_run(tmp_path, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from ferd.store import RunStore

    monkeypatch.setenv("FERD_HOME", str(tmp_path))
    monkeypatch.setenv("FERD_FAKE_ENGINE", "1")
    st.cache_resource.clear()
    form = "live-(current settings)-ferd"
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "pages" / "1_Live.py"), default_timeout=30)
    at.run()
    slider = at.select_slider(key=f"{form}-utae_weight")
    assert 0.1 in slider.options or "0.1" in slider.options
    slider.set_value(0.3)
    at.number_input(key=f"{form}-utae_marginal_weight").set_value(0.2)
    at.number_input(key=f"{form}-epochs").set_value(3)
    at.button(key="live-start").click().run()
    assert not at.exception, at.exception
    store = RunStore(tmp_path)
    deadline = time.monotonic() + 15
    while not store.list_runs() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        config = store.list_runs()[0].config
        assert config["utae_weight"] == 0.3 and config["utae_marginal_weight"] == 0.2
    finally:
        store.close()
        st.cache_resource.clear()


def _one_hot_logits(classes: list[int], c: int = 3, scale: float = 30.0) -> torch.Tensor:
    return scale * F.one_hot(torch.tensor(classes), c).float()


def test_marginal_loss_asks_the_batch_not_each_prediction_to_spread():
    y = torch.tensor([0, 0])
    spread = _one_hot_logits([1, 2])  # each prediction one-hot, the class-0 batch split over classes 1 and 2
    collapsed = _one_hot_logits([1, 1])
    assert wrong_class_marginal_loss(spread, y).item() == pytest.approx(0.0, abs=1e-6)
    assert wrong_class_marginal_loss(collapsed, y).item() > 5.0
    assert uniformity_loss(spread).item() > 5.0  # uniform-kl penalises the spread batch as much as any other


def test_marginal_loss_hand_computed():
    # one class-0 sample whose wrong-class mass is 3:1 on classes 1 and 2 (class 0's own mass is dropped)
    logits = torch.log(torch.tensor([[0.5, 0.375, 0.125]]))
    want = -0.5 * (math.log(0.75) + math.log(0.25)) - math.log(2)
    assert wrong_class_marginal_loss(logits, torch.tensor([0])).item() == pytest.approx(want, rel=1e-5)


def test_marginal_kl_attack_stays_in_bounds_and_restores_the_student(tiny_cfg):
    cfg = tiny_cfg.replace(utae_mode="marginal-kl", utae_marginal_weight=0.1)
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 16 * 16, 10)).train()
    x, y = torch.rand(16, 1, 16, 16), torch.randint(0, 10, (16,))
    with torch.no_grad():
        t_logits = torch.randn(16, 10)
    x_adv = training_attack(cfg, student, x, y, t_logits, 10)
    assert (x_adv - x).abs().max().item() <= cfg.eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert not torch.equal(x_adv, x) and student.training


def test_marginal_weight_is_validated(tiny_cfg):
    with pytest.raises(ConfigError, match="utae_marginal_weight"):
        tiny_cfg.replace(utae_marginal_weight=-0.1)
    with pytest.raises(ConfigError, match="utae_mode"):
        tiny_cfg.replace(utae_mode="marginal")


def test_ablation_table_reports_the_training_attack_per_value():
    """`ablate`'s table carries the training attack's success rate and target entropy (mean ± std over seeds) beside
    the accuracies; a record without them (an older run) reads as missing, not as 0."""
    from ferd.experiments import ablation_table, markdown_ablation_table

    def record(value, seed, success, entropy):
        ev = {"clean": {"mean": 0.9}, "pgd20": {"mean": 0.5, "worst": 0.0, "nsd": 0.6}}
        attack = None if success is None else {"success_rate": success, "target_entropy": entropy}
        return {"config": {"utae_weight": value}, "seed": seed, "eval": ev, "training_attack": attack}

    table = ablation_table([record(0.1, 0, 0.6, 0.8), record(0.1, 1, 0.4, 0.9), record(10, 0, None, None)],
                           "utae_weight")
    low, high = table.iloc[0], table.iloc[1]
    assert low["value"] == 0.1 and low["n"] == 2
    assert low["attack_success"] == pytest.approx(0.5) and low["attack_success_std"] == pytest.approx(0.1414, abs=1e-4)
    assert low["target_entropy"] == pytest.approx(0.85)
    assert np.isnan(high["attack_success"]) and np.isnan(high["target_entropy"])
    md = markdown_ablation_table(table, "utae_weight").splitlines()
    assert md[0].endswith("| training-attack success % | target entropy |")
    assert md[2].endswith("| 50.0 ± 14.1 | 0.850 ± 0.071 |") and md[3].endswith("| – | – |")
