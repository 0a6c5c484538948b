"""The training loop: `run(config, stop)` yields typed events (DESIGN.md "The flow of data").

One epoch (METHOD.md §2):  A. synthesis -> B. reweighting -> C. distillation -> D. evaluation,
then a checkpoint. The `real-data` method skips A and B and distils on the real training split: it is
the ceiling the data-free methods chase. Observers (CLI, job registry, store) consume the events; the
engine knows nothing about them.
"""

from __future__ import annotations

import math
import random
import threading
import time
import traceback
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ferd import atomic
from ferd.augment import augment
from ferd.config import Config, ConfigError, from_dict, to_dict
from ferd.data import DataError, dataset_info, test_split, train_split
from ferd.device import resolve_device, set_threads
from ferd.diagnostics import attack_problems, synthesis_problems
from ferd.distillation import AttackTally, student_loss, training_attack
from ferd.evaluation import Interrupted
from ferd.events import (
    AttackTargets,
    CheckpointSaved,
    ClassWeightsUpdated,
    EpochFinished,
    EpochStarted,
    Evaluated,
    Event,
    GeneratorProgress,
    RunFailed,
    RunFinished,
    RunStarted,
    RunStopped,
    RunWarning,
    SamplesSynthesised,
    StudentProgress,
)
from ferd.feature_split import split_teacher_features
from ferd.handoff import StopFlag, computed
from ferd.models import Generator as ImageGenerator
from ferd.models import create_model, folded_batchnorm
from ferd.reweighting import class_scores, class_weights, teacher_margins
from ferd.stages import evaluation_stage, teacher_stage
from ferd.synthesis import NonFiniteLoss, Synthesizer
from ferd.teachers import TeacherError
from ferd.version import engine_version
from ferd.weights import WeightsError, read_weights
from ferd.weights import load_student as load_student  # re-exported: ferd.engine.load_student

CHECKPOINT = "checkpoint.pt"
STUDENT = "student.pt"
EXPECTED_ERRORS = (ConfigError, DataError, TeacherError, NonFiniteLoss, FileNotFoundError, atomic.DiskFull,
                   WeightsError)


class Stopped(Exception):
    """Internal: a stop request was seen."""


@dataclass
class _State:
    """Everything that changes from epoch to epoch (and is checkpointed)."""

    epoch: int
    weights: np.ndarray
    scores: np.ndarray
    memory_x: torch.Tensor
    memory_y: torch.Tensor
    wall_offset: float
    warned: set[str]


def _check_stop(stop: StopFlag) -> None:
    if stop.is_set():
        raise Stopped


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """All global RNG states as tensors and plain values, so the checkpoint loads with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                         has_gauss, cached],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def student_lr(cfg: Config, epoch: int) -> float:
    """Cosine schedule over the student's epochs (those after warm-up), evaluated at the start of `epoch`."""
    first = _first_student_epoch(cfg)
    span = cfg.epochs - first + 1
    return cfg.lr_student * 0.5 * (1.0 + math.cos(math.pi * (epoch - first) / span))


def _first_student_epoch(cfg: Config) -> int:
    return 1 if cfg.method == "real-data" else cfg.warmup_epochs + 1


def run(cfg: Config, stop: threading.Event | None = None, *, run_dir: str | Path | None = None,
        resume: bool = False, in_thread: bool = True) -> Iterator[Event]:
    """Run `cfg` to the end (or until `stop` is set), yielding events. Never raises for a failed run:
    the last event is RunFinished, RunStopped or RunFailed (with the reason).

    The run computes in a thread of its own and hands each event over when the caller asks for the next one
    (ferd.handoff: it keeps torch's OpenMP regions in one thread). `in_thread=False` computes in the caller's
    thread instead (for thread-local tools such as FlopCounterMode); stage progress then arrives after each stage.
    With a thread, the caller's own torch work is set to one thread: it only hands events on, and a second thread
    opening OpenMP regions would slow the run down (ferd.handoff)."""
    stop = stop or threading.Event()
    if in_thread:
        torch.set_num_threads(1)

    def events(halt: StopFlag) -> Iterator[Event]:
        return _guarded(cfg, halt, run_dir, resume)

    return computed(events, stop) if in_thread else events(stop)


