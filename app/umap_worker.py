"""UMAP fits and projections, meant to run in a worker process (`app.embedding.UmapService`).

numba-compiled UMAP holds the GIL for the whole of a fit, so a fit in the server process stalls the
training threads next to it (an epoch took 3-4x longer while the Samples page refitted maps). In a
process of its own it only competes for a CPU core. The functions also run in-process (tests, or where
a process cannot be spawned); fitted reducers stay in this module's table, keyed by the caller.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from typing import Any

import numpy as np

_REDUCERS: dict[Hashable, Any] = {}


def _reducer(params: dict[str, Any], n: int) -> Any:
    import umap  # imported lazily: importing it compiles numba code (seconds)

    return umap.UMAP(n_components=2, n_neighbors=min(int(params["n_neighbors"]), n - 1),
                     min_dist=float(params["min_dist"]), random_state=int(params["random_state"]), n_jobs=1)


def warm(params: dict[str, Any]) -> bool:
    """Compile UMAP's kernels: fit and transform small random data once (both compile their own)."""
    rng = np.random.default_rng(int(params["random_state"]))
    reducer = _reducer(params, 64).fit(rng.standard_normal((64, 8)).astype(np.float32))
    reducer.transform(rng.standard_normal((4, 8)).astype(np.float32))
    return True


def fit(key: Hashable, x: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Fit a map on (N, D) float32 `x`, keep its reducer under `key`; (N, 2) float64 coordinates."""
    reducer = _reducer(params, len(x))
    coords = np.asarray(reducer.fit_transform(x), dtype=np.float64)
    _REDUCERS[key] = reducer
    return coords


def transform(key: Hashable, x: np.ndarray) -> np.ndarray:
    """Project (M, D) samples into the map fitted under `key`; KeyError when there is none."""
    return np.asarray(_REDUCERS[key].transform(x), dtype=np.float64)


def forget(key: Hashable) -> None:
    _REDUCERS.pop(key, None)


def pid() -> int:
    """The process these functions run in."""
    return os.getpid()
