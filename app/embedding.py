"""2-D maps of teacher features for the Samples page: PCA at once, UMAP once it is warm.

UMAP compiles its numba kernels on first use (seconds to a minute) and numba holds the GIL while it
runs, so fits on a server thread would stall every session and the training threads. `UmapService`
runs UMAP in one worker process (`app.umap_worker`), warms it up in the background, serves PCA until
then (or if the worker fails), serialises fits behind one lock and caches fitted maps by key; later
samples are projected into a fitted map (`transform`) so existing points do not jump.
"""

from __future__ import annotations

import atexit
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.context import SpawnContext
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from app import umap_worker
from app.charts import LAYOUT
from app.colors import class_colors
from ferd.events import Event, SamplesSynthesised
from ferd.executor import NoMainSpawnProcess

# The one process-wide global: numba-compiled UMAP code is not safe to run from two threads at once
# (concurrent fits crash the interpreter), and every session's service object shares the same numba
# runtime (in-process) or worker, so the lock must be module-level rather than per instance.
_UMAP_LOCK = threading.Lock()

PCA = "PCA"
UMAP = "UMAP"
_SYMBOLS = ("circle", "diamond", "square", "x", "triangle-up", "cross")


class _WorkerContext(SpawnContext):
    Process = NoMainSpawnProcess


def _flat(features: np.ndarray, dtype: type) -> np.ndarray:
    x = np.asarray(features, dtype=dtype)
    return x.reshape(len(x), int(np.prod(x.shape[1:]))) if x.ndim > 1 else x.reshape(len(x), 1)


