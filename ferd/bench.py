"""`python -m ferd bench`: where an epoch's time goes, on whatever device is present.

Runs `cfg` twice in this process. The first run pays what a process pays once (importing torch._dynamo when the
first optimiser is built, loading the compiled feature split, oneDNN creating its kernels for each shape): it
gives the teacher load time, the latency to the first event and the cold whole-run time. The second, warm run is
what each epoch of a long run costs: the seconds per epoch and the mean seconds per epoch of each phase
(synthesis incl. the feature split, reweighting, distillation, evaluation). Then the feature split alone (one call
at the synthesis batch size, as run inside every generator step), and peak memory.

It also sets the run against this machine's limit: the FLOPs of the same run counted by
torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions, forward and backward: the ops that
carry the arithmetic; elementwise ops, pooling and batch norm are not counted), the GFLOP/s achieved, and
the GFLOP/s of a large fp32 matmul timed in the same process with the same thread count (the best of three
timings). A profiled pass of the same run (torch.profiler) splits the time: how long the counted ops themselves
take (their own kernel time), so the GFLOP/s of the convolutions and matmuls alone, and the share of the run they
fill; the rest of the time goes to work the count leaves out (element-wise, pooling, normalisation, Python).
"""

from __future__ import annotations

import json
import re
import resource
import sys
import threading
import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from ferd.config import Config
from ferd.data import dataset_info
from ferd.device import fixed_threads, resolve_device, set_threads
from ferd.engine import run
from ferd.events import EpochFinished, Event, RunFailed
from ferd.feature_split import split_features, split_teacher_features
from ferd.handoff import StopFlag, computed
from ferd.teachers import load_teacher


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_split(cfg: Config, repeats: int = 5) -> tuple[float, float]:
    """Seconds for one feature split (cfg.split_steps steps) on a synthesis-sized batch of teacher features:
    (the path the engine uses, the straightforward autograd + torch.optim.Adam reference)."""
    device = resolve_device(cfg.device)
    teacher, _ = load_teacher(cfg, device)
    info = dataset_info(cfg.dataset)
    x = torch.rand(cfg.batch_size, *info.image_shape, device=device)
    y = torch.randint(0, info.num_classes, (cfg.batch_size,), device=device)
    with torch.no_grad():
        h = teacher.features(x)
    kw = dict(steps=cfg.split_steps, lr=cfg.split_lr, beta=cfg.split_beta, rule=cfg.mask_rule)
    out = []
    for fn in (lambda: split_teacher_features(teacher, h, y, **kw), lambda: split_features(teacher.head, h, y, **kw)):
        fn()  # warm-up
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t) / repeats)
    return out[0], out[1]


MATMUL_N = 1024


def matmul_gflops(n: int = MATMUL_N, min_s: float = 1.0, repeats: int = 3) -> float:
    """GFLOP/s of an n x n fp32 matmul on the CPU with torch's current thread count (2 n^3 FLOPs each): the best of
    `repeats` timings of at least `min_s` seconds each (one such timing varies by up to ~20 % on a shared machine;
    the best is the machine's limit, so the fractions set against it are the conservative ones)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = 0.0
    for _ in range(repeats):
        count, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            count += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_s:
                break
        best = max(best, 2.0 * n**3 * count / elapsed / 1e9)
    return best


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker, whose backward hooks make torch.autograd.grad on a
    leaf input (every attack here) fail; only the global total is needed."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def checked(events: Iterable[Event]) -> Iterator[Event]:
    """The run's events; a RunFailed raises (a bench figure of a failed run would mean nothing)."""
    for ev in events:
        if isinstance(ev, RunFailed):
            raise RuntimeError(f"bench run failed: {ev.reason}")
        yield ev


