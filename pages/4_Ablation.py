"""Ablation: sweep one numeric config field over a grid of values × seeds, queue the runs, plot worst-class
robustness and NSD against the value as the runs finish.

A grid's runs are found again by name ("ablate <param>=<value> seed <s>"), so progress survives a reload
and shows in every tab.
"""

import dataclasses

import streamlit as st

from app.analysis import ablation_figure
from app.state import get_registry, get_store, run_events
from ferd.config import Config, ConfigError, load_preset, preset_names
from ferd.experiments import ablation_configs, ablation_table, markdown_ablation_table, run_record

NUMERIC_FIELDS = sorted(f.name for f in dataclasses.fields(Config) if f.type in ("int", "float") and f.name != "seed")
DEFAULT_PARAM = "w_uni"
DEFAULT_PRESET = "digits"
DONE = ("finished",)
ENDED = ("finished", "stopped", "failed", "interrupted")


def parse_numbers(text: str, what: str) -> list[float]:
    """Comma- or space-separated numbers; ConfigError naming `what` on anything else."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        values = [float(p) for p in parts]
    except ValueError as e:
        raise ConfigError(f"{what}: expected numbers separated by commas, got {text!r}") from e
    if not values:
        raise ConfigError(f"{what}: give at least one number")
    return list(dict.fromkeys(values))


def grid_prefix(param: str) -> str:
    return f"ablate {param}="


def run_name(param: str, value: float, seed: int) -> str:
    return f"{grid_prefix(param)}{value:g} seed {seed}"


st.title("Ablation")
st.caption("Queue a grid of runs that differ in one setting, then watch worst-class PGD-20 accuracy and NSD "
           "change with it. Runs go through the job queue one at a time.")

presets = preset_names() or ["(defaults)"]
left, right = st.columns(2)
with left:
    preset = st.selectbox("Base preset", presets,
                          index=presets.index(DEFAULT_PRESET) if DEFAULT_PRESET in presets else 0)
    param = st.selectbox("Parameter", NUMERIC_FIELDS, index=NUMERIC_FIELDS.index(DEFAULT_PARAM))
with right:
    values_text = st.text_input("Values", "0, 1, 2, 5, 10", help="Comma-separated values of the parameter.")
    seeds_text = st.text_input("Seeds", "0", help="Comma-separated seeds; each value runs once per seed.")

try:
    base = load_preset(preset) if preset in preset_names() else Config()
    values = parse_numbers(values_text, "values")
    seeds = [int(s) for s in parse_numbers(seeds_text, "seeds")]
    configs = ablation_configs(base, param, values, seeds)
except ConfigError as e:
    st.error(str(e))
    configs = []

if configs:
    st.caption(f"{len(configs)} run(s) of {base.epochs} epochs each on `{preset}` ({base.method}, {base.dataset}).")
if st.button("Queue grid", type="primary", disabled=not configs, icon=":material/playlist_add:"):
    registry = get_registry()
    existing = {r.name for r in get_store().list_runs() if r.status != "failed"}
    named = [(cfg, run_name(param, float(getattr(cfg, param)), cfg.seed)) for cfg in configs]
    ids = [registry.submit(cfg, name=name) for cfg, name in named if name not in existing]
    skipped = len(named) - len(ids)
    st.success(f"Queued {len(ids)} run(s)." + (f" Skipped {skipped} already in the grid." if skipped else ""))


@st.fragment(run_every=2.0)
def grid_progress(param: str) -> None:
    """Progress of the grid over `param` and the figure + table from its finished runs."""
    runs = [r for r in get_store().list_runs() if r.name.startswith(grid_prefix(param))]
    if not runs:
        st.info(f"No ablation runs over `{param}` yet: choose values and press **Queue grid**.")
        return
    ended = sum(r.status in ENDED for r in runs)
    st.progress(ended / len(runs), text=f"{ended} of {len(runs)} runs over {param} ended "
                                        f"({sum(r.status == 'running' for r in runs)} running, "
                                        f"{sum(r.status == 'queued' for r in runs)} queued)")
    failed = [r.name for r in runs if r.status in ("failed", "interrupted")]
    if failed:
        st.warning("Not finished (failed or interrupted): " + ", ".join(failed))
    records = []
    for r in runs:
        if r.status in DONE:
            try:
                records.append(run_record(run_events(r.run_id), run_id=r.run_id))
            except ValueError:
                continue
    table = ablation_table(records, param)
    if table.empty:
        st.caption("The figure appears when the first run of the grid has finished.")
        return
    st.plotly_chart(ablation_figure(table, param), key=f"ablation-{param}")
    st.markdown(markdown_ablation_table(table, param))


st.subheader(f"Grid over {param}")
grid_progress(param)