def pca_2d(features: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, 2) projection on the two leading principal components (zeros where undefined).

    Deterministic: each component's sign is fixed so its largest-magnitude loading is positive.
    """
    x = _flat(features, np.float64)
    out = np.zeros((len(x), 2))
    if len(x) < 2:
        return out
    x = x - x.mean(axis=0)
    _u, _s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(2, vt.shape[0])
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    out[:, :k] = x @ (comps * signs[:, None]).T
    return out


class UmapService:
    """Thread-safe UMAP maps with a PCA fallback; create one per process (st.cache_resource).

    `embed` is the page's entry point: PCA while UMAP is not ready (or for too few samples), else the cached
    UMAP map of `key`, extended by projecting any samples appended since it was fitted. With `isolate` (the
    default) UMAP runs in one spawned worker process; `isolate=False` runs it in this process (tests).
    """

    def __init__(self, *, n_neighbors: int = 15, min_dist: float = 0.1, random_state: int = 0,
                 min_samples: int = 16, max_maps: int = 8, isolate: bool = True) -> None:
        self.params = {"n_neighbors": n_neighbors, "min_dist": min_dist, "random_state": random_state}
        self.min_samples = min_samples
        """Below this many samples `embed` uses PCA (UMAP needs a neighbourhood graph)."""
        self.max_maps = max_maps
        """Fitted maps kept (least recently used dropped first): memory stays flat over long sessions."""
        self.isolate = isolate
        self._ready = threading.Event()
        self._maps: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        """Per key, the (N, 2) coordinates of every sample embedded so far (fitted ones, then projected ones)."""
        self._last_key: Hashable | None = None
        self._warm_thread: threading.Thread | None = None
        self._executor: ProcessPoolExecutor | None = None
        self._ns = uuid.uuid4().hex  # keys in the worker's table are (service, key)
        if isolate:
            atexit.register(self.close)  # once: close() is idempotent and a later call restarts the worker
        self.error = ""
        """Why UMAP could not be used ('' if it can); `embed` then keeps serving PCA."""

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run an `app.umap_worker` function under the lock: in the worker process, or here."""
        with _UMAP_LOCK:
            if not self.isolate:
                return fn(*args)
            if self._executor is None:
                self._executor = ProcessPoolExecutor(max_workers=1, mp_context=_WorkerContext())
            return self._executor.submit(fn, *args).result()

    def close(self) -> None:
        """Stop the worker process (registered at exit; a later call starts a new one)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def warm_up(self) -> threading.Thread:
        """Compile UMAP's kernels in the background (a fit on small random data); idempotent.

        The thread is joined at interpreter exit: a daemon thread still inside numba code when the
        interpreter tears down aborts the process.
        """
        if self._warm_thread is None:
            self._warm_thread = threading.Thread(target=self._warm, name="umap-warm-up", daemon=True)
            self._warm_thread.start()
            atexit.register(self._warm_thread.join, 120)
        return self._warm_thread

    def _warm(self) -> None:
        try:
            self._call(umap_worker.warm, self.params)
        except Exception as e:  # any failure just leaves the PCA fallback in place
            self.error = f"UMAP unavailable: {e}"
            return
        self._ready.set()

    def fit(self, features: np.ndarray, key: Hashable) -> np.ndarray:
        """Fit a UMAP map on (N, D) features and cache it under `key`; (N, 2). A cached key returns its map."""
        x = _flat(features, np.float32)
        cached = self._maps.get(key)
        if cached is not None and len(cached) == len(x):
            self._maps.move_to_end(key)
            self._last_key = key
            return cached
        coords = self._call(umap_worker.fit, (self._ns, key), x, self.params)
        self._maps[key] = coords
        self._maps.move_to_end(key)
        while len(self._maps) > self.max_maps:
            dropped, _ = self._maps.popitem(last=False)
            self._call(umap_worker.forget, (self._ns, dropped))
        self._last_key = key
        return coords

    def transform(self, new_features: np.ndarray, *, key: Hashable | None = None) -> np.ndarray:
        """Project (M, D) new samples into the map of `key` (default: the last fitted one); (M, 2)."""
        key = self._last_key if key is None else key
        if key not in self._maps:
            raise RuntimeError("no fitted UMAP map to project into; call fit first")
        x = _flat(new_features, np.float32)
        if len(x) == 0:
            return np.zeros((0, 2))
        return self._call(umap_worker.transform, (self._ns, key), x)

    def embed(self, features: np.ndarray, key: Hashable) -> tuple[np.ndarray, str]:
        """(coords (N, 2), "PCA" or "UMAP").

        Callers keep the sample order stable and only append (e.g. ordered by epoch): rows beyond those a
        cached map was fitted on are projected into it, a shorter prefix reuses the cached coordinates.
        If the worker process dies (numba crash, killed for memory) the page keeps PCA and shows why.
        """
        x = _flat(features, np.float32)
        if not self.ready or len(x) < self.min_samples:
            return pca_2d(x), PCA
        try:
            fitted = self._maps.get(key)
            if fitted is None:
                return self.fit(x, key), UMAP
            self._maps.move_to_end(key)
            self._last_key = key
            n = len(fitted)
            if len(x) > n:
                fitted = self._maps[key] = np.concatenate([fitted, self.transform(x[n:], key=key)])
            return fitted[: len(x)], UMAP
        except BrokenProcessPool as e:
            self.error = f"UMAP worker stopped ({e}); showing PCA."
            self._ready.clear()
            self._maps.clear()
            self.close()
            return pca_2d(x), PCA


def embedding_figure(coords: np.ndarray, labels: Sequence[int], method_labels: Sequence[str],
                     ids: Sequence[int], *, class_names: Sequence[str] | None = None) -> go.Figure:
    """Scatter (WebGL) of a 2-D map: colour = class, symbol = run/method, customdata = sample id.

    Each method draws its classes from its own palette (`app.colors.CLASS_PALETTES`, in order of appearance)
    and with its own marker symbol, so no colour stands for a class of two methods. One trace per (method,
    class), grouped per method in the legend, so either can be toggled; `ids` index the caller's sample table and
    come back in a plotly selection's `customdata` (hover and lasso show the images).
    """
    coords = np.asarray(coords, dtype=float)
    labels = np.asarray(labels)
    methods = np.asarray(method_labels, dtype=object)
    ids = np.asarray(ids)
    if not (len(coords) == len(labels) == len(methods) == len(ids)):
        raise ValueError("coords, labels, method_labels and ids must have the same length")
    names = list(class_names) if class_names is not None else [str(c) for c in sorted(set(labels.tolist()))]
    num_classes = max(len(names), int(labels.max()) + 1 if len(labels) else 0)
    fig = go.Figure()
    for m_i, method in enumerate(dict.fromkeys(methods.tolist())):
        colors = class_colors(num_classes, palette=m_i)
        for c in sorted(set(labels[methods == method].tolist())):
            sel = (methods == method) & (labels == c)
            name = names[c] if isinstance(c, (int, np.integer)) and 0 <= c < len(names) else str(c)
            fig.add_trace(go.Scattergl(
                x=coords[sel, 0], y=coords[sel, 1], mode="markers", name=f"{method} · {name}",
                legendgroup=str(method), legendgrouptitle_text=str(method).upper(), customdata=ids[sel],
                marker={"color": colors[int(c)], "symbol": _SYMBOLS[m_i % len(_SYMBOLS)],
                        "size": 8, "opacity": 0.85, "line": {"width": 0.5, "color": "#333333"}},
                hovertemplate=f"{method}<br>class {name}<br>sample %{{customdata}}<extra></extra>"))
    fig.update_layout(xaxis={"showticklabels": False, "title": ""}, yaxis={"showticklabels": False, "title": ""},
                      legend={"groupclick": "toggleitem"}, dragmode="lasso", height=520, **LAYOUT)
    return fig


@dataclass(frozen=True)
class SampleSet:
    """Synthesised samples of several runs, one row each, ordered by epoch then run (so later epochs append)."""

    table: pd.DataFrame
    """Columns id (row number, the figure's customdata), run_id, method, epoch, cls, pred (teacher's class)."""
    images: np.ndarray
    """(N, H, W, C) uint8 thumbnails."""
    features: np.ndarray
    """(N, D) float32 teacher features."""


def collect_samples(runs: Sequence[tuple[str, str, Sequence[Event]]], *, max_epoch: int | None = None) -> SampleSet:
    """Gather the SamplesSynthesised payloads of `runs` ((run_id, method label, events) each) up to `max_epoch`.

    Raises ValueError when the runs' thumbnails or features do not share a shape (different datasets or teachers).
    """
    batches = [(e.epoch, i, run_id, method, e) for i, (run_id, method, events) in enumerate(runs)
               for e in events if isinstance(e, SamplesSynthesised) and (max_epoch is None or e.epoch <= max_epoch)]
    batches.sort(key=lambda b: (b[0], b[1]))
    if not batches:
        return SampleSet(pd.DataFrame(columns=["id", "run_id", "method", "epoch", "cls", "pred"]),
                         np.zeros((0, 1, 1, 1), np.uint8), np.zeros((0, 1), np.float32))
    if len({b[4].images.shape[1:] for b in batches}) > 1 or len({b[4].features.shape[1:] for b in batches}) > 1:
        raise ValueError("these runs have different image or feature shapes (different datasets or teachers); "
                         "pick runs on the same teacher")
    table = pd.DataFrame({
        "run_id": np.concatenate([[b[2]] * len(b[4].labels) for b in batches]),
        "method": np.concatenate([[b[3]] * len(b[4].labels) for b in batches]),
        "epoch": np.concatenate([np.full(len(b[4].labels), b[0]) for b in batches]),
        "cls": np.concatenate([np.asarray(b[4].labels, dtype=int) for b in batches]),
        "pred": np.concatenate([np.asarray(b[4].teacher_pred, dtype=int) for b in batches]),
    })
    table.insert(0, "id", np.arange(len(table)))
    images = np.concatenate([b[4].images for b in batches])
    features = np.concatenate([np.asarray(b[4].features, dtype=np.float32) for b in batches])
    return SampleSet(table, images, features)


def upscale_nearest(images: np.ndarray, *, size: int = 64) -> np.ndarray:
    """(N, H, W, C) uint8 -> nearest-neighbour upscaled by the integer factor that brings H to about `size`;
    single-channel images lose their channel axis (what st.image expects for grey)."""
    images = np.asarray(images)
    factor = max(1, size // max(images.shape[1], 1))
    out = images.repeat(factor, axis=1).repeat(factor, axis=2)
    return out[..., 0] if out.shape[-1] == 1 else out
