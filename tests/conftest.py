import os
import tempfile

import pytest
import torch

from ferd.config import Config, load_preset

# One private cache for the whole test session (teachers trained by tests are shared across tests,
# never written to the user's cache).
os.environ.setdefault("FERD_CACHE_DIR", tempfile.mkdtemp(prefix="ferd-test-cache-"))
# Runs made by tests never land in the user's run store.
os.environ.setdefault("FERD_HOME", tempfile.mkdtemp(prefix="ferd-test-home-"))
# Pages see no reference pack unless a test points FERD_PACK_DIR at one (assets/reference would change what an
# empty store shows).
os.environ.setdefault("FERD_PACK_DIR", os.path.join(tempfile.mkdtemp(prefix="ferd-test-pack-"), "none"))
torch.set_num_threads(1)


@pytest.fixture
def tiny_cfg() -> Config:
    """The smoke preset: a whole run takes seconds. Its two-epoch teacher is trained once per test session
    (FERD_CACHE_DIR above) and shared with the browser tests, whose server runs the smoke preset."""
    return load_preset("smoke", num_threads=1)
