"""AppTest of the Live and Runs pages and the entry point, with the fake engine (FERD_FAKE_ENGINE)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from ferd.config import Config
from ferd.store import RunStore
from tests.fakes import populate_store

ROOT = Path(__file__).resolve().parent.parent
FORM = "live-(current settings)-ferd"  # widget-key prefix of the config form (given defaults, method ferd)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FERD_HOME", str(tmp_path / "runs"))
    monkeypatch.setenv("FERD_FAKE_ENGINE", "1")
    st.cache_resource.clear()
    yield tmp_path / "runs"
    st.cache_resource.clear()


def app(path: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / path), default_timeout=30)
    at.run()
    assert not at.exception, at.exception
    return at


def wait_for_status(root, status: str, timeout: float = 15.0) -> str:
    store = RunStore(root)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            runs = store.list_runs()
            if runs and runs[0].status == status:
                return runs[0].run_id
            time.sleep(0.05)
    finally:
        store.close()
    raise AssertionError(f"no run reached status {status!r}")


def shrink_run(at: AppTest) -> None:
    at.number_input(key=f"{FORM}-epochs").set_value(3)


def test_live_start_then_charts_appear(home):
    at = app("pages/1_Live.py")
    assert any("No runs yet" in i.value for i in at.info)
    shrink_run(at)
    at.run()
    at.button(key="live-start").click().run()
    assert not at.exception, at.exception
    run_id = wait_for_status(home, "finished")
    at.run()  # run_every never fires under AppTest: rerun the script to poll
    assert not at.exception, at.exception
    assert at.selectbox(key="live-run").value == run_id
    assert len(at.get("plotly_chart")) >= 5
    assert {m.label for m in at.metric} >= {"clean", "PGD-20 mean", "PGD-20 worst class", "PGD-20 NSD"}
    assert not at.error
    assert at.button(key="live-stop").disabled and at.button(key="live-resume").disabled
    slider = at.select_slider(key=f"live-target-epoch-train-{run_id}")
    assert slider.value == 3  # follows the newest epoch
    slider.set_value(1).run()
    assert not at.exception, at.exception
    assert at.select_slider(key=f"live-target-epoch-train-{run_id}").value == 1


def test_live_invalid_input_shows_error_and_disables_start():
    at = app("pages/1_Live.py")
    at.number_input(key=f"{FORM}-c_min").set_value(0.5).run()  # above c_max
    assert not at.exception
    assert any("c_min" in e.value for e in at.error)
    assert at.button(key="live-start").disabled


def test_live_stop_a_running_job(home, monkeypatch):
    monkeypatch.setenv("FERD_FAKE_ENGINE", "0.05")  # a slow fake: about 20 events a second
    at = app("pages/1_Live.py")
    at.button(key="live-start").click().run()
    wait_for_status(home, "running")
    at.run()
    assert not at.button(key="live-stop").disabled
    at.button(key="live-stop").click().run()
    assert not at.exception, at.exception
    wait_for_status(home, "stopped")
    at.run()
    assert any("stopped" in i.value for i in at.info)
    assert not at.button(key="live-resume").disabled


def test_live_shows_a_failed_run_reason(home):
    store = RunStore(home)
    run_id = store.create_run(Config(epochs=2, warmup_epochs=0), status="running")
    from ferd import events as ev

    store.append(run_id, ev.RunFailed(epoch=0, reason="teacher checkpoint has 100 classes, expected 10"))
    store.close()
    at = app("pages/1_Live.py")
    assert any("100 classes" in e.value for e in at.error)


def test_live_opens_on_the_newest_run_and_resumes_the_one_picked(home):
    """Two runs with the same name, method, dataset and seed: the picker must still tell them apart."""
    from ferd import events as ev

    store = RunStore(home)
    cfg = Config(epochs=2, warmup_epochs=0)
    oldest = store.create_run(cfg, status="finished")
    old = store.create_run(cfg, status="running")
    store.append(old, ev.RunFailed(epoch=0, reason="the older run failed"))
    new = store.create_run(cfg, status="running")
    store.append(new, ev.RunStopped(epoch=0, reason="stop requested"))
    at = app("pages/1_Live.py")
    assert at.selectbox(key="live-run").value == new
    at.selectbox(key="live-run").set_value(old).run()
    assert at.selectbox(key="live-run").value == old
    assert any("older run failed" in e.value for e in at.error)
    at.button(key="live-resume").click().run()
    assert not at.exception, at.exception
    deadline = time.monotonic() + 15
    while store.get_run(old).status != "finished" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.get_run(old).status == "finished"
    assert store.get_run(new).status == "stopped" and store.get_run(oldest).status == "finished"
    store.close()


def test_runs_page_lists_runs_with_metrics_and_deletes(home):
    store = RunStore(home)
    ids = populate_store(store, methods=("ferd", "dfrd"), epochs=2)
    store.close()
    at = app("pages/6_Runs.py")
    table = at.dataframe[0].value
    assert set(table["run"]) == set(ids)
    assert table["PGD-20 mean"].notna().all() and table["NSD"].notna().all()
    assert at.json
    victim = at.selectbox(key="runs-pick").value
    at.checkbox(key=f"runs-confirm-{victim}").check().run()
    at.button(key="runs-delete").click().run()
    assert not at.exception, at.exception
    store = RunStore(home)
    assert [r.run_id for r in store.list_runs()] == [i for i in ids if i != victim]
    store.close()


def test_runs_page_refuses_to_delete_a_running_run(home):
    store = RunStore(home)
    run_id = store.create_run(Config(epochs=2, warmup_epochs=0), status="finished")
    at = app("pages/6_Runs.py")  # (the registry marks runs left running by an earlier server as interrupted)
    store.acquire(run_id)  # now running in another writer that holds the run's lease
    store.set_status(run_id, "running")
    at.checkbox(key=f"runs-confirm-{run_id}").check().run()
    at.button(key="runs-delete").click().run()
    assert not at.exception, at.exception
    assert any("running" in e.value for e in at.error)
    assert [r.run_id for r in store.list_runs()] == [run_id]
    store.close()


def test_main_entry_point_runs_the_live_page():
    at = app("app/main.py")
    assert any(t.value == "Live run" for t in at.title)
    assert any("No run in progress" in c.value for c in at.sidebar.caption)


def test_preset_and_method_reset_the_inputs():
    at = app("pages/1_Live.py")
    at.selectbox(key="live-preset").select("smoke").run()
    assert at.number_input(key="live-smoke-ferd-epochs").value == 3
    at.selectbox(key="live-method").select("dfrd").run()
    assert not at.exception, at.exception
    assert at.number_input(key="live-smoke-dfrd-w_uni").value == 0.0
    assert at.selectbox(key="live-smoke-dfrd-utae_mode").value == "untargeted"
    at.selectbox(key="live-method").select("reference-code").run()
    assert not at.exception and not at.error
    assert not at.button(key="live-start").disabled


def test_reweighting_switch_follows_the_method_and_reaches_the_run(home):
    at = app("pages/1_Live.py")
    assert at.checkbox(key=f"{FORM}-reweight").value is True
    at.selectbox(key="live-method").select("dfrd").run()
    assert at.checkbox(key="live-(current settings)-dfrd-reweight").value is False
    at.selectbox(key="live-method").select("ferd").run()
    shrink_run(at)
    at.checkbox(key=f"{FORM}-reweight").uncheck().run()
    at.button(key="live-start").click().run()
    assert not at.exception, at.exception
    run_id = wait_for_status(home, "finished")
    store = RunStore(home)
    try:
        cfg = store.get_run(run_id).config
    finally:
        store.close()
    assert cfg["method"] == "ferd" and cfg["reweight"] is False and cfg["w_uni"] > 0
