"""Long stages of a run that report progress while they run: training the embedded teacher on first use
(before RunStarted) and an evaluation's attacks. Neither can yield itself, so each runs in a helper thread
(`pumped`) and its StageProgress events are passed on as they come."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator
from typing import TypeVar

import torch
import torch.nn as nn

from ferd.config import Config
from ferd.evaluation import Evaluation, evaluate
from ferd.events import Event, StageProgress
from ferd.teachers import TeacherInfo, load_teacher, will_train

TEACHER_STAGE = "training the embedded teacher (first use only)"

T = TypeVar("T")
E = TypeVar("E")
_DONE = object()


def pumped(work: Callable[[Callable[[E], None]], T]) -> Generator[E, None, T]:
    """Run `work(emit)` in a helper thread, yield the events it emits while it runs, and return its result (or
    raise its exception). Long calls that cannot yield themselves (training the teacher, an evaluation) report
    their progress this way while they run."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = work(events.put)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            outcome["error"] = e
        finally:
            events.put(_DONE)

    thread = threading.Thread(target=target, name="ferd-stage", daemon=True)
    thread.start()
    while (item := events.get()) is not _DONE:
        yield item
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def teacher_stage(cfg: Config, device: torch.device, *,
                  stop: Callable[[], None]) -> Generator[Event, None, tuple[nn.Module, TeacherInfo]]:
    """`load_teacher(cfg, device)`; when that trains the embedded teacher, a StageProgress at once and after each
    of its epochs. `stop()` is called before every training batch (it raises to end the training)."""
    training = will_train(cfg)
    if training:  # at once: the first epoch ends only after seconds of loading data
        yield StageProgress(epoch=0, stage="teacher", step=0, total_steps=cfg.teacher_epochs, label=TEACHER_STAGE)

    def work(emit: Callable[[Event], None]) -> tuple[nn.Module, TeacherInfo]:
        reported = [0 if training else -1]

        def progress(done: int, total: int) -> None:
            if done > reported[0]:
                reported[0] = done
                emit(StageProgress(epoch=0, stage="teacher", step=done, total_steps=total, label=TEACHER_STAGE))
            stop()

        return load_teacher(cfg, device, progress=progress)

    return (yield from pumped(work))


def evaluation_stage(cfg: Config, student: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, *,
                     num_classes: int, device: torch.device, stop: Callable[[], bool], epoch: int,
                     final: bool) -> Generator[Event, None, Evaluation]:
    """The evaluation of `epoch` (the final attacks when `final`) on the real test split, with a StageProgress
    per unit of work (`ferd.evaluation.Progress`). `stop()` true ends it with `Interrupted`."""

    def work(emit: Callable[[Event], None]) -> Evaluation:
        def progress(label: str, done: int, total: int) -> None:
            emit(StageProgress(epoch=epoch, stage="evaluation", step=done, total_steps=total, label=label))

        return evaluate(student, x_test, y_test, num_classes=num_classes,
                        attacks=cfg.final_attacks if final else cfg.eval_attacks, eps=cfg.eps,
                        step_size=cfg.step_size, steps=cfg.eval_steps, kappa=cfg.cw_kappa,
                        batch_size=cfg.eval_batch_size, aa_subset=cfg.aa_subset, device=device, seed=cfg.seed,
                        should_stop=stop, progress=progress)

    return (yield from pumped(work))
