"""Ablation: sweep one numeric config field over a grid of values × seeds, queue the runs, plot worst-class
robustness and NSD against the value as the runs finish.

Every knob is a slider. The results shown are those of the grid the form describes: stored runs are matched to
its points by config (app.ablation.match_grid), so a reload (form back at its defaults) never shows another
grid's runs, and progress survives a reload and shows in every tab.
"""

import streamlit as st

from app import reference
from app.ablation import SWEEPABLE, between, candidate_values, is_int, label, match_grid, unqueued
from app.analysis import ablation_figure
from app.state import get_pack, get_registry, get_store, run_events
from ferd.config import Config, ConfigError, load_preset, preset_names
from ferd.experiments import ablation_configs, ablation_table, markdown_ablation_table, run_record

DEFAULT_PARAM = "w_uni"
DEFAULT_PRESET = "digits"
MAX_EPOCHS = 200
MAX_SEEDS = 5
DONE = ("finished",)
ENDED = ("finished", "stopped", "failed", "interrupted")


def run_name(param: str, value: float, seed: int) -> str:
    return f"ablate {param}={value:g} seed {seed}"


def _stop(v: float, param: str) -> str:
    return f"{int(v)}" if is_int(param) else f"{v:g}"


st.title("Ablation")
st.caption("Queue a grid of runs that differ in one setting, then watch worst-class PGD-20 accuracy and NSD "
           "change with it. Runs go through the job queue, as many at once as there are workers.")

presets = preset_names() or ["(defaults)"]
left, right = st.columns(2)
with left:
    preset = st.selectbox("Base preset", presets,
                          index=presets.index(DEFAULT_PRESET) if DEFAULT_PRESET in presets else 0)
    param = st.selectbox("Parameter", SWEEPABLE, index=SWEEPABLE.index(DEFAULT_PARAM), format_func=label,
                         help="Any numeric config field; the slider below picks its values.")
try:
    base = load_preset(preset) if preset in preset_names() else Config()
except ConfigError as e:
    st.error(f"Preset {preset!r}: {e}")
    st.stop()
with right:
    if param != "epochs":
        epochs = st.slider("Epochs per run", 1, max(MAX_EPOCHS, base.epochs), base.epochs,
                           key=f"ablate-epochs-{preset}")
    seeds = st.slider("Seeds per value", 1, MAX_SEEDS, 1, key="ablate-seeds",
                      help="Each value runs with seeds 0 … n−1; the figure shows mean ± std over them.")

stops = candidate_values(param, float(getattr(base, param)))
at_base = stops.index(float(getattr(base, param)))
low, high = st.select_slider(f"Values of {label(param)}", options=stops,
                             value=(stops[0], stops[min(at_base + 1, len(stops) - 1)]),
                             format_func=lambda v: _stop(v, param), key=f"ablate-values-{preset}-{param}",
                             help="The grid runs every stop from the left handle to the right one.")
values = between(stops, low, high)

try:
    grid_base = base if param == "epochs" else base.replace(epochs=epochs)
    configs = ablation_configs(grid_base, param, values, list(range(seeds)))
except ConfigError as e:
    st.error(str(e))
    configs = []

if configs:
    each = "" if param == "epochs" else f", {configs[0].epochs} epochs each"
    st.caption(f"{len(configs)} run(s): {param} ∈ {{{', '.join(_stop(v, param) for v in values)}}} × seeds "
               f"0–{seeds - 1}{each}, on `{preset}` ({base.method}, {base.dataset}).")
if st.button("Queue grid", type="primary", disabled=not configs, icon=":material/playlist_add:"):
    registry = get_registry()
    todo = unqueued(configs, get_store().list_runs())
    ids = [registry.submit(cfg, name=run_name(param, float(getattr(cfg, param)), cfg.seed)) for cfg in todo]
    skipped = len(configs) - len(ids)
    st.success(f"Queued {len(ids)} run(s)." + (f" Skipped {skipped} already in the grid." if skipped else ""))


@st.fragment(run_every=2.0)
def grid_progress(configs: list[Config], param: str, method: str) -> None:
    """Progress of the grid `configs` (runs matched by config) and the figure + table from its finished runs."""
    runs = match_grid(configs, get_store().list_runs())
    if not runs:
        st.info("No runs of this grid yet: choose its values and press **Queue grid**.")
        return
    ended = sum(r.status in ENDED for r in runs)
    st.progress(min(ended / len(configs), 1.0),
                text=f"{ended} of {len(configs)} runs of this grid ended "
                     f"({sum(r.status == 'running' for r in runs)} running, "
                     f"{sum(r.status == 'queued' for r in runs)} queued)")
    failed = [r.name or r.run_id for r in runs if r.status in ("failed", "interrupted")]
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
    st.plotly_chart(ablation_figure(table, param, method=method), key=f"ablation-{param}")
    st.markdown(markdown_ablation_table(table, param))


st.subheader(f"Grid over {label(param)}")
if configs:
    grid_progress(configs, param, base.method)

pack = get_pack()
if pack is not None:
    reference.ablation_panel(pack, param, lambda cfg, name: get_registry().submit(cfg, name=name))
