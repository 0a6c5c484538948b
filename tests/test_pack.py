"""The reference pack: what it runs, its engine version, a tiny pack built on `smoke` (compact, answers the
pages on an empty store, reproducible), and the bundled pack when there is one."""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from ferd import engine, pack, version
from ferd.config import from_dict, load_preset
from ferd.events import Evaluated
from ferd.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "assets" / "reference"
MAX_BYTES = 20 * 2**20


def test_plan_runs_methods_by_seeds_and_two_sweeps_at_most_25():
    p = pack.plan("digits", [0, 1, 2])
    assert len(p.configs) == len(set(p.configs)) <= pack.MAX_RUNS
    compare = [c for c, role in zip(p.configs, p.roles, strict=True) if role == "compare"]
    assert sorted((c.method, c.seed) for c in compare) == sorted(
        (m, s) for m in ("ferd", "dfrd", "real-data") for s in (0, 1, 2))
    for field, values in (("w_uni", pack.W_UNI_VALUES), ("utae_weight", pack.UTAE_WEIGHT_VALUES)):
        swept = {c.seed for c, role in zip(p.configs, p.roles, strict=True) if role == field}
        assert swept == {0}
        # Every value is in the pack once: a sweep point equal to the seed-0 FERD run is that run.
        ferd0 = [c for c in p.configs if c.method == "ferd" and c.seed == 0 and all(
            getattr(c, f) == getattr(load_preset("digits"), f) for f in ("w_uni", "utae_weight") if f != field)]
        assert sorted({getattr(c, field) for c in ferd0}) == sorted(values)
    assert all(c.preset == "digits" for c in p.configs)
    with pytest.raises(ValueError, match="at most 25"):
        pack.plan("digits", list(range(10)))


def test_engine_version_follows_result_sources_only(tmp_path):
    src = tmp_path / "ferd"
    shutil.copytree(pack.ENGINE_DIR, src, ignore=shutil.ignore_patterns("__pycache__"))
    v = version.source_version(src)
    assert version.source_version(pack.ENGINE_DIR) == version.engine_version()
    (src / "cli.py").write_text((src / "cli.py").read_text() + "\n# a comment\n")
    assert version.source_version(src) == v
    (src / "synthesis.py").write_text((src / "synthesis.py").read_text() + "\n# a comment\n")
    assert version.source_version(src) != v


def _final(events):
    return [e for e in events if isinstance(e, Evaluated)][-1]


def _pages_answer_from(pack_dir: Path, home: Path, monkeypatch) -> None:
    """Learn's result step, Compare and Ablation draw charts from the pack on an empty store."""
    monkeypatch.setenv("FERD_HOME", str(home))
    monkeypatch.setenv("FERD_PACK_DIR", str(pack_dir))
    monkeypatch.setenv("FERD_FAKE_ENGINE", "1")
    st.cache_resource.clear()
    try:
        for page in ("pages/2_Compare.py", "pages/5_Learn.py", "pages/4_Ablation.py"):
            at = AppTest.from_file(str(ROOT / page), default_timeout=60)
            if page.endswith("Learn.py"):
                at.session_state["learn_step"] = 4  # the result
            at.run()
            assert not at.exception, (page, at.exception)
            assert any("reference" in i.value for i in [*at.info, *at.caption]), page
            assert at.get("plotly_chart"), f"{page} drew no chart from the pack"
    finally:
        st.cache_resource.clear()


@pytest.mark.slow
def test_a_tiny_pack_is_compact_answers_the_pages_and_rebuilds_identically(tmp_path, monkeypatch):
    plan = pack.plan("smoke", [0], w_uni=[0.0], utae_weight=[1.0], num_threads=1)
    with RunStore(tmp_path / "store") as store:
        manifest_path = pack.build(tmp_path / "pack", plan, command="test", store=store)
        # A second build reuses every finished run of the store: nothing runs again, the same runs are packed.
        def no_runs(configs, names):
            raise AssertionError(f"ran again: {names}")

        again = json.loads(pack.build(tmp_path / "pack2", plan, command="again", store=store,
                                      run_configs=no_runs).read_text())
        store.create_run(load_preset("smoke"), name="not in the pack", status="finished")
        monkeypatch.setattr(pack, "engine_version", lambda: "another")  # runs of another engine are not reused
        assert pack.reusable_runs(store, plan.configs) == {}
        monkeypatch.undo()
    first = json.loads(manifest_path.read_text())
    assert not any(r["reused"] for r in first["runs"]) and all(r["reused"] for r in again["runs"])
    assert [r["run_id"] for r in again["runs"]] == [r["run_id"] for r in first["runs"]]
    size = sum(f.stat().st_size for f in (tmp_path / "pack").iterdir())
    assert size <= MAX_BYTES
    opened = pack.open_pack(tmp_path / "pack", tmp_path / "view")
    m = opened.manifest
    assert manifest_path.name == pack.MANIFEST and not opened.stale
    assert {"commit", "command", "machine", "date", "engine_version"} <= set(m)
    assert [r["role"] for r in m["runs"]].count("compare") == 3 and len(m["runs"]) == 5
    events = {r["run_id"]: [e for _, e in opened.store.events(r["run_id"])] for r in m["runs"]}
    for evs in events.values():
        kinds = [e.kind for e in evs]
        assert "stage_progress" not in kinds and kinds[-1] == "run_finished"
        assert all(e.step == e.total_steps for e in evs if e.kind in ("generator_progress", "student_progress"))
    _pages_answer_from(tmp_path / "pack", tmp_path / "home", monkeypatch)

    # One entry rebuilt from its manifest config gives the same per-class counts.
    entry = next(r for r in m["runs"] if r["role"] == "w_uni")
    rebuilt = _final(list(engine.run(from_dict(entry["config"]))))
    stored = _final(events[entry["run_id"]])
    assert stored.correct.keys() == rebuilt.correct.keys()
    for attack, counts in stored.correct.items():
        np.testing.assert_array_equal(counts, rebuilt.correct[attack], err_msg=attack)


@pytest.mark.skipif(not (BUNDLED / pack.MANIFEST).is_file(), reason="no bundled pack in assets/reference")
def test_the_bundled_pack_loads_and_answers_the_pages(tmp_path, monkeypatch):
    opened = pack.open_pack(BUNDLED, tmp_path / "view")
    assert len(opened.manifest["runs"]) <= pack.MAX_RUNS
    assert sum(f.stat().st_size for f in BUNDLED.iterdir() if f.is_file()) <= MAX_BYTES
    assert {r["run_id"] for r in opened.manifest["runs"]} == {r.run_id for r in opened.store.list_runs()}
    _pages_answer_from(BUNDLED, tmp_path / "home", monkeypatch)


def test_a_pack_opened_without_a_workdir_removes_its_copy_when_dropped(tmp_path, monkeypatch):
    root = tmp_path / "pack"
    RunStore(root).close()
    (root / pack.MANIFEST).write_text("{}")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    opened = pack.open_pack(root)
    (view,) = (tmp_path / "tmp").glob("ferd-pack-view-*")
    assert (view / "runs.db").is_file() and opened.store.list_runs() == []
    opened.store.close()
    del opened
    gc.collect()
    assert not view.exists()
