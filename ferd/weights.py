"""Reading weights files safely: torch.load(weights_only=True) with one-line errors that name the file;
`load_student` rebuilds a saved student from such a file.

Nothing but tensors and plain containers is ever unpickled. A file holding other objects (code, modules)
is refused; a corrupt, truncated or foreign file gets "cannot read" — never torch's advice to retry with
weights_only=False.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ferd.models import create_model


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


def load_student(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A saved student in eval mode; it takes [0,1] pixels (the model owns its normalisation)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"student checkpoint not found: {p}")
    data = read_weights(p)
    keys = ("arch", "num_classes", "in_channels", "image_size", "state_dict")
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise WeightsError(f"{p}: not a student checkpoint written by ferd (needs {', '.join(keys)})")
    arch, state = data["arch"], data["state_dict"]
    try:
        model = create_model(arch, num_classes=data["num_classes"], in_channels=data["in_channels"],
                             image_size=data["image_size"])
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{p}: {e}") from e
    missing = sorted(set(model.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise WeightsError(f"{p}: does not match architecture {arch!r}: {len(missing)} missing keys {missing[:3]}, "
                           f"{len(unexpected)} unexpected keys {unexpected[:3]}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # tensor shapes
        raise WeightsError(f"{p}: tensor shapes do not match architecture {arch!r}") from e
    return model.to(device).eval()
