"""Reading weights files safely: torch.load(weights_only=True) with one-line errors that name the file.

Nothing but tensors and plain containers is ever unpickled. A file holding other objects (code, modules)
is refused; a corrupt, truncated or foreign file gets "cannot read" — never torch's advice to retry with
weights_only=False.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class WeightsError(ValueError):
    """A weights file that is missing, unreadable, refused or does not fit the model; names the file."""


def read_weights(path: str | Path) -> Any:
    """The file's content, loaded on the CPU with weights_only=True; WeightsError if it cannot be."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: file not found")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):
            raise WeightsError(f"{p}: refused: the file holds objects other than tensors and plain containers "
                               f"(e.g. code or whole modules), which are never unpickled") from e
        raise WeightsError(f"{p}: cannot read as a PyTorch weights file (corrupt, truncated or another format)") from e
    except Exception as e:  # a corrupt file can fail anywhere in the reader (RuntimeError, EOFError, IndexError, ...)
        raise WeightsError(f"{p}: cannot read as a PyTorch weights file (corrupt, truncated or another format)") from e
