"""AppTest of the Compare, Samples, Ablation and Learn pages on a temporary store filled by the fake engine."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from ferd.store import RunStore
from tests.fakes import populate_store
from tests.test_embedding import _FakeUMAP

PAGES = Path(__file__).resolve().parent.parent / "pages"


@pytest.fixture(autouse=True)
def app_env(tmp_path, monkeypatch):
    """A fresh store under a temp FERD_HOME, the instant fake engine, a stand-in for umap, clean caches."""
    monkeypatch.setenv("FERD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FERD_FAKE_ENGINE", "1")
    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=_FakeUMAP))
    monkeypatch.setenv("FERD_UMAP_PROCESS", "0")  # the stand-in lives in this process
    st.cache_resource.clear()
    yield tmp_path / "home"
    st.cache_resource.clear()


def page(name: str) -> AppTest:
    return AppTest.from_file(str(PAGES / name), default_timeout=30)


def wait_ended(store: RunStore, count: int, timeout: float = 20.0) -> list:
    """The store's runs once `count` of them exist and none is queued or running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = store.list_runs()
        if len(runs) >= count and all(r.status not in ("queued", "running") for r in runs):
            return runs
        time.sleep(0.1)
    raise AssertionError(f"runs did not end: {[(r.name, r.status) for r in store.list_runs()]}")


def texts(elements) -> str:
    return " ".join(str(e.value) for e in elements)


# ---- Compare ----
def test_compare_empty_store_says_how_to_start():
    at = page("2_Compare.py").run()
    assert not at.exception
    assert "No runs to compare" in texts(at.info)


def test_compare_renders_ferd_dfrd_ceiling_with_seeds(app_env):
    store = RunStore(app_env)
    populate_store(store, methods=("ferd", "dfrd", "real-data"), seeds=(0, 1))
    at = page("2_Compare.py").run()
    assert not at.exception and not at.error
    chosen = sorted(store.get_run(i).method for i in at.multiselect[0].value)
    assert chosen == ["dfrd", "dfrd", "ferd", "ferd", "real-data"]  # both seeds of each method + one ceiling
    assert at.toggle[0].value  # several seeds: pooled by default
    assert len(at.tabs) == 5 and at.tabs[0].label == "pgd20"
    assert len(at.get("plotly_chart")) == 5
    summary = at.dataframe[0].value
    assert set(summary.index.get_level_values("run")) == {"ferd", "dfrd", "real-data"}
    assert "±" in summary.loc[("ferd", "pgd20"), "worst class"]
    assert not any(b.label == "Launch missing counterpart" for b in at.button)


def test_compare_launches_missing_counterpart(app_env):
    store = RunStore(app_env)
    (ferd_id,) = populate_store(store, methods=("ferd",), seeds=(3,))
    at = page("2_Compare.py").run()
    assert not at.exception
    assert "DFRD for seed 3" in texts(at.caption)
    next(b for b in at.button if b.label == "Launch missing counterpart").click().run()
    assert not at.exception and "Queued 1 run" in texts(at.success)
    runs = wait_ended(store, 2)
    dfrd = next(r for r in runs if r.run_id != ferd_id)
    ferd = store.get_run(ferd_id)
    assert dfrd.method == "dfrd" and dfrd.seed == 3
    assert {k: dfrd.config[k] for k in ("dataset", "teacher_arch", "teacher_epochs", "teacher_checkpoint")} == \
           {k: ferd.config[k] for k in ("dataset", "teacher_arch", "teacher_epochs", "teacher_checkpoint")}
    assert dfrd.config["w_uni"] == 0.0


# ---- Samples ----
def test_samples_empty_store():
    at = page("3_Samples.py").run()
    assert not at.exception and "No synthesised samples" in texts(at.info)


def test_samples_gallery_and_map(app_env):
    populate_store(RunStore(app_env), methods=("ferd", "dfrd"), seeds=(0,))
    at = page("3_Samples.py").run()
    assert not at.exception and not at.error
    assert len(at.multiselect[0].value) == 2
    assert at.select_slider[0].value == 3
    assert len(at.get("image")) == 2  # one gallery per run
    assert len(at.get("plotly_chart")) == 1
    assert "PCA" in texts(at.caption) or "UMAP" in texts(at.caption)
    deadline = time.time() + 10
    while "UMAP of the samples" not in texts(at.caption) and time.time() < deadline:
        time.sleep(0.1)
        at.run()
    assert "UMAP of the samples" in texts(at.caption)  # warm-up done: the map switches from PCA to UMAP
    at.select_slider[0].set_value(1).run()
    assert not at.exception and "epoch 1" in texts(at.subheader)


