"""A fake engine for dashboard tests: a plausible, deterministic event stream in milliseconds.

`fake_run` has the signature of `ferd.engine.run` (10 classes, 16x16x1 images) so it can be injected
as `run_fn` wherever the real engine would run. `populate_store` fills a run store with finished fake runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ferd import events as ev
from ferd.config import Config, to_dict

NUM_CLASSES = 10
IMAGE_SHAPE = (16, 16, 1)
FEATURE_DIM = 128
THUMBNAILS = 20
GENERATOR_REPORTS = 3
STUDENT_REPORTS = 2


def _per_class_correct(rng: np.random.Generator, totals: np.ndarray, level: float, spread: float) -> np.ndarray:
    acc = np.clip(level + spread * rng.standard_normal(totals.shape), 0.0, 1.0)
    return np.round(acc * totals).astype(np.int64)


def _evaluated(rng: np.random.Generator, epoch: int, total_epochs: int, attacks: Sequence[str], *,
               final: bool, wall_s: float) -> ev.Evaluated:
    totals = np.full(NUM_CLASSES, 50, dtype=np.int64)
    progress = epoch / max(total_epochs, 1)
    level = {"clean": 0.6 + 0.3 * progress, "fgsm": 0.3 + 0.25 * progress, "pgd20": 0.2 + 0.25 * progress,
             "cw": 0.2 + 0.22 * progress, "aa": 0.15 + 0.22 * progress}
    correct = {a: _per_class_correct(rng, totals, level[a], 0.1) for a in attacks}
    return ev.Evaluated(epoch=epoch, correct=correct, totals=totals, final=final, wall_s=wall_s)


def _targets(rng: np.random.Generator, source: str, epoch: int) -> ev.AttackTargets:
    counts = rng.integers(0, 12, size=(NUM_CLASSES, NUM_CLASSES)).astype(np.int64)
    np.fill_diagonal(counts, 0)
    return ev.AttackTargets(epoch=epoch, counts=counts, source=source)


def fake_run(cfg: Config, stop: threading.Event | None = None, *, run_dir: Path | None = None,
             resume: bool = False, delay_s: float = 0.0) -> Iterator[ev.Event]:
    """Yield an engine-like event stream for `cfg.epochs` epochs, deterministic from `cfg.seed`.

    `delay_s` sleeps before each event (to watch a job run); `stop` ends the stream with RunStopped
    between events. `run_dir` and `resume` are accepted for signature compatibility with the engine.
    """
    rng = np.random.default_rng(cfg.seed)
    start = time.perf_counter()

    def stream() -> Iterator[ev.Event]:
        teacher_clean = np.clip(0.9 + 0.05 * rng.standard_normal(NUM_CLASSES), 0, 1)
        teacher_pgd = np.clip(0.5 + 0.15 * rng.standard_normal(NUM_CLASSES), 0, 1)
        yield ev.RunStarted(
            epoch=0, config=to_dict(cfg),
            teacher={"name": "fake-teacher", "arch": cfg.teacher_arch, "path": "",
                     "clean": float(teacher_clean.mean()), "pgd": float(teacher_pgd.mean()),
                     "clean_per_class": teacher_clean.tolist(), "pgd_per_class": teacher_pgd.tolist()},
            device="cpu", num_classes=NUM_CLASSES, class_names=tuple(str(c) for c in range(NUM_CLASSES)),
            image_shape=(IMAGE_SHAPE[2], IMAGE_SHAPE[0], IMAGE_SHAPE[1]))
        weights = np.full(NUM_CLASSES, 1.0 / NUM_CLASSES)
        memory = np.zeros(NUM_CLASSES, dtype=np.int64)
        for epoch in range(1, cfg.epochs + 1):
            yield ev.EpochStarted(epoch=epoch, total_epochs=cfg.epochs)
            for k in range(1, GENERATOR_REPORTS + 1):
                step = k * max(cfg.generator_steps // GENERATOR_REPORTS, 1)
                losses = {name: float(abs(rng.normal(1.0 / epoch, 0.1))) for name in ("bn", "oh", "adv", "uni")}
                losses["total"] = float(sum(losses.values()))
                yield ev.GeneratorProgress(epoch=epoch, step=step, total_steps=cfg.generator_steps, losses=losses,
                                           robust_fraction=float(rng.uniform(0.2, 0.6)))
            labels = rng.integers(0, NUM_CLASSES, size=THUMBNAILS)
            class_acc = np.clip(0.96 + 0.03 * rng.standard_normal(NUM_CLASSES), 0, 1)
            memory = memory + np.bincount(labels, minlength=NUM_CLASSES)
            yield ev.SamplesSynthesised(
                epoch=epoch, images=rng.integers(0, 256, size=(THUMBNAILS, *IMAGE_SHAPE), dtype=np.uint8),
                labels=labels, features=rng.standard_normal((THUMBNAILS, FEATURE_DIM)).astype(np.float32),
                teacher_pred=labels.copy(), teacher_acc=float(class_acc.mean()),
                teacher_conf=float(np.clip(class_acc.mean() - 0.1, 0, 1)), class_acc=class_acc,
                class_conf=np.clip(class_acc - 0.1, 0, 1), robust_fraction=float(rng.uniform(0.2, 0.6)),
                memory_counts=memory.copy())
            scores = rng.normal(0.0, 1.0, NUM_CLASSES)
            weights = np.clip(weights + 0.02 * scores, cfg.c_min, cfg.c_max)
            weights = weights / weights.sum()
            yield ev.ClassWeightsUpdated(epoch=epoch, weights=weights.copy(), scores=scores)
            yield _targets(rng, "train", epoch)
            yield ev.TrainingAttackStrength(epoch=epoch, samples=64, success_rate=float(rng.uniform(0.1, 0.5)),
                                            target_entropy=float(rng.uniform(0.3, 0.9)),
                                            reference_success_rate=0.45 if epoch % 2 == 0 else float("nan"))
            for k in range(1, STUDENT_REPORTS + 1):
                step = k * max(cfg.student_steps // STUDENT_REPORTS, 1)
                nat, rob = float(abs(rng.normal(1.0 / epoch, 0.05))), float(abs(rng.normal(2.0 / epoch, 0.05)))
                yield ev.StudentProgress(epoch=epoch, step=step, total_steps=cfg.student_steps,
                                         losses={"total": nat + rob, "nat": nat, "rob": rob}, lr=cfg.lr_student)
            final = epoch == cfg.epochs
            if final or epoch % cfg.eval_every == 0:
                attacks = cfg.final_attacks if final else cfg.eval_attacks
                yield _evaluated(rng, epoch, cfg.epochs, attacks, final=final, wall_s=time.perf_counter() - start)
                yield _targets(rng, "eval", epoch)
            yield ev.EpochFinished(epoch=epoch, wall_s=time.perf_counter() - start,
                                   phase_s={"synthesis": 0.01, "reweighting": 0.01, "distillation": 0.01,
                                            "evaluation": 0.01})
        yield ev.RunFinished(epoch=cfg.epochs, wall_s=time.perf_counter() - start, student_path="")

    last_epoch = 0
    for event in stream():
        if delay_s:
            time.sleep(delay_s)
        if stop is not None and stop.is_set():
            yield ev.RunStopped(epoch=last_epoch, reason="stopped by user")
            return
        last_epoch = event.epoch
        yield event


def slow_fake_run(delay_s: float) -> Any:
    """`fake_run` with a sleep before every event, with the engine's signature (for queueing tests)."""

    def run(cfg: Config, stop: threading.Event | None = None, *, run_dir: Path | None = None,
            resume: bool = False) -> Iterator[ev.Event]:
        return fake_run(cfg, stop, run_dir=run_dir, resume=resume, delay_s=delay_s)

    return run


def populate_store(store: Any, *, methods: Sequence[str] = ("ferd", "dfrd"), seeds: Sequence[int] = (0,),
                   epochs: int = 3) -> list[str]:
    """Store one finished fake run per (method, seed); returns the run ids (in creation order)."""
    try:
        from ferd.runner import execute
    except ImportError:
        execute = None
    run_ids = []
    for method in methods:
        for seed in seeds:
            cfg = Config(epochs=epochs, eval_every=1, warmup_epochs=0, seed=seed).for_method(method)
            if execute is not None:
                run_ids.append(execute(cfg, store, run_fn=fake_run))
                continue
            run_id = store.create_run(cfg, status="running")
            last = None
            for event in fake_run(cfg):
                store.append(run_id, event)
                last = event
            store.set_status(run_id, "finished" if isinstance(last, ev.RunFinished) else "failed")
            run_ids.append(run_id)
    return run_ids