def _guarded(cfg: Config, stop: StopFlag, run_dir: str | Path | None, resume: bool) -> Iterator[Event]:
    epoch = [0]
    try:
        yield from _run(cfg, stop, Path(run_dir) if run_dir else None, resume, epoch)
    except (Stopped, Interrupted):  # Interrupted: the stop request reached an evaluation
        yield RunStopped(epoch=epoch[0], reason="stop requested")
    except EXPECTED_ERRORS as e:
        yield RunFailed(epoch=epoch[0], reason=str(e))
    except Exception as e:  # an unexpected error still ends the run with a reason, not a dead thread
        yield RunFailed(epoch=epoch[0], reason=f"{type(e).__name__}: {e}", detail=traceback.format_exc())


def _run(cfg: Config, stop: StopFlag, run_dir: Path | None, resume: bool,
         epoch_box: list[int]) -> Iterator[Event]:
    t_start = time.perf_counter()
    set_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    info = dataset_info(cfg.dataset)
    c = info.num_classes
    teacher, tinfo = yield from teacher_stage(cfg, device, stop=lambda: _check_stop(stop))
    x_test, y_test = test_split(cfg.dataset, cfg.data_root)
    # Seeded after the teacher: training it on first use must not change what this run does.
    seed_everything(cfg.seed)
    channels, size = info.image_shape[0], info.image_shape[1]
    student = create_model(cfg.student_arch, num_classes=c, in_channels=channels, image_size=size).to(device)
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr_student, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    data_free = cfg.method != "real-data"
    synth = None
    if data_free:
        generator = ImageGenerator(cfg.latent_dim, channels, size, width=cfg.generator_width)
        synth = Synthesizer(cfg, teacher, generator, num_classes=c, flip=info.flip, device=device)
        mem_x = torch.empty(0, *info.image_shape, device=device)
        mem_y = torch.empty(0, dtype=torch.long, device=device)
    else:
        real_x, real_y = train_split(cfg.dataset, cfg.data_root)
        mem_x, mem_y = real_x.to(device), real_y.to(device)
    state = _State(epoch=0, weights=np.full(c, 1.0 / c), scores=np.zeros(c), memory_x=mem_x, memory_y=mem_y,
                   wall_offset=0.0, warned=set())
    ckpt_path = run_dir / CHECKPOINT if run_dir else None
    if resume:
        if ckpt_path is None or not ckpt_path.is_file():
            raise FileNotFoundError("nothing to resume: the run has no checkpoint yet")
        state = _load_checkpoint(ckpt_path, cfg, student, optimizer, synth, state, device)
    epoch_box[0] = state.epoch
    yield RunStarted(epoch=state.epoch, config=to_dict(cfg), teacher=tinfo.to_dict(), device=str(device),
                     num_classes=c, class_names=tuple(info.class_names), image_shape=tuple(info.image_shape),
                     resumed_from=state.epoch, engine_version=engine_version())
    x_test, y_test = x_test.to(device), y_test.to(device)
    try:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            epoch_box[0] = epoch
            yield EpochStarted(epoch=epoch, total_epochs=cfg.epochs)
            phase: dict[str, float] = {}
            if synth is not None:
                t = time.perf_counter()
                kept = yield from _synthesis(cfg, synth, student, state, teacher, stop, epoch, c)
                if kept is None:
                    raise Stopped
                phase["synthesis"] = time.perf_counter() - t
                t = time.perf_counter()
                yield _reweight(cfg, teacher, kept, state, epoch)
                phase["reweighting"] = time.perf_counter() - t
            if epoch >= _first_student_epoch(cfg):
                t = time.perf_counter()
                yield from _distil(cfg, student, optimizer, teacher, state, stop, epoch, c, info.flip)
                phase["distillation"] = time.perf_counter() - t
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                t = time.perf_counter()
                final = epoch == cfg.epochs
                result = yield from evaluation_stage(cfg, student, x_test, y_test, num_classes=c, device=device,
                                                     stop=stop.is_set, epoch=epoch, final=final)
                phase["evaluation"] = time.perf_counter() - t
                yield Evaluated(epoch=epoch, correct=result.correct, totals=result.totals,
                                subset_totals=result.subset_totals, final=final, wall_s=phase["evaluation"],
                                aa_pgd20=result.aa_pgd20)
                if result.pgd_targets is not None:
                    yield AttackTargets(epoch=epoch, counts=result.pgd_targets, source="eval")
            wall = state.wall_offset + time.perf_counter() - t_start
            if ckpt_path is not None:
                state.epoch = epoch
                _save_checkpoint(ckpt_path, cfg, student, optimizer, synth, state, wall)
                yield CheckpointSaved(epoch=epoch, path=str(ckpt_path))
            yield EpochFinished(epoch=epoch, wall_s=wall, phase_s=phase)
            _check_stop(stop)
        wall = state.wall_offset + time.perf_counter() - t_start
        student_path = ""
        if run_dir is not None:
            student_path = str(save_student(run_dir / STUDENT, student, cfg))
        yield RunFinished(epoch=cfg.epochs, wall_s=wall, student_path=student_path)
    finally:
        if synth is not None:
            synth.close()