def count_flops(cfg: Config) -> float:
    """FLOPs of a whole run of `cfg`, counted by FlopCounterMode (not estimated)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        for _ev in checked(run(cfg, threading.Event(), in_thread=False)):  # FlopCounterMode: this thread only
            pass
    return float(counter.get_total_flops())


_CONV = re.compile(r"conv(olution|_transpose|_depthwise|\dd)")
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm"})


def is_counted_op(name: str) -> bool:
    """Whether a profiler op name is one FlopCounterMode counts: a convolution (forward or backward) or a matmul."""
    return bool(_CONV.search(name)) or name in MATMUL_OPS


def profile_counted_ops(cfg: Config) -> tuple[float, float]:
    """(seconds the counted ops took, in their own kernel time; wall seconds) of a whole run of `cfg` under
    torch.profiler. The profiler records the thread that starts it, so it starts in the run's compute thread
    (ferd.handoff), where a timed run computes too."""
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, float] = {}

    def profiled(halt: StopFlag) -> Iterator[Event]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            yield from run(cfg, halt, in_thread=False)
            out["wall"] = time.perf_counter() - t0
        out["counted"] = sum(e.self_cpu_time_total for e in prof.key_averages() if is_counted_op(e.key)) / 1e6

    for _ev in checked(computed(profiled, threading.Event(), name="ferd-bench-profile")):
        pass
    if out["counted"] <= 0:
        raise RuntimeError("the profiler recorded no convolution or matmul in the bench run")
    return out["counted"], out["wall"]


def timed_pass(cfg: Config) -> tuple[float, float, dict[str, list[float]]]:
    """One run of `cfg`: (its seconds, the seconds to its first event, each phase's seconds in each epoch)."""
    phases: dict[str, list[float]] = {}
    first_event: float | None = None
    t0 = time.perf_counter()
    for ev in checked(run(cfg, threading.Event())):
        if first_event is None:
            first_event = time.perf_counter() - t0
        if isinstance(ev, EpochFinished):
            for k, v in ev.phase_s.items():
                phases.setdefault(k, []).append(v)
    return time.perf_counter() - t0, first_event or 0.0, phases


def bench(cfg: Config, *, epochs: int = 3, out=sys.stdout, as_json: bool = False) -> dict[str, float]:
    """Run `epochs` epochs of `cfg` (warm-up 1, evaluation on the last) twice, cold then warm (module docstring),
    and print the per-phase table (or, with `as_json`, one JSON line)."""
    cfg = cfg.replace(epochs=epochs, warmup_epochs=min(1, epochs - 1), eval_every=epochs,
                      final_attacks=tuple(a for a in cfg.eval_attacks))
    threads = set_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with fixed_threads(1):  # this thread must not open OpenMP regions before the run's compute thread (ferd.handoff)
        load_teacher(cfg, device)
    teacher_s = time.perf_counter() - t0
    cold_s, first_event, _ = timed_pass(cfg)  # the process's first run: imports, numba's cache, oneDNN's kernels
    total, _, phases = timed_pass(cfg)  # warm, as every epoch of a long run after its first
    set_threads(cfg.num_threads)  # the run set this thread to one; the split and the matmul use the run's count
    split_s, split_ref_s = time_split(cfg)
    flops_per_epoch = count_flops(cfg) / epochs
    counted_s, profiled_s = profile_counted_ops(cfg) if device.type == "cpu" else (float("nan"), float("nan"))
    set_threads(cfg.num_threads)
    matmul = matmul_gflops() if device.type == "cpu" else float("nan")
    result = {"device": str(device), "threads": threads, "epochs": epochs, "teacher_load_s": teacher_s,
              "first_event_s": first_event, "cold_run_s": cold_s,
              "cold_seconds_per_epoch": cold_s / epochs, "run_s": total, "epoch_s": total / epochs,
              "seconds_per_epoch": total / epochs, "flops_per_epoch": flops_per_epoch,
              "achieved_gflops": flops_per_epoch / (total / epochs) / 1e9, "matmul_gflops": matmul,
              "split_s": split_s, "split_reference_s": split_ref_s, "peak_rss_mib": peak_rss_mib()}
    for k, v in phases.items():
        result[f"{k}_s"] = float(np.mean(v))
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["matmul_fraction"] = result["achieved_gflops"] / matmul if matmul == matmul else float("nan")
    # The profiled pass: the counted ops' own speed and the share of the run they fill.
    result["counted_ops_seconds_per_epoch"] = counted_s / epochs
    result["counted_ops_share"] = counted_s / profiled_s
    result["counted_ops_gflops"] = flops_per_epoch * epochs / counted_s / 1e9
    result["counted_ops_matmul_fraction"] = result["counted_ops_gflops"] / matmul
    if as_json:
        print(json.dumps({k: (None if isinstance(v, float) and v != v else v) for k, v in result.items()}), file=out)
        return result
    print(f"device {device}, torch threads {threads}, method {cfg.method}, B {cfg.batch_size}, "
          f"N_G {cfg.generator_steps}, N_S {cfg.student_steps}, {epochs} epochs", file=out)
    print(f"{'phase':34s} {'seconds':>9s}", file=out)
    rows = [("teacher load (cached after first use)", teacher_s), ("first event after start", first_event)]
    rows += [(f"{k} (mean per epoch)", float(np.mean(v))) for k, v in phases.items()]
    rows += [(f"feature split, one call ({cfg.split_steps} steps)", split_s),
             ("  same, autograd reference", split_ref_s),
             (f"{epochs} epochs, first run in process", cold_s),
             (f"{epochs} epochs, warm (per-epoch figures)", total)]
    for name, v in rows:
        print(f"{name:34s} {v:9.3f}", file=out)
    print(f"{'split speed-up vs reference':34s} {split_ref_s / split_s:8.2f}x", file=out)
    print(f"{'GFLOP per epoch (counted)':34s} {flops_per_epoch / 1e9:9.1f}", file=out)
    print(f"{'achieved GFLOP/s':34s} {result['achieved_gflops']:9.1f}", file=out)
    if matmul == matmul:
        print(f"{f'fp32 matmul {MATMUL_N}^2 GFLOP/s, same threads':34s} {matmul:9.1f}  "
              f"(run at {result['matmul_fraction']:.0%} of it)", file=out)
        print(f"{'counted ops alone GFLOP/s':34s} {result['counted_ops_gflops']:9.1f}  "
              f"({result['counted_ops_matmul_fraction']:.0%} of the matmul; they fill "
              f"{result['counted_ops_share']:.0%} of a profiled run)", file=out)
    print(f"{'peak RSS (MiB)':34s} {result['peak_rss_mib']:9.0f}", file=out)
    if "peak_cuda_mib" in result:
        print(f"{'peak CUDA memory (MiB)':34s} {result['peak_cuda_mib']:9.0f}", file=out)
    return result
