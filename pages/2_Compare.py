"""Compare: per-class robust accuracy of two or more stored runs side by side (FERD vs DFRD by default)."""

import streamlit as st

from app import reference
from app.analysis import (
    CEILING_METHOD,
    USABLE,
    attack_strength_table,
    compare_figure,
    compare_frame,
    counterpart_config,
    default_selection,
    format_summary,
    missing_counterparts,
    run_label,
    summary_table,
)
from app.state import get_pack, get_registry, get_store, run_events
from ferd import labels
from ferd.config import ConfigError
from ferd.experiments import ATTACK_ORDER, run_record

st.title("Compare runs")
st.caption("Per-class accuracy under each attack, deltas against a pinned baseline, the worst class outlined; "
           "runs that differ only by seed are pooled into mean ± std.")

store = get_store()
src = reference.source([r for r in store.list_runs() if r.status in (*USABLE, "failed")], run_events, get_pack())
runs, run_events = src.runs, src.events  # the reference pack's runs while the user has none
if src.pack is not None:
    st.info(reference.caption(src.pack))
if not runs:
    st.info("No runs to compare yet. Start a **FERD** run and a **DFRD** run (same preset and seed) on the "
            "**Live run** page; the `smoke` preset finishes in seconds.")
    st.stop()

by_id = {r.run_id: r for r in runs}


def _describe(run_id: str) -> str:
    r = by_id[run_id]
    return f"{labels.run_label(run_id, r.config, r.name)} · {r.status}"


selected_ids = st.multiselect("Runs", list(by_id), default=default_selection(runs), format_func=_describe,
                              help="Pick two or more runs; real-data runs are drawn as the ceiling.")
if not selected_ids:
    st.info("Pick at least one run.")
    st.stop()

records, no_results = [], []
for run_id in selected_ids:
    try:
        rec = run_record(run_events(run_id), run_id=run_id)
    except ValueError:
        rec = None
    if rec is None or not rec["eval"]:
        no_results.append(run_id)
    else:
        records.append(rec)
if no_results:
    st.warning("No evaluation yet for: " + ", ".join(_describe(i) for i in no_results))

selected = [by_id[i] for i in selected_ids]
missing = missing_counterparts(selected, runs)
if missing:
    wanted = ", ".join(f"{method.upper()} for seed {src.seed} ({src.dataset})" for src, method in missing)
    st.caption(f"Missing counterpart (same teacher and seed): {wanted}.")
    if st.button("Launch missing counterpart", icon=":material/add_task:"):
        registry = get_registry()
        try:
            launched = [registry.submit(counterpart_config(src.config, method),
                                        name=f"{method} counterpart of {src.name or src.run_id}")
                        for src, method in missing]
        except ConfigError as e:
            st.error(f"Cannot build the counterpart config: {e}")
        else:
            st.success(f"Queued {len(launched)} run(s): {', '.join(launched)}. Follow them on the Live run page.")

if not records:
    st.stop()

record_ids = [r["run_id"] for r in records]
candidates = [r for r in records if r["method"] != CEILING_METHOD] or records
default_base = next((i for i, r in enumerate(candidates) if r["method"] == "dfrd"), 0)
baseline_id = st.selectbox("Baseline (deltas are against this run)", [r["run_id"] for r in candidates],
                           index=default_base, format_func=lambda i: run_label(next(r for r in records
                                                                                    if r["run_id"] == i)))
try:
    frame = compare_frame(records, baseline_id)
except ValueError as e:
    st.error(str(e))
    st.stop()

several_seeds = bool((frame["group_n"] > 1).any())
pooled = st.toggle("Pool seeds (mean ± std)", value=several_seeds, disabled=not several_seeds,
                   help="Runs with the same method and config apart from the seed form one group.")
attacks = [a for a in ATTACK_ORDER if a in set(frame["attack"])]
default_tab = attacks.index("pgd20") if "pgd20" in attacks else 0
ordered = attacks[default_tab:] + attacks[:default_tab]
for tab, attack in zip(st.tabs(ordered), ordered, strict=True):
    with tab:
        st.plotly_chart(compare_figure(frame, attack, by_group=pooled), key=f"compare-{attack}")

st.subheader("Summary")
st.caption("Mean and worst-class accuracy (%), NSD = std / mean over classes (lower is fairer).")
st.dataframe(format_summary(summary_table(records, by_group=pooled)), width="stretch")

strength = attack_strength_table(records)
if not strength.empty:
    st.subheader("Training-attack strength")
    st.caption("Last 5 epochs: share of the training attack's adversarial examples the student assigns to a class "
               "other than the attacked label, beside an untargeted KL-PGD on the same batches; target entropy 1 = "
               "each class pushed evenly to all others. Under half the reference, the student trains on nearly "
               "clean inputs.")
    st.dataframe(strength, width="stretch")
