"""Run labels that tell runs apart: preset, method, seed, epochs and start time (CLI and dashboard alike)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ferd.config import ConfigError, load_preset, preset_names

QUICK_PRESETS = ("smoke",)
"""Presets that only check that everything runs: never the default choice for showing results."""
# Fields that tell the presets apart, for runs stored before configs recorded their preset.
_PRESET_SIGNATURE = ("dataset", "teacher_epochs", "epochs", "generator_steps", "student_steps", "batch_size",
                     "generator_width")


@functools.cache
def _signatures() -> dict[str, tuple]:
    out = {}
    for name in preset_names():
        try:
            cfg = load_preset(name)
        except ConfigError:
            continue
        out[name] = tuple(getattr(cfg, k) for k in _PRESET_SIGNATURE)
    return out


def preset_of(config: Mapping[str, Any]) -> str:
    """The preset a run started from: its `preset` field; for older runs the preset whose schedule and teacher
    it matches; else its dataset."""
    if config.get("preset"):
        return str(config["preset"])
    signature = tuple(config.get(k) for k in _PRESET_SIGNATURE)
    return next((name for name, sig in _signatures().items() if sig == signature), str(config.get("dataset", "?")))


def started_at(run_id: str) -> str:
    """`Nov 29 22:41:07` from a run id of the form YYYYmmdd-HHMMSS-xxxxxx (the id itself otherwise)."""
    try:
        return datetime.strptime(run_id[:15], "%Y%m%d-%H%M%S").strftime("%b %d %H:%M:%S")
    except ValueError:
        return run_id


def run_label(run_id: str, config: Mapping[str, Any], name: str = "") -> str:
    """`[name · ]preset · method · seed s · E ep · start time`."""
    parts = [name] if name else []
    parts += [preset_of(config), str(config.get("method", "?")), f"seed {config.get('seed', '?')}",
              f"{config.get('epochs', '?')} ep", started_at(run_id)]
    return " · ".join(parts)


def is_quick(config: Mapping[str, Any]) -> bool:
    """True for runs of a quick check preset (`QUICK_PRESETS`)."""
    return preset_of(config) in QUICK_PRESETS
