"""Comparison and ablation analysis over run records: pure pandas and plotly, no Streamlit.

A run record is the dict `ferd.experiments.run_record` builds from a run's events (the results.json
entry): method, seed, config, and per attack the per-class accuracies with mean / worst / NSD.
Runs that differ only by seed form a *group*; groups get mean ± std over their seeds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.charts import LAYOUT
from app.colors import method_color, method_shades
from ferd import labels
from ferd.config import METHOD_OVERRIDES, Config, from_dict, load_preset
from ferd.experiments import error_bars, eval_rows

# Config fields that do not change what a run computes (where it ran, not what it is); ignored when
# deciding whether two runs are seeds of the same experiment.
_NON_EXPERIMENT_FIELDS = ("seed", "device", "num_threads", "data_root", "preset")
CEILING_METHOD = "real-data"


def _group_key(record: Mapping[str, Any]) -> str:
    cfg = {k: v for k, v in record.get("config", {}).items() if k not in _NON_EXPERIMENT_FIELDS}
    cfg["method"] = record.get("method", cfg.get("method", ""))
    return json.dumps(cfg, sort_keys=True, default=str)


def group_labels(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """run_id -> group label: the method, plus the config fields that tell its groups apart.

    Two FERD groups differing in w_uni become "ferd (w_uni=2.0)" and "ferd (w_uni=5.0)"; a method with one
    group is just its name.
    """
    keys = {r["run_id"]: _group_key(r) for r in records}
    by_method: dict[str, dict[str, dict[str, Any]]] = {}
    for key in dict.fromkeys(keys.values()):
        cfg = json.loads(key)
        by_method.setdefault(cfg["method"], {})[key] = cfg
    label_of_key: dict[str, str] = {}
    for method, cfgs in by_method.items():
        if len(cfgs) == 1:
            label_of_key.update(dict.fromkeys(cfgs, method))
            continue
        fields = sorted({k for c in cfgs.values() for k in c
                         if len({json.dumps(x.get(k)) for x in cfgs.values()}) > 1})
        for key, c in cfgs.items():
            label_of_key[key] = f"{method} ({', '.join(f'{k}={c.get(k)}' for k in fields)})"
    return {run_id: label_of_key[key] for run_id, key in keys.items()}


def run_label(record: Mapping[str, Any]) -> str:
    """Display name of one run: preset, method, seed, epochs and start time (`ferd.labels.run_label`)."""
    return labels.run_label(str(record["run_id"]), {"method": record.get("method"), "seed": record.get("seed"),
                                                    **record.get("config", {})})


def compare_frame(records: Sequence[Mapping[str, Any]], baseline_id: str) -> pd.DataFrame:
    """One row per run × attack × class: accuracy, delta vs the baseline run, worst-class flag, group stats.

    Columns: run_id, label, method, seed, group, attack, cls, acc, delta (acc − baseline acc of the same
    attack and class; NaN where the baseline lacks that attack), is_worst (the run's lowest class under that
    attack), is_baseline, group_mean, group_std (sample std over the group's seeds; NaN for a single seed),
    group_n. Accuracies are fractions in [0, 1].
    """
    if not records:
        raise ValueError("no runs to compare")
    ids = [r["run_id"] for r in records]
    if baseline_id not in ids:
        raise ValueError(f"baseline {baseline_id!r} is not among the compared runs")
    groups = group_labels(records)
    rows = []
    for r in records:
        for attack, res in eval_rows(r.get("eval", {})):
            acc = np.asarray(res["per_class"], dtype=float)
            worst = int(np.nanargmin(acc)) if np.isfinite(acc).any() else -1
            for c, a in enumerate(acc):
                rows.append({"run_id": r["run_id"], "label": run_label(r), "method": r.get("method", ""),
                             "seed": r.get("seed"), "group": groups[r["run_id"]], "attack": attack, "cls": c,
                             "acc": float(a), "is_worst": c == worst, "is_baseline": r["run_id"] == baseline_id})
    frame = pd.DataFrame(rows)
    if frame.empty:
        raise ValueError("the selected runs have no evaluation results yet")
    base = frame[frame["is_baseline"]].set_index(["attack", "cls"])["acc"].rename("base_acc")
    frame = frame.join(base, on=["attack", "cls"])
    frame["delta"] = frame["acc"] - frame["base_acc"]
    stats = frame.groupby(["group", "attack", "cls"])["acc"].agg(group_mean="mean", group_std="std",
                                                                 group_n="count")
    frame = frame.join(stats, on=["group", "attack", "cls"])
    return frame.drop(columns="base_acc")


def compare_figure(frame: pd.DataFrame, attack: str, *, by_group: bool = False) -> go.Figure:
    """Per-class accuracy bars side by side, one bar series per run (or per seed group with ± std bars).

    The worst class of each series gets a thick black outline and a "worst" annotation; the hover shows the
    delta against the baseline. Real-data runs (the ceiling) are drawn as horizontal tick markers, not bars.
    """
    sub = frame[frame["attack"] == attack]
    if sub.empty:
        raise ValueError(f"no results for attack {attack!r}")
    fig = go.Figure()
    key = "group" if by_group else "label"
    series = list(sub.groupby(key, sort=False))
    # The method's colour for every series of that method (app.colors); several series of one method
    # (seeds, or groups with other settings) get lighter shades of it.
    of_method: dict[str, list[str]] = {}
    for name, part in series:
        of_method.setdefault(part["method"].iloc[0], []).append(name)
    shade = {name: color for method, names in of_method.items()
             for name, color in zip(names, method_shades(method, len(names)), strict=True)}
    for name, part in series:
        color = shade[name]
        if by_group:
            part = part.groupby("cls", as_index=False).agg(acc=("group_mean", "first"), std=("group_std", "first"),
                                                           delta=("delta", "mean"), n=("group_n", "first"),
                                                           method=("method", "first"))
            worst_cls = part.loc[part["acc"].idxmin(), "cls"] if part["acc"].notna().any() else -1
            part["is_worst"] = part["cls"] == worst_cls
            error_y = {"type": "data", "array": part["std"].fillna(0).to_numpy() * 100, "visible": True}
        else:
            error_y = None
        part = part.sort_values("cls")
        cls = part["cls"].to_numpy()
        acc = part["acc"].to_numpy() * 100
        delta = part["delta"].to_numpy() * 100
        worst = part["is_worst"].to_numpy(dtype=bool)
        hover = [f"{name}<br>class {c}: {a:.1f}%<br>Δ vs baseline: {d:+.1f} pp"
                 for c, a, d in zip(cls, acc, delta, strict=True)]
        if part["method"].iloc[0] == CEILING_METHOD:
            fig.add_trace(go.Scatter(x=cls, y=acc, mode="markers", name=f"{name} (ceiling)", hovertext=hover,
                                     hoverinfo="text", marker={"symbol": "line-ew-open", "size": 28, "color": color,
                                                               "line": {"width": 3, "color": color}}))
            continue
        fig.add_trace(go.Bar(x=cls, y=acc, name=str(name), hovertext=hover, hoverinfo="text", error_y=error_y,
                             marker={"color": color, "line": {"color": np.where(worst, "black", color).tolist(),
                                                              "width": np.where(worst, 3, 0).tolist()}}))
        for c, a in zip(cls[worst], acc[worst], strict=True):
            fig.add_annotation(x=c, y=a, text="worst", showarrow=True, arrowhead=2, ax=0, ay=-24,
                               font={"color": color, "size": 11})
    fig.update_layout(barmode="group", title=f"Per-class accuracy under {attack}", xaxis_title="class",
                      yaxis_title="accuracy (%)", yaxis_range=[0, 105], legend_title_text="run",
                      xaxis={"tickmode": "linear", "dtick": 1}, **LAYOUT)
    return fig


def summary_table(records: Sequence[Mapping[str, Any]], *, by_group: bool = False) -> pd.DataFrame:
    """Mean / worst / NSD per attack for each run (or each seed group, with sample std over seeds); PGD-20 on
    AutoAttack's images is its own attack row (`ferd.experiments.AA_PGD20`).

    One row per (label, attack); columns label, method, n, attack, mean, mean_std, worst, worst_std, nsd, nsd_std.
    Accuracies are fractions; std columns are NaN for a single run.
    """
    groups = group_labels(records)
    rows = []
    for r in records:
        for attack, res in eval_rows(r.get("eval", {})):
            rows.append({"label": groups[r["run_id"]] if by_group else run_label(r), "method": r.get("method", ""),
                         "attack": attack, "mean": res["mean"], "worst": res["worst"], "nsd": res["nsd"]})
    cols = ["label", "method", "n", "attack", "mean", "mean_std", "worst", "worst_std", "nsd", "nsd_std"]
    if not rows:
        return pd.DataFrame(columns=cols)
    raw = pd.DataFrame(rows)
    out = raw.groupby(["label", "method", "attack"], sort=False).agg(
        n=("mean", "count"), mean=("mean", "mean"), mean_std=("mean", "std"), worst=("worst", "mean"),
        worst_std=("worst", "std"), nsd=("nsd", "mean"), nsd_std=("nsd", "std")).reset_index()
    return out[cols]


def format_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Display form of `summary_table`: one row per (run label, attack), indexed so, with "mean ± std" strings
    (percent; NSD as a ratio). Long rather than wide, so the table fits the page with five attacks."""

    def fmt(v: float, s: float, *, pct: bool) -> str:
        scale, unit, nd = (100, "%", 1) if pct else (1, "", 3)
        if s == s:  # not NaN: several seeds
            return f"{v * scale:.{nd}f} ± {s * scale:.{nd}f}{unit}"
        return f"{v * scale:.{nd}f}{unit}"

    rows = [{"run": row.label, "attack": row.attack, "method": row.method, "runs": str(row.n),
             "mean": fmt(row.mean, row.mean_std, pct=True), "worst class": fmt(row.worst, row.worst_std, pct=True),
             "NSD": fmt(row.nsd, row.nsd_std, pct=False)} for row in table.itertuples(index=False)]
    frame = pd.DataFrame(rows)
    return frame.set_index(["run", "attack"]) if not frame.empty else frame


def ablation_figure(table: pd.DataFrame, param: str, *, method: str = "ferd") -> go.Figure:
    """Worst-class PGD-20 accuracy (%) and PGD-20 NSD against the swept parameter, with ± std error bars, in the
    method's colour; both y-axes start at 0 (accuracy up to at least 100 %).

    `table` is `ferd.experiments.ablation_table(records, param)`.
    """
    if table.empty:
        raise ValueError("no finished runs in the ablation yet")
    t = table.sort_values("value")
    color = method_color(method)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("worst-class PGD-20 accuracy (higher is fairer)",
                                                        "PGD-20 NSD (lower is fairer)"))
    worst_lo, worst_hi = error_bars(t["pgd20_worst"], t["pgd20_worst_std"])
    nsd_lo, nsd_hi = error_bars(t["pgd20_nsd"], t["pgd20_nsd_std"])
    fig.add_trace(go.Scatter(x=t["value"], y=t["pgd20_worst"] * 100, mode="lines+markers", name="worst class",
                             line={"color": color},
                             error_y={"type": "data", "symmetric": False, "array": worst_hi * 100,
                                      "arrayminus": worst_lo * 100},
                             customdata=t["n"], hovertemplate=f"{param}=%{{x}}<br>worst %{{y:.1f}}%"
                                                              "<br>runs %{customdata}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=t["value"], y=t["pgd20_nsd"], mode="lines+markers", name="NSD", line={"color": color},
                             error_y={"type": "data", "symmetric": False, "array": nsd_hi, "arrayminus": nsd_lo},
                             customdata=t["n"], hovertemplate=f"{param}=%{{x}}<br>NSD %{{y:.3f}}"
                                                              "<br>runs %{customdata}<extra></extra>"), row=1, col=2)
    nsd_top = float(np.nanmax(t["pgd20_nsd"] + np.nan_to_num(nsd_hi))) if len(t) else 0.0
    fig.update_xaxes(title_text=param)
    fig.update_yaxes(title_text="accuracy (%)", range=[0, 100], row=1, col=1)
    fig.update_yaxes(title_text="NSD", range=[0, max(nsd_top * 1.1, 0.1)], row=1, col=2)
    fig.update_layout(showlegend=False, **LAYOUT)
    return fig


