"""Runs: the history of every stored run, its config, downloads (metrics, export zip, student, charts) and delete."""

import tempfile
from datetime import datetime
from functools import partial
from pathlib import Path

import pandas as pd
import streamlit as st

from app import frames
from app.export import run_charts_html
from app.png import run_png
from app.state import get_registry, get_store, run_events
from ferd.labels import preset_of, run_label
from ferd.store import RunNotFound, StoreError

registry = get_registry()
store = get_store()

st.title("Runs")
runs = store.list_runs()
if not runs:
    st.info("No stored runs yet. Start one on the Live page.")
    st.stop()

rows = []
for info in runs:
    h = frames.headline(run_events(info.run_id))
    rows.append({"run": info.run_id, "name": info.name, "status": info.status, "preset": preset_of(info.config),
                 "method": info.method, "dataset": info.dataset, "seed": info.seed,
                 "epochs": info.config.get("epochs"),
                 "created": datetime.fromtimestamp(info.created).strftime("%m-%d %H:%M"),
                 "clean": h.get("clean_mean"), "PGD-20 mean": h.get("pgd20_mean"),
                 "PGD-20 worst": h.get("pgd20_worst"), "NSD": h.get("pgd20_nsd")})
# Fits the page at 1400 px without clipping the last column (NSD): metrics in %, the name column only when a
# run has a name, the date without its year.
percent = st.column_config.NumberColumn(format="%.1f%%")
frame = pd.DataFrame(rows)
for column in ("clean", "PGD-20 mean", "PGD-20 worst"):
    frame[column] = pd.to_numeric(frame[column]) * 100
if not frame["name"].astype(bool).any():
    frame = frame.drop(columns="name")
st.dataframe(frame, hide_index=True, width="stretch",
             column_config={"clean": percent, "PGD-20 mean": percent, "PGD-20 worst": percent,
                            "NSD": st.column_config.NumberColumn(format="%.3f")})

infos = {r.run_id: r for r in runs}
run_id = st.selectbox("Run", list(infos), key="runs-pick",
                      format_func=lambda i: run_label(i, infos[i].config, infos[i].name))
info = infos[run_id]
events = run_events(run_id)

config_col, files_col = st.columns([3, 2])
with config_col:
    st.subheader("Config")
    st.json(info.config, expanded=1)
with files_col:
    st.subheader("Downloads")
    st.download_button("Metrics (CSV)", store.metrics_csv(run_id), file_name=f"{run_id}-metrics.csv",
                       mime="text/csv", key="runs-csv")
    # Built on click, like the PNG: the file carries plotly.js inline (about 4.7 MB) so it opens offline.
    st.download_button("Charts (HTML)", partial(run_charts_html, events), file_name=f"{run_id}-charts.html",
                       mime="text/html", key="runs-html")
    # Rendered on click (in a separate thread), not on every rerun of the page.
    st.download_button("Charts (PNG)", partial(run_png, events), file_name=f"{run_id}-charts.png",
                       mime="image/png", key="runs-png")
    if st.button("Prepare export (zip)", key="runs-export"):
        with tempfile.TemporaryDirectory() as tmp:
            st.session_state["runs-export-zip"] = (run_id, store.export_run(run_id, tmp).read_bytes())
    ready = st.session_state.get("runs-export-zip")
    if ready and ready[0] == run_id:
        st.download_button("Download export (zip)", ready[1], file_name=f"{run_id}.zip",
                           mime="application/zip", key="runs-zip")
    student = Path(info.run_dir) / "student.pt"
    if student.is_file():
        st.download_button("Student checkpoint", student.read_bytes(), file_name=f"{run_id}-student.pt",
                           mime="application/octet-stream", key="runs-student")
    else:
        st.caption("No student checkpoint saved for this run.")

st.subheader("Delete")
confirm = st.checkbox(f"Yes, delete run {run_id} and all its files", key=f"runs-confirm-{run_id}")
if st.button("Delete run", disabled=not confirm, key="runs-delete"):
    if registry.is_alive(run_id):
        st.error(f"Run {run_id} is queued or running; stop it on the Live page before deleting it.")
    else:
        try:
            store.delete_run(run_id)
        except (StoreError, RunNotFound) as e:
            st.error(f"Cannot delete {run_id}: {e}")
        else:
            st.session_state.pop("runs-export-zip", None)
            st.toast(f"Deleted {run_id}.")
            st.rerun()
