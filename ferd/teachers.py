"""Robust teachers: loaded from checkpoint files, or (digits) adversarially trained on first use and cached.

A teacher is a plain classifier from ferd.models, frozen once at load (eval mode, no parameter
gradients, `.train()` disabled) so that no attack or loss can drift its BN statistics (METHOD.md §8.4).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ferd.attacks import pgd
from ferd.config import Config
from ferd.data import cache_dir, dataset_info, test_split, train_split
from ferd.device import fixed_threads
from ferd.models import create_model
from ferd.weights import WeightsError, read_weights

# The embedded teacher's adversarial training (METHOD.md §10). Fixed, so that every run shares one teacher.
EMBEDDED_EPS = 0.1
EMBEDDED_STEPS = 10
EMBEDDED_SEED = 0
EMBEDDED_BATCH = 64
EMBEDDED_LR = 0.1
EMBEDDED_WEIGHT_DECAY = 5e-4
EVAL_STEPS = 20
CACHE_VERSION = "v2"
"""Bump when the training recipe or its numerics change, so stale cached teachers are not reused (v2: the
classifiers compute in channels_last, which rounds differently)."""

Progress = Callable[[int, int], None]
"""progress(epochs done, epochs in all): called before every training batch and after every epoch, so a caller
can also stop the training (by raising) within one batch."""


class TeacherError(ValueError):
    """A teacher cannot be loaded or built; the message names the problem."""


@dataclass(frozen=True)
class TeacherInfo:
    name: str
    arch: str
    path: str
    """Weights file the teacher was loaded from."""
    clean_acc: float | None
    """Accuracy on the real test split (None when not measured, e.g. a teacher loaded from a checkpoint)."""
    pgd_acc: float | None
    """PGD-20 accuracy on the real test split (None when not measured)."""
    clean_per_class: list[float]
    pgd_per_class: list[float]
    train_s: float
    """Seconds spent training (0 for a loaded checkpoint)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)




def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    return self


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients, and `.train()` made a no-op on the model and every submodule."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        m.train = types.MethodType(_frozen_train, m)
    return model