def counterpart_config(record_config: Mapping[str, Any], method: str) -> Config:
    """The config of the same experiment (teacher, seed, dataset) under another method.

    `method` is `ferd`, `dfrd`, `real-data` (via `Config.for_method`) or `reference-code` (the released code's
    preset with this run's seed). Fields the source method had switched off (e.g. w_uni=0 of a DFRD run) go back
    to their Config defaults before the target method's own switches apply, so DFRD → FERD really is FERD.
    """
    cfg = from_dict(dict(record_config))
    if method == "reference-code":
        return load_preset("reference-code", seed=cfg.seed)
    defaults = Config()
    restored = {k: getattr(defaults, k) for k in METHOD_OVERRIDES.get(cfg.method, {})}
    return cfg.replace(**restored).for_method(method)


# ---- choosing runs (RunInfo-like objects: run_id, method, status, config; newest first) ----
USABLE = ("running", "finished", "stopped", "interrupted")
"""Run statuses that can have results (queued runs have none; failed ones are not compared by default)."""
PAIRED = {"ferd": "dfrd", "dfrd": "ferd"}


def teacher_key(config: Mapping[str, Any]) -> tuple:
    """What makes two runs use the same teacher: dataset, architecture, checkpoint and training epochs."""
    return tuple(config.get(k) for k in ("dataset", "teacher_arch", "teacher_checkpoint", "teacher_epochs"))


