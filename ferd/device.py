"""Where computation runs: the device is resolved once from the config, and CPU threads are set once.

Everything below the entry points takes its device from its inputs (tensors and models are moved with `.to(device)`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if available else cpu; `cpu`; `cuda` or `cuda:N`.

    Raises ValueError for other names, and for `cuda[:N]` when CUDA is absent or N is out of range.
    """
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here; use 'cpu' or 'auto'")
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise ValueError(f"invalid CUDA device {name!r}; use 'cuda' or 'cuda:N'") from e
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: only {count} CUDA device(s) visible (indices 0..{count - 1})")
        return device
    raise ValueError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")


_auto_threads: int | None = None


def set_auto_threads(n: int | None) -> None:
    """What `num_threads = 0` means in this process from now on: `n` threads (an executor sets the share of
    the cores it gives each run), or None for the default, all cores but one (at least one)."""
    global _auto_threads
    if n is not None and n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    _auto_threads = n


def set_threads(n: int) -> int:
    """Set torch's intra-op CPU threads; n = 0 means the automatic count (see set_auto_threads). Returns the
    count set."""
    if n < 0:
        raise ValueError(f"thread count must be >= 0, got {n}")
    threads = n if n > 0 else _auto_threads or max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(threads)
    return threads


@contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Run a block with exactly `n` torch intra-op threads, then restore the caller's count. CPU results depend on
    the thread count (reduction order), so work whose result is cached and shared uses a fixed count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_evaluation_cores: Callable[[], int] | None = None


def set_evaluation_threads(source: Callable[[], int] | None) -> None:
    """Where this process's evaluations may take more torch threads from: `source()` is the count the cores idle
    now allow (a local executor's worker, `ferd.executor`); None: evaluations keep the run's own count."""
    global _evaluation_cores
    _evaluation_cores = source


def evaluation_threads(own: int) -> int:
    """Torch threads for the next unit of an evaluation whose run computes with `own` threads: more where the
    executor says cores are idle. Safe for results: an evaluation computes forward passes and input gradients
    only, and on this project's CPU every attack's adversarial examples were bit-identical at 1 and 2 threads
    (tests/test_device.py checks it); training is not (weight gradients sum in a thread-dependent order), so its
    count never changes."""
    return max(own, _evaluation_cores()) if _evaluation_cores is not None else own
