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
torch.set_num_threads(1)

# The smallest meaningful teacher: one epoch of adversarial training (a few seconds, cached per session).
TINY_TEACHER_EPOCHS = 1


@pytest.fixture
def tiny_cfg() -> Config:
    """The smoke preset on a one-epoch teacher: a whole run takes seconds."""
    return load_preset("smoke", teacher_epochs=TINY_TEACHER_EPOCHS, num_threads=1)