def default_pair(runs: Sequence[Any]) -> tuple[Any, Any] | None:
    """The newest FERD run with a DFRD run on the same teacher and seed (that DFRD run the newest such), full
    presets before quick checks (`ferd.labels.QUICK_PRESETS`); None without such a pair."""
    usable = [r for r in runs if r.status in USABLE]
    ferds = sorted((r for r in usable if r.method == "ferd"), key=lambda r: labels.is_quick(r.config))
    for ferd in ferds:
        key = (teacher_key(ferd.config), ferd.config.get("seed"))
        dfrd = next((r for r in usable if r.method == "dfrd" and (teacher_key(r.config), r.config.get("seed")) == key),
                    None)
        if dfrd is not None:
            return ferd, dfrd
    return None


def default_selection(runs: Sequence[Any]) -> list[str]:
    """Run ids to compare by default: the `default_pair`, the other seeds of those two experiments, and a
    real-data run on the same teacher (the ceiling) when present.

    Falls back to the two newest usable runs, full presets first.
    """
    usable = [r for r in runs if r.status in USABLE]
    pair = default_pair(usable)
    if pair is not None:
        ferd, dfrd = pair
        key = (teacher_key(ferd.config), ferd.config.get("seed"))
        groups = {_group_key({"method": r.method, "config": r.config}) for r in (ferd, dfrd)}
        chosen = [r for r in usable if _group_key({"method": r.method, "config": r.config}) in groups]
        ceilings = [r for r in usable if r.method == CEILING_METHOD and teacher_key(r.config) == key[0]]
        same_seed = [r for r in ceilings if r.config.get("seed") == key[1]]
        chosen += (same_seed or ceilings)[:1]
        return [r.run_id for r in chosen]
    return [r.run_id for r in sorted(usable, key=lambda r: labels.is_quick(r.config))[:2]]


