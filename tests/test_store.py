"""Run store and atomic writes: round-trips, status transitions, concurrency, restart, export."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import threading
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ferd import atomic, events
from ferd.config import Config
from ferd.config import load as load_config
from ferd.config import to_dict as config_to_dict
from ferd.store import RUN_ID_RE, RunNotFound, RunStore, StoreError, default_root, validate_run_id

NAN = float("nan")


def sample_events() -> list[events.Event]:
    """One instance of every event type, with small arrays and NaNs where the engine can send them."""
    return [
        events.RunStarted(epoch=0, config={"seed": 3, "eps": 0.1, "eval_attacks": ["clean", "pgd20"]},
                          teacher={"name": "t", "clean_acc": 0.9, "pgd_acc": NAN, "per_class": [0.5, 1.0, 0.0]},
                          device="cpu", num_classes=3, class_names=("zero", "one", "two"), image_shape=(1, 8, 8),
                          resumed_from=0),
        events.EpochStarted(epoch=1, total_epochs=2),
        events.GeneratorProgress(epoch=1, step=1, total_steps=2, losses={"total": 1.5, "bn": 0.25, "uni": NAN},
                                 robust_fraction=NAN),
        events.SamplesSynthesised(
            epoch=1, images=np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1),
            labels=np.array([0, 2], dtype=np.int64), features=np.linspace(-1, 1, 10, dtype=np.float32).reshape(2, 5),
            teacher_pred=np.array([0, 1], dtype=np.int64), teacher_acc=0.5, teacher_conf=0.75,
            class_acc=np.array([1.0, NAN, 0.0]), class_conf=np.array([0.9, NAN, 0.6]), robust_fraction=0.3,
            memory_counts=np.array([1, 0, 1], dtype=np.int64)),
        events.ClassWeightsUpdated(epoch=1, weights=np.array([0.2, 0.3, 0.5]), scores=np.array([-1.0, 0.0, 2.5])),
        events.AttackTargets(epoch=1, counts=np.array([[0, 2, 1], [0, 0, 0], [3, 0, 0]], dtype=np.int64),
                             source="train"),
        events.StudentProgress(epoch=1, step=2, total_steps=2, losses={"total": 0.5, "nat": 0.1, "rob": 0.4},
                               lr=0.1),
        events.Evaluated(epoch=1, correct={"clean": np.array([3, 2, 0]), "aa": np.array([1, 1, 0])},
                         totals=np.array([4, 2, 0]), subset_totals={"aa": np.array([2, 1, 0])}, final=True,
                         wall_s=1.25, aa_pgd20=np.array([2, 1, 0])),
        events.EpochFinished(epoch=1, wall_s=2.5, phase_s={"synthesis": 1.0, "evaluation": 0.5}),
        events.CheckpointSaved(epoch=1, path="checkpoints/epoch-001.pt"),
        events.RunFinished(epoch=2, wall_s=3.0, student_path="student.pt"),
        events.RunStopped(epoch=1, reason="stopped by the user"),
        events.RunFailed(epoch=1, reason="loss is NaN", detail="Traceback ..."),
        events.RunWarning(epoch=1, message="teacher accuracy is low"),
        events.TrainingAttackStrength(epoch=1, samples=64, success_rate=0.25, target_entropy=0.5),
        events.StageProgress(epoch=0, stage="teacher", step=1, total_steps=2, label="training the teacher"),
        events.RunResumed(epoch=1, time=1.7e9, device="cpu"),
    ]


def assert_same(a, b) -> None:
    """Deep equality where NaN equals NaN and arrays must keep their dtype and shape."""
    if dataclasses.is_dataclass(a):
        assert type(a) is type(b)
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert type(a) is type(b) and a == b


@pytest.fixture
def store(tmp_path: Path):
    with RunStore(tmp_path / "runs") as s:
        yield s


CFG = Config(epochs=2, warmup_epochs=1, seed=3, method="dfrd")


# ---- runs ----
def test_create_get_list(store: RunStore) -> None:
    a = store.create_run(CFG, name="first")
    b = store.create_run(CFG.replace(seed=4), name="second", status="running", parent=a)
    assert RUN_ID_RE.fullmatch(a) and RUN_ID_RE.fullmatch(b) and a != b
    info = store.get_run(b)
    assert (info.name, info.status, info.method, info.dataset, info.seed, info.parent) == (
        "second", "running", "dfrd", "digits", 4, a)
    assert info.config == config_to_dict(CFG.replace(seed=4))
    assert info.summary is None and info.created <= info.updated
    assert info.run_dir == store.run_dir(b) == store.root / b
    assert load_config(info.run_dir / "config.toml") == CFG.replace(seed=4)
    assert [r.run_id for r in store.list_runs()] == [b, a]
    assert [r.run_id for r in store.list_runs(status="queued")] == [a]
    assert [r.run_id for r in store.list_runs(status=("queued", "running"))] == [b, a]
    assert store.list_runs(status="failed") == []
    with pytest.raises(StoreError):
        store.list_runs(status="done")
    with pytest.raises(RunNotFound):
        store.get_run("20000101-000000-abcdef")


def test_create_with_unknown_parent_leaves_nothing(store: RunStore) -> None:
    with pytest.raises(RunNotFound):
        store.create_run(CFG, parent="20000101-000000-abcdef")
    with pytest.raises(StoreError):
        store.create_run(CFG, status="done")
    assert store.list_runs() == []
    assert [p.name for p in store.root.iterdir() if p.is_dir()] == []


def test_default_root_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERD_HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home"
    with RunStore() as s:
        assert s.root == tmp_path / "home" and (s.root / "runs.db").is_file()
    monkeypatch.delenv("FERD_HOME")
    assert default_root().name == "runs" and default_root().parent.name == "ferd-studio"


def test_wal_mode(store: RunStore) -> None:
    import sqlite3

    con = sqlite3.connect(store.db_path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        con.close()


@pytest.mark.parametrize("bad", ["../x", "", "a/b", "..", "/etc/passwd", "20260101-000000-abcdeg",
                                 "20260101-000000-abcdef\n", "20260101-000000-abcdef/..", "20260101-000000-ABCDEF"])
def test_invalid_run_ids_raise(store: RunStore, bad: str) -> None:
    with pytest.raises(StoreError):
        validate_run_id(bad)
    calls = [store.run_dir, store.get_run, store.events, store.delete_run, store.metrics_csv,
             lambda r: store.append(r, events.EpochStarted(epoch=1, total_epochs=1)),
             lambda r: store.set_status(r, "finished"), lambda r: store.set_summary(r, {}),
             lambda r: store.truncate_events(r, 0), lambda r: store.export_run(r, store.root),
             lambda r: store.create_run(CFG, parent=r)]
    for call in calls:
        with pytest.raises(StoreError):
            call(bad)


def test_status_and_summary(store: RunStore) -> None:
    r = store.create_run(CFG)
    store.set_status(r, "stopped")
    assert store.get_run(r).status == "stopped"
    with pytest.raises(StoreError):
        store.set_status(r, "paused")
    store.set_summary(r, {"worst": np.float32(0.25), "per_class": np.array([0.5, 1.0]), "nsd": NAN, "n": np.int64(3)})
    s = store.get_run(r).summary
    assert s["worst"] == 0.25 and s["per_class"] == [0.5, 1.0] and math.isnan(s["nsd"]) and s["n"] == 3
    with pytest.raises(RunNotFound):
        store.set_status("20000101-000000-abcdef", "finished")


# ---- events ----
def test_every_event_type_round_trips(store: RunStore) -> None:
    sample = sample_events()
    assert {type(e) for e in sample} == set(events.EVENT_TYPES.values())
    r = store.create_run(CFG)
    seqs = [store.append(r, e) for e in sample]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    got = store.events(r)
    assert [s for s, _ in got] == seqs
    for want, (_, have) in zip(sample, got, strict=True):
        assert_same(want, have)


def test_events_since_and_kinds(store: RunStore) -> None:
    r, other = store.create_run(CFG), store.create_run(CFG)
    sample = sample_events()
    seqs = store.append_many(r, sample)
    store.append(other, events.RunWarning(epoch=0, message="elsewhere"))
    assert [s for s, _ in store.events(r, since=seqs[4])] == seqs[5:]
    assert store.events(r, since=seqs[-1]) == []
    picked = store.events(r, kinds=["evaluated", "warning"])
    assert [type(e) for _, e in picked] == [events.Evaluated, events.RunWarning]
    assert [e.message for _, e in store.events(other)] == ["elsewhere"]
    with pytest.raises(StoreError):
        store.events(r, kinds=["no_such_kind"])
    with pytest.raises(RunNotFound):
        store.events("20000101-000000-abcdef")
    with pytest.raises(RunNotFound):
        store.append("20000101-000000-abcdef", sample[0])


@pytest.mark.parametrize(("terminal", "status"), [
    (events.RunFinished(epoch=2, wall_s=1.0, student_path="student.pt"), "finished"),
    (events.RunStopped(epoch=1, reason="user"), "stopped"),
    (events.RunFailed(epoch=1, reason="boom"), "failed"),
])
def test_status_follows_events(store: RunStore, terminal: events.Event, status: str) -> None:
    r = store.create_run(CFG)
    assert store.get_run(r).status == "queued"
    store.append(r, sample_events()[0])
    assert store.get_run(r).status == "running"
    store.append(r, events.EpochStarted(epoch=1, total_epochs=2))
    assert store.get_run(r).status == "running"
    store.append(r, terminal)
    assert store.get_run(r).status == status


def test_concurrent_appends_lose_nothing(store: RunStore) -> None:
    runs = [store.create_run(CFG), store.create_run(CFG)]
    n_threads, n_events = 4, 50
    barrier = threading.Barrier(n_threads + 1)
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(t: int) -> None:
        try:
            barrier.wait()
            for i in range(n_events):
                store.append(runs[t % 2], events.EpochStarted(epoch=i, total_epochs=t))
        except BaseException as e:
            errors.append(e)

    def reader() -> None:
        try:
            barrier.wait()
            seen = 0
            while not done.is_set():
                for seq, _ in store.events(runs[0], since=seen):
                    assert seq > seen
                    seen = seq
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
    poller = threading.Thread(target=reader)
    for th in [*threads, poller]:
        th.start()
    for th in threads:
        th.join()
    done.set()
    poller.join()
    assert errors == []
    for k, r in enumerate(runs):
        log = store.events(r)
        assert len(log) == n_events * n_threads // 2
        assert [s for s, _ in log] == sorted(s for s, _ in log)
        for t in range(k, n_threads, 2):
            assert [e.epoch for _, e in log if e.total_epochs == t] == list(range(n_events))


def test_restart_sees_runs_and_marks_interrupted(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    with RunStore(root) as first:
        running = first.create_run(CFG)
        first.append(running, sample_events()[0])
        queued = first.create_run(CFG)
        alive = first.create_run(CFG, status="running")
        done = first.create_run(CFG)
        first.append(done, events.RunFinished(epoch=2, wall_s=1.0, student_path=""))
    with RunStore(root) as second:
        assert {r.run_id for r in second.list_runs()} == {running, queued, alive, done}
        assert len(second.events(running)) == 1
        # Closing `first` gave up its leases: its queued and running runs already read as interrupted.
        assert second.get_run(running).status == second.get_run(queued).status == "interrupted"
        second.acquire(alive)  # a live job of the new process owns this one
        assert second.mark_interrupted(alive=[alive]) == sorted([running, queued])
        status = {r.run_id: r.status for r in second.list_runs()}
        assert status == {running: "interrupted", queued: "interrupted", alive: "running", done: "finished"}
        assert second.mark_interrupted(alive=[alive]) == []


def test_truncate_events_for_resume(store: RunStore) -> None:
    r = store.create_run(CFG)
    log: list[events.Event] = [sample_events()[0]]
    for epoch in (1, 2, 3):
        log += [events.EpochStarted(epoch=epoch, total_epochs=3), events.CheckpointSaved(epoch=epoch, path=f"{epoch}")]
    store.append_many(r, [*log, events.RunStopped(epoch=2, reason="user")])
    last_seq = store.events(r)[-1][0]
    assert store.get_run(r).status == "stopped"
    assert store.truncate_events(r, after_epoch=2) == 3
    kept = [e for _, e in store.events(r)]
    expected = [e for e in log if e.epoch <= 2]
    assert len(kept) == len(expected)
    for want, have in zip(expected, kept, strict=True):
        assert_same(want, have)
    seq = store.append(r, events.RunStarted(**{**dataclasses.asdict(sample_events()[0]), "resumed_from": 2}))
    assert seq > last_seq and store.get_run(r).status == "running"


def test_delete_run(store: RunStore) -> None:
    keep, gone = store.create_run(CFG), store.create_run(CFG)
    for r in (keep, gone):
        store.append(r, sample_events()[0])
    (store.run_dir(gone) / "student.pt").write_bytes(b"weights")
    with pytest.raises(StoreError):
        store.delete_run(gone)
    assert store.run_dir(gone).is_dir()
    store.set_status(gone, "stopped")
    store.delete_run(gone)
    assert not store.run_dir(gone).exists()
    with pytest.raises(RunNotFound):
        store.get_run(gone)
    with pytest.raises(RunNotFound):
        store.events(gone)
    with pytest.raises(RunNotFound):
        store.delete_run(gone)
    assert [r.run_id for r in store.list_runs()] == [keep] and len(store.events(keep)) == 1


# ---- export ----
def test_metrics_csv(store: RunStore) -> None:
    r = store.create_run(CFG)
    sample = sample_events()
    store.append_many(r, [sample[0], sample[7]])
    rows = list(csv.DictReader(io.StringIO(store.metrics_csv(r))))
    assert len(rows) == 2 * 3
    assert list(rows[0]) == ["epoch", "attack", "class", "correct", "total", "accuracy", "class_name", "final"]
    by = {(row["attack"], int(row["class"])): row for row in rows}
    assert float(by["clean", 0]["accuracy"]) == 0.75 and by["clean", 0]["class_name"] == "zero"
    assert by["clean", 2]["total"] == "0" and by["clean", 2]["accuracy"] == ""
    assert (by["aa", 0]["total"], float(by["aa", 0]["accuracy"])) == ("2", 0.5)  # subset totals for AutoAttack
    assert {row["epoch"] for row in rows} == {"1"} and {row["final"] for row in rows} == {"1"}


def test_export_run(store: RunStore, tmp_path: Path) -> None:
    r = store.create_run(CFG)
    sample = sample_events()
    store.append_many(r, sample[:10])
    (store.run_dir(r) / "student.pt").write_bytes(b"weights")
    out = store.export_run(r, tmp_path / "exports")
    assert out == tmp_path / "exports" / f"{r}.zip"
    with zipfile.ZipFile(out) as z:
        assert sorted(z.namelist()) == ["config.toml", "events.jsonl", "metrics.csv", "student.pt"]
        assert tomllib.loads(z.read("config.toml").decode()) == config_to_dict(CFG)
        lines = [json.loads(line) for line in z.read("events.jsonl").decode().splitlines()]
        assert [d["kind"] for d in lines] == [e.kind for e in sample[:10]]
        assert_same(events.from_dict({k: v for k, v in lines[3].items() if k != "seq"}), sample[3])
        assert z.read("metrics.csv").decode() == store.metrics_csv(r)
        assert z.read("student.pt") == b"weights"
    bare = store.create_run(CFG)
    out = store.export_run(bare, tmp_path / "bare.zip")
    with zipfile.ZipFile(out) as z:
        assert sorted(z.namelist()) == ["config.toml", "events.jsonl", "metrics.csv"]
        assert z.read("events.jsonl") == b""
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != "") == ["bare.zip"]


# ---- atomic writes ----
def test_atomic_writes_leave_no_temp_files(tmp_path: Path) -> None:
    atomic.write_text(tmp_path / "a.txt", "héllo")
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic.write_json(tmp_path / "c.json", {"x": [1, 2]})
    atomic.save_torch(tmp_path / "d.pt", {"w": torch.arange(3)})
    atomic.write_text(tmp_path / "a.txt", "again")
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin", "c.json", "d.pt"]
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "again"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    assert torch.equal(torch.load(tmp_path / "d.pt", weights_only=True)["w"], torch.arange(3))


def test_interrupted_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "config.toml"
    atomic.write_text(target, "old")

    def crash(src, dst):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(atomic.os, "replace", crash)
        with pytest.raises(OSError, match="disk full"):
            atomic.write_text(target, "new")
    with pytest.raises(Exception):  # noqa: B017 - a lambda cannot be pickled; the error type is torch's
        atomic.save_torch(target, {"f": lambda: 0})
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.toml"]


def test_a_stage_before_run_started_marks_the_run_running(store: RunStore) -> None:
    """Training the teacher on first use comes before RunStarted: the run is running from its first stage."""
    r = store.create_run(CFG)
    store.append(r, events.StageProgress(epoch=0, stage="teacher", step=0, total_steps=2, label="teacher"))
    assert store.get_run(r).status == "running"
