"""FERD Studio: robust fairness in data-free robustness distillation (FERD and a DFRD baseline).

The library never imports streamlit. Entry points: `ferd.engine.run` (events), `ferd.runner.execute`
(events into the run store), `python -m ferd` (CLI), `ferd.load_student` (a saved student).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def load_student(path: str | Path, device: str = "cpu") -> torch.nn.Module:
    """A student saved by a run (run_dir/student.pt), in eval mode, taking [0,1] pixels."""
    from ferd.engine import load_student as _load

    return _load(path, device)