def missing_counterparts(selected: Sequence[Any], runs: Sequence[Any]) -> list[tuple[Any, str]]:
    """(source run, method) for each selected FERD/DFRD run whose other method has no run (not failed) on the
    same teacher and seed; one entry per missing (teacher, seed, method)."""
    have = {(r.method, teacher_key(r.config), r.config.get("seed")) for r in runs if r.status != "failed"}
    out: dict[tuple, tuple[Any, str]] = {}
    for r in selected:
        other = PAIRED.get(r.method)
        if other is None:
            continue
        want = (other, teacher_key(r.config), r.config.get("seed"))
        if want not in have:
            out.setdefault(want, (r, other))
    return list(out.values())


def teacher_figure(teacher: Mapping[str, Any], class_names: Sequence[str] | None = None) -> go.Figure:
    """The teacher's per-class clean and PGD accuracy on the real test split (from RunStarted.teacher)."""
    pgd = np.asarray(teacher.get("pgd_per_class") or [], dtype=float)
    clean = np.asarray(teacher.get("clean_per_class") or [], dtype=float)
    if pgd.size == 0:
        raise ValueError("this run's teacher has no per-class PGD accuracy")
    names = list(class_names) if class_names else [str(c) for c in range(len(pgd))]
    worst = int(np.nanargmin(pgd))
    fig = go.Figure()
    if clean.size == pgd.size:
        fig.add_trace(go.Bar(x=names, y=clean * 100, name="clean", marker_color="#9ecae1"))
    fig.add_trace(go.Bar(x=names, y=pgd * 100, name="PGD", marker_color="#08519c",
                         marker_line={"color": ["black" if c == worst else "#08519c" for c in range(len(pgd))],
                                      "width": [3 if c == worst else 0 for c in range(len(pgd))]}))
    fig.add_hline(y=float(np.nanmean(pgd)) * 100, line_dash="dash", annotation_text="mean PGD accuracy")
    fig.update_layout(barmode="group", title="The teacher: robustness per class", xaxis_title="class",
                      yaxis_title="accuracy (%)", yaxis_range=[0, 105], **LAYOUT)
    fig.update_xaxes(type="category")
    return fig


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def attack_strength_table(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Per run: its training attack's success rate and target entropy (last 5 epochs), the untargeted reference's,
    and their ratio, in % (results.json `training_attack`); runs without a distillation epoch are left out."""
    rows = []
    for r in records:
        t = r.get("training_attack") or {}
        if t.get("success_rate") is None:
            continue
        rows.append({"run": run_label(r), "UTAE mode": r["config"].get("utae_mode", ""),
                     "λ_u": r["config"].get("utae_weight"), "attack success": _fmt(t["success_rate"], ".0%"),
                     "untargeted reference": _fmt(t.get("reference_success_rate"), ".0%"),
                     "ratio": _fmt(t.get("strength_ratio"), ".0%"),
                     "target entropy": _fmt(t.get("target_entropy"), ".2f"),
                     "reference entropy": _fmt(t.get("reference_target_entropy"), ".2f")})
    return pd.DataFrame(rows).set_index("run") if rows else pd.DataFrame()
