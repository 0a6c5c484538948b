import os
import tempfile

import torch

# One private cache for the whole test session (teachers trained by tests are shared across tests,
# never written to the user's cache).
os.environ.setdefault("FERD_CACHE_DIR", tempfile.mkdtemp(prefix="ferd-test-cache-"))
torch.set_num_threads(1)
