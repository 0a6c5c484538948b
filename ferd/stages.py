"""Long stages of a run that report progress while they run: training the embedded teacher on first use
(before RunStarted) and an evaluation's attacks. Neither can yield itself; `pumped` hands their StageProgress
events to the caller as they come (the run's compute thread, ferd.handoff)."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar

import torch
import torch.nn as nn

from ferd.config import Config
from ferd.device import evaluation_threads, fixed_threads
from ferd.evaluation import Evaluation, evaluate
from ferd.events import Event, StageProgress
from ferd.handoff import direct_emitter
from ferd.teachers import TeacherInfo, load_teacher, will_train

TEACHER_STAGE = "training the embedded teacher (first use only)"

T = TypeVar("T")
E = TypeVar("E")


def pumped(work: Callable[[Callable[[E], None]], T]) -> Generator[E, None, T]:
    """Run `work(emit)` in this thread and return its result. In a run's compute thread (ferd.handoff) each event
    `work` emits reaches the caller at once, while `work` runs; elsewhere they are yielded after it returns. No
    helper thread: a second thread opening OpenMP regions would slow torch down (see ferd.handoff)."""
    emit = direct_emitter()
    if emit is not None:
        return work(emit)
    events: list[E] = []
    value = work(events.append)
    yield from events
    return value


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
    per unit of work (`ferd.evaluation.Progress`). `stop()` true ends it with `Interrupted`. Each unit may use
    cores an executor reports idle (`ferd.device.evaluation_threads`); the run's own count is restored after."""

    own = torch.get_num_threads()

    def work(emit: Callable[[Event], None]) -> Evaluation:
        def progress(label: str, done: int, total: int) -> None:
            emit(StageProgress(epoch=epoch, stage="evaluation", step=done, total_steps=total, label=label))
            torch.set_num_threads(evaluation_threads(own))  # before each unit: idle cores may come and go

        with fixed_threads(evaluation_threads(own)):  # the run's own count restored afterwards
            return evaluate(student, x_test, y_test, num_classes=num_classes,
                            attacks=cfg.final_attacks if final else cfg.eval_attacks, eps=cfg.eps,
                            step_size=cfg.step_size, steps=cfg.eval_steps, kappa=cfg.cw_kappa,
                            batch_size=cfg.eval_batch_size, aa_subset=cfg.aa_subset, device=device,
                            seed=cfg.seed, should_stop=stop, progress=progress)

    return (yield from pumped(work))
