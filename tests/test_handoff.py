"""The compute thread a run runs in (ferd.handoff): lockstep hand-over, live stage progress, halting, errors."""

from __future__ import annotations

import threading

import pytest

from ferd import stages
from ferd.handoff import computed, direct_emitter


def test_events_come_in_lockstep_from_one_other_thread():
    caller = threading.get_ident()
    log: list[str] = []

    def events(halt):
        for i in range(3):
            log.append(f"made {i}")
            yield (i, threading.get_ident())

    it = computed(events, threading.Event())
    first = next(it)
    log.append("took 0")
    rest = list(it)
    assert [e[0] for e in [first, *rest]] == [0, 1, 2]
    assert {e[1] for e in [first, *rest]} != {caller} and len({e[1] for e in [first, *rest]}) == 1
    # The producer made event 1 only after the caller asked for it, as a plain generator would.
    assert log[:3] == ["made 0", "took 0", "made 1"]


def test_a_stage_reports_while_it_runs_and_in_order():
    """`pumped` in the compute thread hands each emitted event over at once: the stage below waits for the caller
    to have seen its first event (with the events buffered until the stage returned, it would never finish)."""
    seen = threading.Event()

    def work(emit):
        emit("stage 1")
        assert seen.wait(5), "the caller never saw the stage's first event while the stage ran"
        emit("stage 2")
        return "result"

    def events(halt):
        yield "before"
        value = yield from stages.pumped(work)
        yield value

    out = []
    for ev in computed(events, threading.Event()):
        out.append(ev)
        if ev == "stage 1":
            seen.set()
    assert out == ["before", "stage 1", "stage 2", "result"]


def test_outside_a_compute_thread_a_stage_runs_inline_and_its_events_follow():
    assert direct_emitter() is None

    def work(emit):
        emit("a")
        emit("b")
        return 7

    gen = stages.pumped(work)
    assert list(gen) == ["a", "b"]


def test_closing_early_halts_the_producer_and_joins_its_thread():
    halted = threading.Event()
    threads: list[threading.Thread] = []

    def events(halt):
        threads.append(threading.current_thread())
        i = 0
        while not halt.is_set():
            yield i
            i += 1
        halted.set()

    it = computed(events, threading.Event())
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert halted.is_set() and not threads[0].is_alive()


def test_the_stop_flag_reaches_the_producer_before_it_makes_more():
    stop = threading.Event()

    def events(halt):
        i = 0
        while not halt.is_set():
            yield i
            i += 1
        yield "stopped"

    out = []
    for ev in computed(events, stop):
        out.append(ev)
        if ev == 2:
            stop.set()
    assert out == [0, 1, 2, "stopped"]


def test_an_error_in_the_producer_is_raised_in_the_caller():
    def events(halt):
        yield 1
        raise ValueError("boom")

    it = computed(events, threading.Event())
    assert next(it) == 1
    with pytest.raises(ValueError, match="boom"):
        next(it)


def test_a_run_trains_and_evaluates_in_one_thread_that_is_not_the_callers(tiny_cfg, monkeypatch):
    """Training steps and evaluations (whose progress streams while they run) share the run's compute thread, so
    only one thread opens torch's OpenMP regions (README "Benchmark": a second one ran them about 2x slower)."""
    import torch

    from ferd import engine
    from ferd.events import RunFinished, StageProgress

    idents: dict[str, set[int]] = {"train": set(), "eval": set()}
    real_loss, real_eval = engine.student_loss, stages.evaluate

    def loss(*args, **kw):
        idents["train"].add(threading.get_ident())
        return real_loss(*args, **kw)

    def evaluate(*args, **kw):
        idents["eval"].add(threading.get_ident())
        return real_eval(*args, **kw)

    monkeypatch.setattr(engine, "student_loss", loss)
    monkeypatch.setattr(stages, "evaluate", evaluate)
    torch.set_num_threads(2)
    events = list(engine.run(tiny_cfg.replace(epochs=2, warmup_epochs=1)))
    assert isinstance(events[-1], RunFinished)
    assert any(isinstance(e, StageProgress) and e.stage == "evaluation" for e in events)
    assert len(idents["train"]) == 1 and idents["train"] == idents["eval"]
    assert threading.get_ident() not in idents["train"]
    assert torch.get_num_threads() == 1  # the caller only hands events on
