import atexit
import os
import shutil
import tempfile

import pytest
import torch

from ferd.config import Config, load_preset


def _session_folder(variable: str, prefix: str, leaf: str = "") -> None:
    """Point `variable` at a new temporary folder (plus `leaf`) unless it is set; the folder is removed when the
    test session's interpreter exits."""
    if variable not in os.environ:
        folder = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ[variable] = os.path.join(folder, leaf) if leaf else folder


# One private cache for the whole test session (teachers trained by tests are shared across tests,
# never written to the user's cache).
_session_folder("FERD_CACHE_DIR", "ferd-test-cache-")
# Runs made by tests never land in the user's run store.
_session_folder("FERD_HOME", "ferd-test-home-")
# Pages see no reference pack unless a test points FERD_PACK_DIR at one (assets/reference would change what an
# empty store shows).
_session_folder("FERD_PACK_DIR", "ferd-test-pack-", "none")
torch.set_num_threads(1)


@pytest.fixture
def tiny_cfg() -> Config:
    """The smoke preset: a whole run takes seconds. Its two-epoch teacher is trained once per test session
    (FERD_CACHE_DIR above) and shared with the browser tests, whose server runs the smoke preset."""
    return load_preset("smoke", num_threads=1)
