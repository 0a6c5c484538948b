"""Sidebar and form widgets: they draw Streamlit inputs and return plain values (a Config, nothing else)."""

from __future__ import annotations

from typing import Any

import streamlit as st

from app.jobs import JobRegistry
from ferd.config import (
    GENERATOR_RESETS,
    MASK_RULES,
    UTAE_MODES,
    Config,
    ConfigError,
    field_doc,
    load_preset,
    preset_names,
)

DEFAULT_PRESET = "digits"
GIVEN = "(current settings)"
REFERENCE_CODE = "reference-code"
METHOD_LABELS = {
    "ferd": "FERD",
    "dfrd": "DFRD (vanilla baseline)",
    REFERENCE_CODE: "FERD as in the released code (reference-code preset)",
    "real-data": "Real data (ceiling: student trained on the training split)",
}
INT_FIELDS = ("epochs", "generator_steps", "student_steps", "batch_size", "seed")
FLOAT_FIELDS = ("w_uni", "c_min", "c_max", "utae_weight", "eps")
CHOICE_FIELDS = {"utae_mode": UTAE_MODES, "mask_rule": MASK_RULES, "generator_reset": GENERATOR_RESETS}
LABELS = {"w_uni": "uniformity weight w_uni", "c_min": "c_min", "c_max": "c_max", "utae_weight": "UTAE weight λ_u",
          "eps": "ε (L∞, pixels in [0,1])", "epochs": "epochs E", "generator_steps": "generator steps N_G",
          "student_steps": "student steps N_S", "batch_size": "batch size B", "seed": "seed",
          "utae_mode": "UTAE mode", "mask_rule": "feature-split mask rule", "generator_reset": "generator reset",
          "reweight": "robustness-guided reweighting",
          "utae_marginal_weight": "UTAE batch-spread weight λ_m (marginal-kl)"}


UTAE_WEIGHTS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
"""The λ_u slider's stops: a log grid (the effect of λ_u spans orders of magnitude) plus 0."""


def utae_weight_options(current: float) -> list[float]:
    """The slider's stops, with the current value added where it is off the grid."""
    return sorted({*UTAE_WEIGHTS, float(current)})


def default_config() -> Config:
    """The embedded default preset, or the dataclass defaults while presets are unavailable."""
    try:
        return load_preset(DEFAULT_PRESET)
    except ConfigError:
        return Config()


def _base(defaults: Config, preset: str, method: str) -> Config:
    if method == REFERENCE_CODE:
        return load_preset(REFERENCE_CODE)
    cfg = defaults if preset == GIVEN else load_preset(preset)
    return cfg if cfg.method == method else cfg.for_method(method)


def config_form(defaults: Config, key: str) -> Config | None:
    """Preset picker and the run's main knobs; returns the Config, or None after showing the error.

    Widget keys include the preset and method, so picking another one resets the inputs to its values.
    """
    presets = [GIVEN, *(p for p in preset_names() if p != REFERENCE_CODE)]
    preset = st.selectbox("Preset", presets, key=f"{key}-preset",
                          help="Starting values; the inputs below override them.")
    methods = list(METHOD_LABELS)
    start = defaults.method if defaults.method in methods else "ferd"
    method = st.selectbox("Method", methods, index=methods.index(start), format_func=METHOD_LABELS.__getitem__,
                          key=f"{key}-method", help=field_doc("method"))
    try:
        base = _base(defaults, preset, method)
    except ConfigError as e:
        st.error(f"Preset {preset!r}: {e}")
        return None
    prefix = f"{key}-{preset}-{method}"
    values: dict[str, Any] = {}
    left, right = st.columns(2)
    with left:
        for name in ("w_uni", "c_min", "c_max"):
            values[name] = st.number_input(LABELS[name], value=float(getattr(base, name)), format="%.4g",
                                           key=f"{prefix}-{name}", help=field_doc(name) or None)
        values["utae_weight"] = st.select_slider(
            LABELS["utae_weight"], utae_weight_options(base.utae_weight), value=float(base.utae_weight),
            format_func=lambda v: f"{v:g}", key=f"{prefix}-utae_weight",
            help=(field_doc("utae_weight") + " Large values can switch the training attack off: the Live page "
                  "shows its success rate against an untargeted reference. Used by the uniform-kl mode."))
        values["utae_marginal_weight"] = st.number_input(
            LABELS["utae_marginal_weight"], min_value=0.0, value=float(base.utae_marginal_weight), step=0.05,
            format="%.3g", key=f"{prefix}-utae_marginal_weight", help=field_doc("utae_marginal_weight") or None)
        for name in CHOICE_FIELDS:
            options = list(CHOICE_FIELDS[name])
            values[name] = st.selectbox(LABELS[name], options, index=options.index(getattr(base, name)),
                                        key=f"{prefix}-{name}", help=field_doc(name) or None)
        values["reweight"] = st.checkbox(LABELS["reweight"], value=base.reweight, key=f"{prefix}-reweight",
                                         help=field_doc("reweight") or None)
    with right:
        for name in INT_FIELDS:
            values[name] = int(st.number_input(LABELS[name], value=int(getattr(base, name)), step=1,
                                               key=f"{prefix}-{name}", help=field_doc(name) or None))
        values["eps"] = st.number_input(LABELS["eps"], value=float(base.eps), step=1 / 255, format="%.4f",
                                        key=f"{prefix}-eps", help=field_doc("eps") or None)
    if method == "dfrd":
        st.caption("DFRD switches reweighting off and uses untargeted attacks; w_uni > 0 adds FERD's uniformity loss.")
    try:
        return base.replace(**values)
    except ConfigError as e:
        st.error(f"Invalid setting — {e}")
        return None


def format_eta(seconds: float | None) -> str:
    """`ETA m:ss` or `ETA h:mm:ss`; `ETA …` while unknown."""
    if seconds is None:
        return "ETA …"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"ETA {hours}:{minutes:02d}:{secs:02d}" if hours else f"ETA {minutes}:{secs:02d}"


def job_queue(registry: JobRegistry) -> None:
    """The sidebar queue: running and queued jobs of this server, with progress and ETA."""
    active = [j for j in registry.jobs() if j.status in ("queued", "running")]
    st.subheader("Jobs")
    if not active:
        st.caption("No run in progress.")
        return
    for job in reversed(active):
        label = job.name or job.run_id
        if job.status == "running":
            st.progress(job.epoch / max(job.total_epochs, 1),
                        text=f"▶ {label}: epoch {job.epoch}/{job.total_epochs} · {format_eta(job.eta_s)}")
        else:
            st.caption(f"⏳ {label}: queued (#{job.position})")