# ---- checkpoints ----
def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise TeacherError(f"{path}: not a state dict (expected a mapping of parameter names to tensors, "
                           f"optionally under 'state_dict' or 'model_state_dict')")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise TeacherError(f"{path}: not a state dict: entries {bad[:5]} are not name -> tensor")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(path: str | Path, arch: str, *, num_classes: int, in_channels: int, image_size: int,
                    device: torch.device) -> nn.Module:
    """Load weights into `arch` (plain state dict, 'module.' prefixes, or under 'state_dict' /
    'model_state_dict'), never unpickling code (weights_only=True). Returns the frozen model on `device`.

    A checkpoint without the model's normalisation buffers is taken to expect raw [0,1] pixels (the
    RobustBench convention), so the normalisation becomes the identity.
    """
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"teacher checkpoint not found: {path}")
    try:
        obj = read_weights(path)
    except WeightsError as e:
        raise TeacherError(str(e)) from e
    state = _extract_state_dict(obj, path)
    try:
        model = create_model(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    except ValueError as e:
        raise TeacherError(str(e)) from e
    ignored = getattr(model, "ignored_checkpoint_prefixes", ())
    state = {k: v for k, v in state.items() if not k.startswith(ignored)}
    expected = model.state_dict()
    if "normalize.mean" not in state and "normalize.std" not in state:
        state["normalize.mean"] = torch.zeros_like(expected["normalize.mean"])
        state["normalize.std"] = torch.ones_like(expected["normalize.std"])
    fc_key = next(k for k, v in model.named_parameters() if v is model.classifier.weight)
    if fc_key in state and state[fc_key].shape[0] != num_classes:
        raise TeacherError(f"{path}: the checkpoint's classifier has {state[fc_key].shape[0]} classes, the dataset "
                           f"has {num_classes}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise TeacherError(f"{path}: does not match architecture {arch!r}: {len(missing)} missing keys "
                           f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}")
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise TeacherError(f"{path}: shapes do not match architecture {arch!r}: {'; '.join(wrong[:5])}")
    model.load_state_dict(state)
    return freeze(model.to(device))


# ---- the embedded (digits) teacher ----
def embedded_key(arch: str, epochs: int) -> str:
    """Cache key: everything that determines the trained weights."""
    return f"digits-{arch}-e{epochs}-eps{EMBEDDED_EPS:g}-k{EMBEDDED_STEPS}-s{EMBEDDED_SEED}-{CACHE_VERSION}"


def _per_class(correct: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float]:
    hits = torch.bincount(y, weights=correct.float(), minlength=num_classes)
    totals = torch.bincount(y, minlength=num_classes).clamp(min=1)
    return (hits / totals).tolist()


def evaluate_teacher(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
                     batch_size: int = 256) -> tuple[list[bool], list[bool]]:
    """Per-sample correctness, clean and under PGD-`steps` (step eps/4, random start)."""
    clean, robust = [], []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        with torch.no_grad():
            clean.append(model(xb).argmax(1) == yb)
        x_adv = pgd(model, xb, yb, eps=eps, steps=steps, step_size=eps / 4)
        with torch.no_grad():
            robust.append(model(x_adv).argmax(1) == yb)
    return torch.cat(clean).tolist(), torch.cat(robust).tolist()


def train_embedded(arch: str, *, epochs: int, device: torch.device,
                   progress: Progress | None = None) -> tuple[nn.Module, TeacherInfo]:
    """PGD-AT (Madry et al. 2018) on the digits training split: eps 0.1, step eps/4, 10 steps, SGD momentum 0.9
    with a one-cycle schedule, batch 64, no flips; then clean and PGD-20 accuracy per class on the test split.
    Uses its own RNG stream (the caller's global RNG state is restored) and, on the CPU, one torch thread whatever the
    run's thread count: the cached teacher then does not depend on how many threads the first run happened to use."""
    info = dataset_info("digits")
    c, h, _ = info.image_shape
    x_train, y_train = (t.to(device) for t in train_split("digits"))
    x_test, y_test = (t.to(device) for t in test_split("digits"))
    devices = [device] if device.type == "cuda" else []
    threads = fixed_threads(1) if device.type == "cpu" else contextlib.nullcontext()
    with torch.random.fork_rng(devices=devices), threads:
        torch.manual_seed(EMBEDDED_SEED)
        model = create_model(arch, num_classes=info.num_classes, in_channels=c, image_size=h).to(device)
        steps_per_epoch = -(-len(x_train) // EMBEDDED_BATCH)
        opt = torch.optim.SGD(model.parameters(), lr=EMBEDDED_LR, momentum=0.9, weight_decay=EMBEDDED_WEIGHT_DECAY)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=EMBEDDED_LR, epochs=epochs,
                                                    steps_per_epoch=steps_per_epoch)
        start = time.perf_counter()
        model.train()
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(x_train), device=device)
            for i in range(0, len(order), EMBEDDED_BATCH):
                if progress is not None:
                    progress(epoch - 1, epochs)
                idx = order[i:i + EMBEDDED_BATCH]
                xb, yb = x_train[idx], y_train[idx]
                x_adv = pgd(model, xb, yb, eps=EMBEDDED_EPS, steps=EMBEDDED_STEPS, step_size=EMBEDDED_EPS / 4)
                loss = F.cross_entropy(model(x_adv), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if progress is not None:
                progress(epoch, epochs)
        train_s = time.perf_counter() - start
        freeze(model)
        clean, robust = evaluate_teacher(model, x_test, y_test, eps=EMBEDDED_EPS, steps=EVAL_STEPS)
    clean_t, robust_t = torch.tensor(clean), torch.tensor(robust)
    y_cpu = y_test.cpu()
    teacher_info = TeacherInfo(
        name=f"embedded digits teacher ({arch}, PGD-AT eps {EMBEDDED_EPS:g}, {epochs} epochs)", arch=arch, path="",
        clean_acc=float(clean_t.float().mean()), pgd_acc=float(robust_t.float().mean()),
        clean_per_class=_per_class(clean_t, y_cpu, info.num_classes),
        pgd_per_class=_per_class(robust_t, y_cpu, info.num_classes), train_s=train_s)
    return model, teacher_info


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(path: Path, sidecar: Path, arch: str, device: torch.device) -> tuple[nn.Module, TeacherInfo] | None:
    """The cached teacher, or None when absent or unreadable (it is then retrained and overwritten)."""
    if not (path.is_file() and sidecar.is_file()):
        return None
    info = dataset_info("digits")
    c, h, _ = info.image_shape
    try:
        meta = json.loads(sidecar.read_text())
        teacher_info = TeacherInfo(**{**meta, "path": str(path)})
        model = load_checkpoint(path, arch, num_classes=info.num_classes, in_channels=c, image_size=h, device=device)
    except (TeacherError, ValueError, TypeError):
        return None
    return model, teacher_info


def will_train(cfg: Config) -> bool:
    """True when `load_teacher(cfg)` will train the embedded teacher: digits, no checkpoint, nothing cached yet."""
    if cfg.teacher_checkpoint or cfg.dataset != "digits":
        return False
    path = cache_dir() / "teachers" / f"{embedded_key(cfg.teacher_arch, cfg.teacher_epochs)}.pt"
    return not (path.is_file() and path.with_suffix(".json").is_file())


def load_teacher(cfg: Config, device: torch.device,
                 progress: Progress | None = None) -> tuple[nn.Module, TeacherInfo]:
    """The run's frozen teacher: from cfg.teacher_checkpoint, else (digits only) the cached embedded teacher,
    trained and cached at cache_dir()/teachers/<key>.pt (+ .json with its TeacherInfo) on first use."""
    info = dataset_info(cfg.dataset)
    c, h, _ = info.image_shape
    if cfg.teacher_checkpoint:
        model = load_checkpoint(cfg.teacher_checkpoint, cfg.teacher_arch, num_classes=info.num_classes,
                                in_channels=c, image_size=h, device=device)
        return model, TeacherInfo(name=Path(cfg.teacher_checkpoint).name, arch=cfg.teacher_arch,
                                  path=str(cfg.teacher_checkpoint), clean_acc=None, pgd_acc=None,
                                  clean_per_class=[], pgd_per_class=[], train_s=0.0)
    if cfg.dataset != "digits":
        raise TeacherError(f"dataset {cfg.dataset!r} needs a teacher checkpoint (teacher_checkpoint); only the "
                           f"embedded 'digits' teacher is trained automatically")
    key = embedded_key(cfg.teacher_arch, cfg.teacher_epochs)
    path = cache_dir() / "teachers" / f"{key}.pt"
    sidecar = path.with_suffix(".json")
    cached = _load_cached(path, sidecar, cfg.teacher_arch, device)
    if cached is not None:
        return cached
    try:
        model, teacher_info = train_embedded(cfg.teacher_arch, epochs=cfg.teacher_epochs, device=device,
                                             progress=progress)
    except ValueError as e:  # unknown architecture
        raise TeacherError(str(e)) from e
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic_write(path, lambda p: torch.save(state, p))
    teacher_info = TeacherInfo(**{**teacher_info.to_dict(), "path": str(path)})
    _atomic_write(sidecar, lambda p: p.write_text(json.dumps(teacher_info.to_dict(), indent=2)))
    return model, teacher_info
