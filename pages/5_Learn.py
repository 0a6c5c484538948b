"""Learn: a five-step guided tour of robust fairness, each idea drawn from a stored run's own events.

Texts live in assets/learn/*.md; the charts come from the same builders as the Live and Compare pages.
"""

from pathlib import Path

import streamlit as st

from app import reference
from app.analysis import USABLE, compare_figure, compare_frame, default_pair, teacher_figure, teacher_key
from app.charts import losses_chart, synthesis_chart, targets_heatmap, weights_chart
from app.frames import (
    attack_strength_text,
    class_names,
    losses_frame,
    reweighting,
    synthesis_frame,
    target_epochs,
    targets_matrix,
    weights_frame,
)
from app.state import get_pack, get_registry, get_store, run_events
from ferd import events as ev
from ferd.config import ConfigError, load_preset
from ferd.experiments import compare_configs, run_record, training_attack_summary
from ferd.labels import run_label

TEXTS = Path(__file__).resolve().parent.parent / "assets" / "learn"
STEPS = (("1_unequal.md", "Unequal robustness"), ("2_reweighting.md", "Reweighting"), ("3_faes.md", "FAEs"),
         ("4_utaes.md", "UTAEs"), ("5_result.md", "The result"))
QUICK_PRESET = "smoke"

st.title("Learn: robust fairness in data-free distillation")

store = get_store()
src = reference.source([r for r in store.list_runs() if r.status in USABLE], run_events, get_pack())
runs, run_events = src.runs, src.events  # the reference pack's runs while the user has none
if src.pack is not None:
    st.info(reference.caption(src.pack))
if not runs:
    st.info("This tour draws its charts from your own runs, and there is none yet. Start a **FERD** run and a "
            "**DFRD** run with the same preset and seed on the **Live run** page (the `smoke` preset takes "
            "seconds, `digits` a couple of minutes), or queue both here.")
    if st.button("Queue a quick FERD + DFRD pair", icon=":material/play_arrow:"):
        try:
            configs = compare_configs(load_preset(QUICK_PRESET), ["ferd", "dfrd"], [0])
        except ConfigError as e:
            st.error(f"Cannot load the `{QUICK_PRESET}` preset: {e}")
        else:
            ids = [get_registry().submit(cfg, name=f"learn: {cfg.method}") for cfg in configs]
            st.success(f"Queued {len(ids)} runs; come back when they have finished.")
    st.stop()

candidates = [r for r in runs if r.method == "ferd"] or runs
by_id = {r.run_id: r for r in candidates}
pair = default_pair(runs)  # the newest full-preset FERD run with a DFRD partner
ids = list(by_id)
run_id = st.selectbox("Run shown", ids, index=ids.index(pair[0].run_id) if pair else 0,
                      format_func=lambda i: run_label(i, by_id[i].config, by_id[i].name))
run = by_id[run_id]


def partner(method: str, *, same_seed: bool) -> str | None:
    """Newest usable run of `method` on the chosen run's teacher (and seed)."""
    for r in runs:
        if r.method == method and teacher_key(r.config) == teacher_key(run.config) and (
                not same_seed or r.seed == run.seed):
            return r.run_id
    return None


events = run_events(run_id)
names = class_names(events) or None
dfrd_id = partner("dfrd", same_seed=True) if run.method != "dfrd" else None
ceiling_id = partner("real-data", same_seed=True) or partner("real-data", same_seed=False)

if "learn_step" not in st.session_state:
    st.session_state.learn_step = 0


def _move(delta: int) -> None:
    st.session_state.learn_step = min(max(st.session_state.learn_step + delta, 0), len(STEPS) - 1)


step = st.radio("Step", range(len(STEPS)), format_func=lambda i: f"{i + 1}. {STEPS[i][1]}", horizontal=True,
                key="learn_step", label_visibility="collapsed")
st.markdown((TEXTS / STEPS[step][0]).read_text())


def _need_dfrd() -> None:
    st.caption("No DFRD run on this teacher and seed yet: the **Compare** page can launch it "
               "(Launch missing counterpart).")


if step == 0:
    started = next((e for e in events if isinstance(e, ev.RunStarted)), None)
    try:
        st.plotly_chart(teacher_figure(started.teacher if started else {}, names), key="learn-teacher")
    except ValueError as e:
        st.info(f"{e}.")
elif step == 1:
    st.plotly_chart(weights_chart(weights_frame(events), names, reweight=reweighting(events)), key="learn-weights")
elif step == 2:
    st.plotly_chart(synthesis_chart(synthesis_frame(events)), key="learn-synthesis")
    losses = losses_frame(events)
    st.plotly_chart(losses_chart(losses[(losses.phase == "generator") & (losses.name == "uni")]), key="learn-uni")
elif step == 3:
    shown = [(run_id, run.method)] + ([(dfrd_id, "dfrd")] if dfrd_id else [])
    for col, (rid, method) in zip(st.columns(len(shown)), shown, strict=True):
        evs = run_events(rid)
        epochs = target_epochs(evs, "train")
        with col:
            title = f"{method.upper()}: attack targets" + (f", epoch {epochs[-1]}" if epochs else "")
            st.plotly_chart(targets_heatmap(targets_matrix(evs, epochs[-1], "train") if epochs else None, names,
                                            title=title), key=f"learn-targets-{rid}")
            st.markdown(attack_strength_text(method, training_attack_summary(evs)))
    if not dfrd_id:
        _need_dfrd()
else:
    ids = [i for i in (run_id, dfrd_id, ceiling_id) if i]
    records = []
    for rid in ids:
        try:
            rec = run_record(run_events(rid), run_id=rid)
        except ValueError:  # a run that has not started yet has no record
            continue
        if rec["eval"]:
            records.append(rec)
    if not any(r["run_id"] == run_id for r in records):
        st.info("This run has no evaluation yet; the result appears after its first evaluation epoch.")
    else:
        baseline = dfrd_id if any(r["run_id"] == dfrd_id for r in records) else run_id
        frame = compare_frame(records, baseline)
        attack = "pgd20" if "pgd20" in set(frame["attack"]) else frame["attack"].iloc[0]
        st.plotly_chart(compare_figure(frame, attack), key="learn-result")
        if not dfrd_id:
            _need_dfrd()

prev_col, next_col = st.columns(2)
prev_col.button("← Previous", on_click=_move, args=(-1,), disabled=step == 0, key="learn-prev")
next_col.button("Next →", on_click=_move, args=(1,), disabled=step == len(STEPS) - 1, key="learn-next")
