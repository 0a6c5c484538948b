"""Samples: the synthesised images by class and epoch, and a 2-D map of their teacher features.

The gallery and the interactive map stay outside any fragment (media references are not released on fragment
reruns, and a rerun every few seconds would reset the lasso selection). Only while UMAP warms up does a small
fragment poll the service, and it reruns the page once when UMAP is ready, so the map replaces PCA by itself.
"""

import numpy as np
import streamlit as st

from app.analysis import USABLE, default_selection
from app.embedding import PCA, collect_samples, embedding_figure, upscale_nearest
from app.frames import class_names
from app.state import get_store, get_umap_service, run_events
from ferd.labels import run_label

UMAP_POLL_S = 1.0
PIXELATED_CSS = '[data-testid="stImage"] img { image-rendering: pixelated; }'

st.title("Synthesised samples")
st.html(f"<style>{PIXELATED_CSS}</style>")
store = get_store()
runs = [r for r in store.list_runs() if r.status in USABLE and r.method in ("ferd", "dfrd")]
if not runs:
    st.info("No synthesised samples yet. Start a **FERD** run (and a **DFRD** run to contrast) on the "
            "**Live run** page; samples appear after the first epoch.")
    st.stop()

by_id = {r.run_id: r for r in runs}
chosen = st.multiselect("Runs", list(by_id), default=default_selection(runs),
                        format_func=lambda i: run_label(i, by_id[i].config, by_id[i].name))
if not chosen:
    st.info("Pick at least one run.")
    st.stop()
if st.button("Refresh", icon=":material/refresh:", help="Load samples from epochs finished since"):
    st.rerun()

events = {i: run_events(i) for i in chosen}
try:
    samples = collect_samples([(i, by_id[i].method, events[i]) for i in chosen])
except ValueError as e:
    st.error(str(e))
    st.stop()
if samples.table.empty:
    st.info("The chosen runs have no synthesised samples yet (the real-data method synthesises none).")
    st.stop()

names = next((class_names(events[i]) for i in chosen if class_names(events[i])), [])
epochs = sorted(samples.table["epoch"].unique().tolist())
epoch = (st.select_slider("Epoch", options=epochs, value=epochs[-1]) if len(epochs) > 1 else epochs[0])
all_classes = sorted(samples.table["cls"].unique().tolist())
shown_classes = st.multiselect("Classes", all_classes, default=all_classes,
                               format_func=lambda c: names[c] if c < len(names) else str(c))


@st.fragment(run_every=UMAP_POLL_S)
def wait_for_umap(service) -> None:
    """Polls until the UMAP service is warm (or has failed), then reruns the page to draw the UMAP map."""
    if service.ready or service.error:
        st.rerun()


def _class_name(c: int) -> str:
    return names[c] if c < len(names) else str(c)


def _gallery(rows) -> None:
    if rows.empty:
        st.caption("No samples.")
        return
    thumbs = upscale_nearest(samples.images[rows["id"].to_numpy()])
    # Shown at exactly the upscaled width (no browser resampling of it), and pixelated if the screen scales it.
    st.image(list(thumbs), width=int(thumbs.shape[2]),
             caption=[f"{_class_name(c)} → {_class_name(p)}" for c, p in zip(rows["cls"], rows["pred"], strict=True)])


st.subheader(f"Gallery, epoch {epoch}")
st.caption("Caption: sampled class → teacher's prediction. Thumbnails upscaled with nearest-neighbour.")
columns = st.columns(len(chosen))
for col, run_id in zip(columns, chosen, strict=True):
    with col:
        st.markdown(f"**{by_id[run_id].method.upper()}** · seed {by_id[run_id].seed}")
        t = samples.table
        _gallery(t[(t.run_id == run_id) & (t.epoch == epoch) & t.cls.isin(shown_classes)].sort_values("cls"))

st.subheader("Teacher features, 2-D map")
# Later epochs of a live run append to the map only while every chosen run has reached them.
last_common = min(int(samples.table.loc[samples.table.run_id == i, "epoch"].max()) for i in chosen
                  if (samples.table.run_id == i).any())
upto = min(epoch, last_common)
sub = samples.table[samples.table.epoch <= upto]
service = get_umap_service()
coords, method = service.embed(samples.features[sub["id"].to_numpy()], key=tuple(chosen))
if method == PCA:
    st.caption(f"PCA of the samples of epochs ≤ {upto}. " + (
        service.error or ("UMAP is warming up; the map switches to UMAP by itself when it is ready."
                          if len(sub) >= service.min_samples else "Too few samples for UMAP yet.")))
    if not service.error and not service.ready and len(sub) >= service.min_samples:
        wait_for_umap(service)
else:
    st.caption(f"UMAP of the samples of epochs ≤ {upto}; later samples are projected into the fitted map.")
visible = sub["cls"].isin(shown_classes).to_numpy()
fig = embedding_figure(coords[visible], sub["cls"].to_numpy()[visible], sub["method"].to_numpy()[visible],
                       sub["id"].to_numpy()[visible], class_names=names or None)
state = st.plotly_chart(fig, on_select="rerun", selection_mode=("points", "lasso", "box"), key="samples-map")

points = state.selection.points if state and state.selection else []
picked = []
for p in points:
    v = p.get("customdata")
    v = v[0] if isinstance(v, list) else v
    if v is not None:
        picked.append(int(v))
if picked:
    st.subheader(f"Selected samples ({len(picked)})")
    _gallery(samples.table.iloc[np.asarray(picked[:200])])
else:
    st.caption("Lasso or box-select points on the map to see their images here.")
