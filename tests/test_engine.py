"""The training loop end to end on tiny configs: event stream, determinism, stop, failure, resume."""

import threading

import numpy as np
import pytest
import torch

from ferd import engine, experiments, stages
from ferd.diagnostics import synthesis_problems
from ferd.events import (
    AttackTargets,
    ClassWeightsUpdated,
    Evaluated,
    GeneratorProgress,
    RunFailed,
    RunFinished,
    RunResumed,
    RunStarted,
    RunStopped,
    RunWarning,
    SamplesSynthesised,
    StageProgress,
    StudentProgress,
)
from ferd.runner import execute
from ferd.store import RunStore


def kinds(events):
    return [e.kind for e in events]


def final_eval(events):
    return [e for e in events if isinstance(e, Evaluated)][-1]


def test_event_stream_of_a_tiny_ferd_run(tiny_cfg, tmp_path):
    # (Without the teacher's stage events, there when this test trains the session's teacher.)
    events = [e for e in engine.run(tiny_cfg, run_dir=tmp_path)
              if not (isinstance(e, StageProgress) and e.stage == "teacher")]
    k = kinds(events)
    assert isinstance(events[0], RunStarted) and isinstance(events[-1], RunFinished), k
    # Every evaluation reports its attacks as a stage: steps count up to the total, then Evaluated follows.
    for e in (e for e in events if isinstance(e, Evaluated)):
        stages = [s for s in events if isinstance(s, StageProgress) and s.epoch == e.epoch]
        assert [s.step for s in stages] == list(range(stages[0].total_steps + 1))
        assert events.index(stages[-1]) < events.index(e)
        attacks = tiny_cfg.final_attacks if e.final else tiny_cfg.eval_attacks
        labels = {"fgsm": "FGSM", "pgd20": "PGD-20", "cw": "CW-inf"}
        assert [s.label for s in stages[:-1]] == [labels[a] for a in attacks if a in labels] * (
            stages[0].total_steps // sum(a in labels for a in attacks))
    assert k.count("epoch_started") == tiny_cfg.epochs
    first = k.index("epoch_started")
    assert k[first + 1] == "generator_progress"
    # Per epoch: synthesis, then reweighting, then (after warm-up) distillation, evaluation, checkpoint.
    epoch2 = [e.kind for e in events if e.epoch == 2]
    order = [epoch2.index(x) for x in ("samples_synthesised", "class_weights", "student_progress", "evaluated",
                                       "checkpoint_saved", "epoch_finished")]
    assert order == sorted(order)
    assert not any(isinstance(e, StudentProgress) and e.epoch <= tiny_cfg.warmup_epochs for e in events)
    gen = [e for e in events if isinstance(e, GeneratorProgress) and e.epoch == 1]
    assert [g.step for g in gen] == list(range(1, tiny_cfg.generator_steps + 1))
    assert all(0.0 <= g.robust_fraction <= 1.0 for g in gen)
    # Class weights: a distribution whose max/min ratio respects c_max / c_min.
    for w in (e.weights for e in events if isinstance(e, ClassWeightsUpdated)):
        assert w.sum() == pytest.approx(1.0)
        assert w.max() / w.min() <= tiny_cfg.c_max / tiny_cfg.c_min + 1e-6
    # Synthesis diagnostics on every epoch.
    syn = [e for e in events if isinstance(e, SamplesSynthesised)]
    assert len(syn) == tiny_cfg.epochs
    s = syn[-1]
    assert s.images.dtype == np.uint8 and s.images.shape[1:] == (16, 16, 1)
    assert s.features.shape[0] == len(s.labels) == len(s.teacher_pred)
    assert 0.0 <= s.teacher_acc <= 1.0 and 0.0 <= s.teacher_conf <= 1.0
    assert s.memory_counts.sum() == tiny_cfg.batch_size * tiny_cfg.epochs
    # A RunWarning the first time each synthesis problem appears, never again for the same problem.
    warned = [e for e in events if isinstance(e, RunWarning)]
    expected = {}
    for e in syn:
        for key in synthesis_problems(e.teacher_acc, e.robust_fraction, w_uni=tiny_cfg.w_uni,
                                      mask_rule=tiny_cfg.mask_rule):
            expected.setdefault(key, e.epoch)
    assert {w.key: w.epoch for w in warned} == expected and len(warned) == len(expected)
    # Attack targets never count a correct prediction (the diagonal is empty).
    for t in (e for e in events if isinstance(e, AttackTargets)):
        assert t.counts.shape == (10, 10) and np.trace(t.counts) == 0
    last = final_eval(events)
    assert last.final and set(last.correct) == set(tiny_cfg.final_attacks)
    assert last.totals.sum() == 540
    for attack, correct in last.correct.items():
        assert (correct <= last.totals).all(), attack
    assert (last.correct["pgd20"] <= last.correct["clean"] + 5).all()
    student = engine.load_student(events[-1].student_path)
    assert not student.training
    assert student(torch.rand(2, 1, 16, 16)).shape == (2, 10)


def test_fixed_seed_is_deterministic_on_cpu(tiny_cfg):
    a = list(engine.run(tiny_cfg))
    b = list(engine.run(tiny_cfg))
    ea, eb = final_eval(a), final_eval(b)
    for attack in ea.correct:
        np.testing.assert_array_equal(ea.correct[attack], eb.correct[attack])
    wa = [e.weights for e in a if isinstance(e, ClassWeightsUpdated)]
    wb = [e.weights for e in b if isinstance(e, ClassWeightsUpdated)]
    np.testing.assert_array_equal(np.stack(wa), np.stack(wb))


def test_stop_is_honoured_within_one_step(tiny_cfg):
    stop = threading.Event()
    seen = []
    for ev in engine.run(tiny_cfg, stop):
        seen.append(ev)
        if isinstance(ev, GeneratorProgress) and ev.step == 2:
            stop.set()
    assert isinstance(seen[-1], RunStopped)
    after = seen[[i for i, e in enumerate(seen) if isinstance(e, GeneratorProgress) and e.step == 2][0] + 1:]
    assert kinds(after) == ["run_stopped"]


def test_non_finite_loss_fails_the_run_with_a_reason(tiny_cfg, monkeypatch):
    real = engine.student_loss

    def poisoned(cfg, t, s_clean, s_adv):
        out = real(cfg, t, s_clean, s_adv)
        return type(out)(total=out.total * float("nan"), nat=out.nat, rob=out.rob)

    monkeypatch.setattr(engine, "student_loss", poisoned)
    events = list(engine.run(tiny_cfg))
    assert isinstance(events[-1], RunFailed)
    assert "student loss is nan" in events[-1].reason


def test_a_bad_checkpoint_path_fails_cleanly(tiny_cfg):
    events = list(engine.run(tiny_cfg.replace(teacher_checkpoint="/nonexistent/teacher.pt")))
    assert kinds(events) == ["run_failed"]
    assert "teacher.pt" in events[0].reason


def test_teacher_stays_frozen_through_a_run(tiny_cfg, monkeypatch):
    captured = {}
    real = stages.load_teacher

    def spy(cfg, device, progress=None):
        model, info = real(cfg, device)
        captured["model"] = model
        captured["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        return model, info

    monkeypatch.setattr(stages, "load_teacher", spy)
    events = list(engine.run(tiny_cfg))
    assert isinstance(events[-1], RunFinished)
    model = captured["model"]
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, captured["state"][k]), k


def test_real_data_method_trains_on_the_real_split(tiny_cfg):
    events = list(engine.run(tiny_cfg.for_method("real-data")))
    k = kinds(events)
    assert k[-1] == "run_finished"
    assert "samples_synthesised" not in k and "generator_progress" not in k
    # No generator to warm up: the student trains from the first epoch.
    assert any(isinstance(e, StudentProgress) and e.epoch == 1 for e in events)
    assert final_eval(events).correct["clean"].sum() > 0


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(epochs=4)
    store = RunStore(tmp_path / "store")
    whole = execute(cfg, store)
    stop = threading.Event()

    def stop_after_epoch_2(ev):
        if ev.kind == "epoch_finished" and ev.epoch == 2:
            stop.set()

    part = execute(cfg, store, stop=stop, on_event=stop_after_epoch_2)
    assert store.get_run(part).status == "stopped"
    execute(cfg, store, run_id=part, resume=True)
    assert store.get_run(part).status == "finished"
    a = [e for _s, e in store.events(whole)]
    b = [e for _s, e in store.events(part)]
    # One RunStarted; the resume is marked by RunResumed at the checkpoint's epoch, in order.
    assert [e.resumed_from for e in b if isinstance(e, RunStarted)] == [0]
    resumed = [i for i, e in enumerate(b) if isinstance(e, RunResumed)]
    assert [b[i].epoch for i in resumed] == [2] and b[resumed[0] - 1].kind == "epoch_finished"
    assert experiments.run_record(b, run_id=part)["final"]
    ea, eb = final_eval(a), final_eval(b)
    for attack in ea.correct:
        np.testing.assert_array_equal(ea.correct[attack], eb.correct[attack])
    wa = np.stack([e.weights for e in a if isinstance(e, ClassWeightsUpdated)])
    wb = np.stack([e.weights for e in b if isinstance(e, ClassWeightsUpdated)])
    np.testing.assert_array_equal(wa, wb)
    # The resumed log holds each epoch once.
    assert [e.epoch for e in b if e.kind == "epoch_finished"] == [1, 2, 3, 4]


def test_stop_during_teacher_training_ends_the_run_without_caching_a_teacher(tiny_cfg):
    from ferd.teachers import cache_dir, embedded_key

    cfg = tiny_cfg.replace(teacher_epochs=3)  # a teacher no other test trains
    stop = threading.Event()
    stop.set()
    events = list(engine.run(cfg, stop))
    assert kinds(events)[-1] == "run_stopped"
    assert all(isinstance(e, StageProgress) and e.stage == "teacher" for e in events[:-1])
    assert not (cache_dir() / "teachers" / f"{embedded_key(cfg.teacher_arch, 3)}.pt").exists()


def test_first_use_teacher_training_is_a_stage_before_run_started(tiny_cfg, tmp_path, monkeypatch):
    """Training the embedded teacher reports progress at once and after each of its epochs, before RunStarted;
    the store, the frames and run_record read such a log as before."""
    from app import frames
    from ferd.experiments import run_record
    from ferd.store import RunStore

    real = stages.load_teacher

    def training(cfg, device, progress=None):
        for epoch in range(1, cfg.teacher_epochs + 1):  # what train_embedded reports on first use
            progress(epoch, cfg.teacher_epochs)
        return real(cfg, device)

    monkeypatch.setattr(stages, "will_train", lambda cfg: True)
    monkeypatch.setattr(stages, "load_teacher", training)
    cfg = tiny_cfg.replace(epochs=2, warmup_epochs=1)
    with RunStore(tmp_path / "store") as store:
        run_id = execute(cfg, store)
        events = [e for _, e in store.events(run_id)]
        assert store.get_run(run_id).status == "finished"
    start = kinds(events).index("run_started")
    teacher = events[:start]
    assert all(isinstance(e, StageProgress) and e.stage == "teacher" and e.epoch == 0 for e in teacher)
    assert [e.step for e in teacher] == list(range(cfg.teacher_epochs + 1))
    assert frames.current_stage(teacher[:1]) == teacher[0]
    assert frames.current_stage(events[:start + 1]) is None
    assert frames.progress(events)[:2] == (2, 2)
    assert run_record(events, run_id=run_id)["eval"]["pgd20"]["mean"] >= 0


def test_stop_during_the_final_evaluation_ends_the_run_as_stopped(tiny_cfg, monkeypatch):
    """The last epoch's evaluation (AutoAttack on the digits preset) takes the stop request too."""
    real = stages.evaluate
    stop = threading.Event()

    def stopped_midway(*args, **kw):
        stop.set()  # as if the user pressed Stop while the attacks run
        return real(*args, **kw)

    cfg = tiny_cfg.replace(epochs=1, warmup_epochs=0)
    monkeypatch.setattr(stages, "evaluate", stopped_midway)
    events = list(engine.run(cfg, stop))
    assert isinstance(events[-1], RunStopped)
    assert "evaluated" not in kinds(events)