def _synthesis(cfg: Config, synth: Synthesizer, student: nn.Module, state: _State, teacher: nn.Module,
               stop: StopFlag, epoch: int, c: int) -> Generator[Event, None, tuple | None]:
    """Phase A: run the generator, keep x*, add it to the memory, yield progress and diagnostics."""
    steps = synth.synthesise(torch.as_tensor(state.weights, dtype=torch.float32), student, stop.is_set)
    while True:
        try:
            s = next(steps)
        except StopIteration as done:
            kept = done.value
            break
        yield GeneratorProgress(epoch=epoch, step=s.step, total_steps=cfg.generator_steps, losses=s.losses,
                                robust_fraction=s.robust_fraction)
    if kept is None:
        return None
    x, y = kept.x, kept.y
    state.memory_x = torch.cat([state.memory_x, x])[-cfg.memory_size:]
    state.memory_y = torch.cat([state.memory_y, y])[-cfg.memory_size:]
    with torch.no_grad():
        h = teacher.features(x)
        logits = teacher.head(h)
    prob = F.softmax(logits, dim=1)
    pred = logits.argmax(1)
    hit = (pred == y).float()
    conf = prob.gather(1, y[:, None]).squeeze(1)
    class_acc = np.full(c, np.nan)
    class_conf = np.full(c, np.nan)
    for k in range(c):
        sel = y == k
        if sel.any():
            class_acc[k] = float(hit[sel].mean())
            class_conf[k] = float(conf[sel].mean())
    # The split's robust fraction on the kept batch, for every data-free method (DFRD too: it shows what
    # the FAE term would see).
    split = split_teacher_features(teacher, h, y, steps=cfg.split_steps, lr=cfg.split_lr, beta=cfg.split_beta,
                           rule=cfg.mask_rule)
    n = min(cfg.thumbnails, len(x))
    images = (x[:n].detach().cpu().permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    feats = h[:n].mean(dim=(2, 3)).cpu().numpy().astype(np.float32)
    ev = SamplesSynthesised(
        epoch=epoch, images=images, labels=y[:n].cpu().numpy(), features=feats,
        teacher_pred=pred[:n].cpu().numpy(), teacher_acc=float(hit.mean()), teacher_conf=float(conf.mean()),
        class_acc=class_acc, class_conf=class_conf, robust_fraction=split.robust_fraction,
        memory_counts=np.bincount(state.memory_y.cpu().numpy(), minlength=c))
    yield ev
    yield from _warn(state, epoch, synthesis_problems(ev.teacher_acc, ev.robust_fraction, w_uni=cfg.w_uni,
                                                      mask_rule=cfg.mask_rule))
    return x, y


def _warn(state: _State, epoch: int, problems: dict[str, str]) -> Iterator[RunWarning]:
    """A RunWarning for each problem key the run has not warned about yet."""
    for key, message in problems.items():
        if key not in state.warned:
            state.warned.add(key)
            yield RunWarning(epoch=epoch, message=message, key=key)


def _reweight(cfg: Config, teacher: nn.Module, kept: tuple, state: _State, epoch: int) -> ClassWeightsUpdated:
    """Phase B: robustness scores from teacher margins under PGD; new proportions when reweighting is on."""
    x, y = kept
    with folded_batchnorm(teacher):  # the frozen teacher (its BN folded in: ferd.models.folded_batchnorm)
        margins = teacher_margins(teacher, x, y, eps=cfg.eps, steps=cfg.reweight_steps, step_size=cfg.step_size)
    state.scores = class_scores(margins.cpu().numpy(), y.cpu().numpy(), state.scores)
    if cfg.reweight:
        state.weights = class_weights(state.scores, c_min=cfg.c_min, c_max=cfg.c_max)
    return ClassWeightsUpdated(epoch=epoch, weights=state.weights.copy(), scores=state.scores.copy())


def _distil(cfg: Config, student: nn.Module, optimizer: torch.optim.Optimizer, teacher: nn.Module,
            state: _State, stop: StopFlag, epoch: int, c: int, flip: bool) -> Iterator[Event]:
    """Phase C: N_S student steps on batches of the memory, clean + adversarial."""
    lr = student_lr(cfg, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    tally = AttackTally(c, cfg=cfg, epoch=epoch)
    n = len(state.memory_y)
    with folded_batchnorm(teacher):  # the frozen teacher, folded once for the phase (ferd.models.folded_batchnorm)
        for step in range(1, cfg.student_steps + 1):
            _check_stop(stop)
            idx = torch.randint(0, n, (min(cfg.batch_size, n),), device=state.memory_y.device)
            x, y = state.memory_x[idx], state.memory_y[idx]
            if cfg.augment:
                x = augment(x, flip=flip)
            with torch.no_grad():
                t_logits = teacher(x)
            x_adv = training_attack(cfg, student, x, y, t_logits, c)
            tally.observe(student, x, y, t_logits, x_adv, step)
            student.train()
            s_clean, s_adv = student(x), student(x_adv)
            loss = student_loss(cfg, t_logits, s_clean, s_adv)
            if not torch.isfinite(loss.total):
                raise NonFiniteLoss(f"student loss is {float(loss.total.detach())} at epoch {epoch}, step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            optimizer.step()
            yield StudentProgress(epoch=epoch, step=step, total_steps=cfg.student_steps, lr=lr,
                                  losses={k: float(getattr(loss, k).detach()) for k in ("total", "nat", "rob")})
    yield AttackTargets(epoch=epoch, counts=tally.counts, source="train")
    strength = tally.event(epoch)
    yield strength
    yield from _warn(state, epoch, attack_problems(strength.success_rate, strength.reference_success_rate))


def _save_checkpoint(path: Path, cfg: Config, student: nn.Module, optimizer: torch.optim.Optimizer,
                     synth: Synthesizer | None, state: _State, wall: float) -> None:
    data = {
        "epoch": state.epoch, "config": to_dict(cfg), "student": student.state_dict(),
        "optimizer": optimizer.state_dict(), "weights": torch.as_tensor(state.weights),
        "scores": torch.as_tensor(state.scores), "wall_s": wall, "warned": sorted(state.warned),
        "rng": _rng_state(),
    }
    if synth is not None:
        data.update(generator=synth.generator.state_dict(), generator_optimizer=synth.optimizer.state_dict(),
                    memory_x=state.memory_x.cpu(), memory_y=state.memory_y.cpu())
    atomic.save_torch(path, data)


def _load_checkpoint(path: Path, cfg: Config, student: nn.Module, optimizer: torch.optim.Optimizer,
                     synth: Synthesizer | None, state: _State, device: torch.device) -> _State:
    data = read_weights(path)
    if to_dict(from_dict(data["config"])) != to_dict(cfg):  # fields added since then take their defaults
        raise ConfigError("resume: the checkpoint was written with a different config")
    student.load_state_dict(data["student"])
    optimizer.load_state_dict(data["optimizer"])
    if synth is not None:
        synth.generator.load_state_dict(data["generator"])
        synth.optimizer.load_state_dict(data["generator_optimizer"])
        state.memory_x = data["memory_x"].to(device)
        state.memory_y = data["memory_y"].to(device)
    state.epoch = int(data["epoch"])
    state.weights = data["weights"].numpy()
    state.scores = data["scores"].numpy()
    state.wall_offset = float(data["wall_s"])
    state.warned = set(data["warned"])
    _set_rng_state(data["rng"])
    return state


def save_student(path: Path, student: nn.Module, cfg: Config) -> Path:
    """The distilled student with what `load_student` needs to rebuild it (a weights-only file)."""
    info = dataset_info(cfg.dataset)
    atomic.save_torch(path, {
        "arch": cfg.student_arch, "num_classes": info.num_classes, "in_channels": info.image_shape[0],
        "image_size": info.image_shape[1], "dataset": cfg.dataset, "method": cfg.method,
        "state_dict": {k: v.detach().cpu() for k, v in student.state_dict().items()},
    })
    return path
