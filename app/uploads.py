"""Teacher checkpoints uploaded in the browser: size-capped, stored by content hash, checked by loading
them with weights_only=True into the configured architecture before any run may use them. No Streamlit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ferd import atomic
from ferd.config import Config
from ferd.data import dataset_info
from ferd.teachers import TeacherError, load_checkpoint

MAX_UPLOAD_BYTES = 200 * 2**20  # the same cap as server.maxUploadSize in .streamlit/config.toml
SUFFIXES = (".pt", ".pth")


def accept_checkpoint(data: bytes, filename: str, cfg: Config, root: Path) -> Config:
    """Store an uploaded teacher checkpoint under root/uploads/<sha256>.pt and return `cfg` using it.

    Raises TeacherError with a message for the page when the file is too large, has the wrong suffix,
    cannot be read without unpickling code, or does not fit cfg.teacher_arch / the dataset's classes.
    A rejected file is deleted; nothing else is touched."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise TeacherError(f"{filename}: {len(data):,} bytes is over the upload limit of {MAX_UPLOAD_BYTES:,} bytes "
                           f"({MAX_UPLOAD_BYTES / 2**20:g} MiB)")
    if Path(filename).suffix.lower() not in SUFFIXES:
        raise TeacherError(f"{filename}: expected a PyTorch checkpoint ({', '.join(SUFFIXES)})")
    path = Path(root) / "uploads" / f"{hashlib.sha256(data).hexdigest()[:32]}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, data)
    info = dataset_info(cfg.dataset)
    try:
        load_checkpoint(path, cfg.teacher_arch, num_classes=info.num_classes, in_channels=info.image_shape[0],
                        image_size=info.image_shape[1], device=torch.device("cpu"))
    except TeacherError:
        path.unlink(missing_ok=True)
        raise
    return cfg.replace(teacher_checkpoint=str(path))
