"""The Ablation page's grid logic, pure (no Streamlit): which config fields can be swept, the slider's candidate
values for each, and which stored runs are points of the grid the form shows.

A grid is a list of Configs (`ferd.experiments.ablation_configs`). A run belongs to it when its stored config
equals one of them on every field that changes what a run computes (device, thread count, data folder and
preset name aside). Matching by config rather than by run name means a reloaded page, whose form is back at
its defaults, shows the results of that grid and not of the last grid queued; a reference pack can use the
same matching.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ferd.config import Config, to_dict

T = TypeVar("T")

RUN_ONLY_FIELDS = ("device", "num_threads", "data_root", "preset")
"""Config fields that say where a run ran or where its values came from, not what it computed."""
NOT_SWEPT = ("seed", "num_threads", "thumbnails", "eval_batch_size")
"""Numeric fields the page does not offer: the seed has its own slider, the others do not change the results."""
SWEEPABLE = tuple(sorted(f.name for f in dataclasses.fields(Config)
                         if f.type in ("int", "float") and f.name not in NOT_SWEPT))
"""Every numeric config field the grid can sweep."""
LABELS = {"utae_weight": "λ_u · utae_weight (UTAE weight)", "w_bn": "w_bn (BN-statistics loss weight)",
          "w_uni": "w_uni (uniformity weight)", "w_oh": "w_oh (one-hot loss weight)",
          "w_adv": "w_adv (adversarial loss weight)", "eps": "ε · eps (L∞ radius)", "c_min": "c_min", "c_max": "c_max",
          "epochs": "epochs E", "generator_steps": "generator steps N_G", "student_steps": "student steps N_S",
          "batch_size": "batch size B", "w_nat": "w_nat (natural loss weight)", "w_rob": "w_rob (robust loss weight)"}
"""Display names of the fields whose symbol in METHOD.md differs from the field name; others show as is."""
CANDIDATES: dict[str, tuple[float, ...]] = {
    "w_uni": (0, 0.5, 1, 2, 5, 10, 20, 50),
    "utae_weight": (0, 0.5, 1, 2, 5, 10, 20, 50),
    "w_bn": (0, 0.1, 0.25, 0.5, 1, 2, 5, 10),
    "w_oh": (0, 0.1, 0.25, 0.5, 1, 2, 5, 10),
    "w_adv": (0, 0.1, 0.25, 0.5, 1, 2, 5, 10),
    "eps": (0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.2, 0.3),
    "c_min": (0, 0.01, 0.02, 0.05, 0.1, 0.15),
    "c_max": (0.1, 0.15, 0.2, 0.3, 0.5, 1.0),
    "w_nat": (0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0),
    "w_rob": (0, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0),
}
"""Slider stops of the fields with a natural scale; any other field gets multiples of its preset value."""
FACTORS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def label(field: str) -> str:
    return LABELS.get(field, field)


def is_int(field: str) -> bool:
    return {f.name: f.type for f in dataclasses.fields(Config)}[field] == "int"


def _round(v: float) -> float:
    """Three significant digits: slider stops read 0.002, not 0.0020000000000000005."""
    return float(f"{v:.3g}")


def candidate_values(field: str, base_value: float) -> list[float]:
    """Ascending slider stops for `field`: its fixed scale (`CANDIDATES`) or the preset value times `FACTORS`
    (integers for int fields, at least 1), always including the preset value itself."""
    if field in CANDIDATES:
        values = {float(v) for v in CANDIDATES[field]}
    elif is_int(field):
        values = {float(max(1, round(base_value * f))) for f in FACTORS} if base_value else {0.0, 1.0, 2.0, 5.0}
    else:
        values = {_round(base_value * f) for f in FACTORS} if base_value else {0.0, 0.1, 0.5, 1.0}
    values.add(float(base_value))
    return sorted(values)


def between(candidates: Sequence[float], low: float, high: float) -> list[float]:
    """The slider stops from `low` to `high` (inclusive): the grid's values."""
    return [v for v in candidates if low <= v <= high]


def experiment_key(config: Config | Mapping[str, Any]) -> str:
    """What a run computed: its config as canonical JSON without the `RUN_ONLY_FIELDS`."""
    d = to_dict(config) if isinstance(config, Config) else dict(config)
    return json.dumps({k: v for k, v in d.items() if k not in RUN_ONLY_FIELDS}, sort_keys=True, default=str)


def match_grid(configs: Sequence[Config], runs: Sequence[T], *,
               config_of: Callable[[T], Mapping[str, Any]] = lambda r: r.config) -> list[T]:
    """The runs (in the given order) whose config is a point of the grid `configs`. `config_of` reads a run's
    config dict (default: `.config`, as on the store's RunInfo; a results record would pass `r["config"]`)."""
    keys = {experiment_key(c) for c in configs}
    return [r for r in runs if experiment_key(config_of(r)) in keys]


def unqueued(configs: Sequence[Config], runs: Sequence[Any], *,
             config_of: Callable[[Any], Mapping[str, Any]] = lambda r: r.config,
             status_of: Callable[[Any], str] = lambda r: r.status) -> list[Config]:
    """The grid points with no run yet that could give them a result (failed runs do not count): what
    "Queue grid" submits."""
    have = {experiment_key(config_of(r)) for r in runs if status_of(r) != "failed"}
    return [c for c in configs if experiment_key(c) not in have]
