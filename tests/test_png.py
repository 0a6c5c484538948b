"""The Runs page's PNG export: valid PNG bytes for a whole fake run, a run without evaluation, and no events."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from app.png import run_png
from ferd import events as ev
from ferd.config import Config
from ferd.store import RunStore
from tests.fakes import fake_run, populate_store

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _decode(data: bytes) -> np.ndarray:
    """The decoded image as an (H, W, channels) array (PIL when installed, else matplotlib's reader)."""
    assert data.startswith(PNG_MAGIC)
    try:
        from PIL import Image
    except ImportError:
        from matplotlib.image import imread

        return imread(io.BytesIO(data), format="png")
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img)


@pytest.fixture(scope="module")
def events() -> list[ev.Event]:
    return list(fake_run(Config(epochs=3, eval_every=1, warmup_epochs=0, seed=1)))


def test_png_of_a_finished_run_has_three_panels(events):
    image = _decode(run_png(events))
    assert image.ndim == 3 and image.shape[0] > 100
    no_synthesis = [e for e in events if not isinstance(e, ev.SamplesSynthesised)]
    two_panels = _decode(run_png(no_synthesis))
    assert image.shape[1] > two_panels.shape[1]  # the synthesis panel widens the figure
    assert image.std() > 0  # something was drawn


def test_png_before_the_first_evaluation(events):
    first_eval = next(i for i, e in enumerate(events) if isinstance(e, ev.Evaluated))
    image = _decode(run_png(events[:first_eval]))
    assert image.ndim == 3 and image.shape[0] > 100


def test_png_of_a_run_without_events():
    assert _decode(run_png([])).shape[0] > 100


def test_runs_page_offers_the_png_download(tmp_path, monkeypatch):
    monkeypatch.setenv("FERD_HOME", str(tmp_path / "runs"))
    monkeypatch.setenv("FERD_FAKE_ENGINE", "1")
    st.cache_resource.clear()
    store = RunStore(tmp_path / "runs")
    populate_store(store, methods=("ferd",), epochs=2)
    store.close()
    try:
        at = AppTest.from_file(str(ROOT / "pages" / "6_Runs.py"), default_timeout=30).run()
        assert not at.exception, at.exception
        labels = [b.proto.label for b in at.get("download_button")]
        assert "Charts (PNG)" in labels
    finally:
        st.cache_resource.clear()