# ---- Ablation ----
def test_ablation_sliders_queue_a_grid_and_plot_it(app_env):
    store = RunStore(app_env)
    at = page("4_Ablation.py").run()
    assert not at.exception
    assert at.selectbox[1].value == "w_uni" and not at.text_input  # every numeric knob is a slider
    assert [s.label for s in at.slider] == ["Epochs per run", "Seeds per value"]
    assert at.select_slider[0].value == (0.0, 10.0)
    assert "No runs of this grid yet" in texts(at.info)
    at.slider[0].set_value(3).run()
    at.select_slider[0].set_value((0.0, 0.5)).run()
    assert "2 run(s): w_uni ∈ {0, 0.5} × seeds 0–0, 3 epochs each" in texts(at.caption)
    at.button[0].click().run()
    assert not at.exception and "Queued 2 run(s)" in texts(at.success)
    runs = wait_ended(store, 2)
    assert sorted(r.name for r in runs) == ["ablate w_uni=0 seed 0", "ablate w_uni=0.5 seed 0"]
    assert sorted((r.config["w_uni"], r.config["epochs"]) for r in runs) == [(0.0, 3), (0.5, 3)]
    at.run()
    assert not at.exception
    assert len(at.get("plotly_chart")) == 1
    assert "| w_uni | n |" in texts(at.markdown)
    at.select_slider[0].set_value((0.0, 1.0)).run()
    at.button[0].click().run()
    assert "Queued 1 run(s). Skipped 2 already in the grid." in texts(at.success)
    assert len(wait_ended(store, 3)) == 3


def test_ablation_after_a_reload_shows_the_grid_of_the_form_not_the_last_one_queued(app_env):
    store = RunStore(app_env)
    at = page("4_Ablation.py").run()
    at.slider[0].set_value(3).run()
    at.select_slider[0].set_value((0.0, 0.5)).run()
    at.button[0].click().run()
    wait_ended(store, 2)
    reloaded = page("4_Ablation.py").run()  # a new session: the form is back at its defaults (30 epochs)
    assert not reloaded.exception
    assert "No runs of this grid yet" in texts(reloaded.info) and not reloaded.get("plotly_chart")
    reloaded.slider[0].set_value(3).run()  # the same grid as queued: its runs (a subset of it) show
    assert "2 of 6 runs of this grid ended" in " ".join(str(p.proto.text) for p in reloaded.get("progress"))
    assert len(reloaded.get("plotly_chart")) == 1


def test_ablation_sweeps_lambda_u_and_w_bn_and_epochs(app_env):
    at = page("4_Ablation.py").run()
    for param, shown in (("utae_weight", "λ_u"), ("w_bn", "w_bn")):
        at.selectbox[1].set_value(param).run()
        assert not at.exception and shown in at.subheader[0].value
        low, high = at.select_slider[0].options[0], at.select_slider[0].options[-1]
        assert float(low) == 0.0 and float(high) >= 10.0
    at.selectbox[1].set_value("epochs").run()
    assert [s.label for s in at.slider] == ["Seeds per value"]  # the grid itself sets the epochs
    assert not at.exception and at.button[0].disabled is False


# ---- Learn ----
def test_learn_empty_store_offers_a_quick_pair(app_env):
    at = page("5_Learn.py").run()
    assert not at.exception and "there is none yet" in texts(at.info)
    at.button[0].click().run()
    assert not at.exception and "Queued 2 runs" in texts(at.success)
    runs = wait_ended(RunStore(app_env), 2)
    assert sorted(r.method for r in runs) == ["dfrd", "ferd"]


def test_learn_walks_five_steps_with_charts(app_env):
    populate_store(RunStore(app_env), methods=("ferd", "dfrd", "real-data"), seeds=(0,))
    at = page("5_Learn.py").run()
    headings = []
    for step in range(5):
        assert not at.exception and not at.error, step
        assert at.radio[0].value == step
        assert len(at.get("plotly_chart")) >= 1
        headings.append(at.markdown[0].value.splitlines()[0])
        if step < 4:
            at.button(key="learn-next").click().run()
    assert headings[0].startswith("### 1") and headings[4].startswith("### 5")
    assert len(at.get("plotly_chart")) == 1  # the result: FERD vs DFRD vs ceiling in one figure
    assert at.button(key="learn-next").disabled
