"""The shipped Streamlit settings: local-only, no phoning home, no file watcher, no GIL-hogging GC."""

from __future__ import annotations

import tomllib
from pathlib import Path

from app.uploads import MAX_UPLOAD_BYTES

CONFIG = tomllib.loads((Path(__file__).resolve().parent.parent / ".streamlit" / "config.toml").read_text())


def test_server_is_local_and_quiet():
    assert CONFIG["server"]["address"] == "127.0.0.1"
    assert CONFIG["server"]["headless"] is True
    assert CONFIG["browser"]["gatherUsageStats"] is False
    assert CONFIG["server"]["fileWatcherType"] == "none"  # the default watches the whole venv


def test_upload_cap_matches_the_checkpoint_check():
    assert CONFIG["server"]["maxUploadSize"] * 2**20 == MAX_UPLOAD_BYTES


def test_no_full_gc_after_every_script_run():
    # Streamlit's default gc.collect(2) after each (fragment) rerun held the GIL long enough to make
    # training ~20x slower while the Live page polled.
    assert CONFIG["runner"]["postScriptGC"] is False
