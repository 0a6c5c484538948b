"""Checks a config must pass before a run row exists: what `ferd.config.validate` cannot see without torch.

`check_runnable(cfg)` raises ConfigError naming the field: the device must be available here, the dataset
and both architectures must be known, and a teacher checkpoint must load into the teacher architecture
(weights only; nothing is unpickled). The CLI and the dashboard call it (through the runner and the job
registry) so a config that cannot run never leaves a failed run behind.
"""

from __future__ import annotations

import torch

from ferd.config import Config, ConfigError
from ferd.data import DATASETS
from ferd.device import fixed_threads, resolve_device
from ferd.models import MODELS
from ferd.teachers import TeacherError, load_checkpoint


def check_runnable(cfg: Config) -> None:
    """Raise ConfigError (naming the field) if `cfg` cannot run on this machine."""
    try:
        resolve_device(cfg.device)
    except ValueError as e:
        raise ConfigError(f"device: {e}") from e
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"dataset: unknown {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    for name in ("teacher_arch", "student_arch"):
        arch = getattr(cfg, name)
        if arch not in MODELS:
            raise ConfigError(f"{name}: unknown architecture {arch!r}; choose one of {', '.join(MODELS)}")
    if cfg.teacher_checkpoint:
        info = DATASETS[cfg.dataset]
        try:
            with fixed_threads(1):  # this thread only checks; a run computes in a thread of its own (ferd.handoff)
                load_checkpoint(cfg.teacher_checkpoint, cfg.teacher_arch, num_classes=info.num_classes,
                                in_channels=info.image_shape[0], image_size=info.image_shape[1],
                                device=torch.device("cpu"))
        except TeacherError as e:
            raise ConfigError(f"teacher_checkpoint: {e}") from e
    elif cfg.dataset != "digits":
        raise ConfigError(f"teacher_checkpoint: dataset {cfg.dataset!r} needs a teacher checkpoint; only the "
                          f"embedded 'digits' teacher is trained automatically")
