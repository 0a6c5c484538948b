"""Uploaded teacher checkpoints: size cap, suffix, weights_only loading, architecture check."""

import io

import pytest
import torch

from app import uploads
from ferd.config import load_preset
from ferd.models import create_model
from ferd.teachers import TeacherError


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_a_valid_checkpoint_is_stored_and_used(tmp_path):
    cfg = load_preset("digits")
    state = create_model("digits-cnn", num_classes=10, in_channels=1, image_size=16).state_dict()
    out = uploads.accept_checkpoint(_bytes({"state_dict": state}), "teacher.pt", cfg, tmp_path)
    assert out.teacher_checkpoint.startswith(str(tmp_path / "uploads"))
    assert torch.load(out.teacher_checkpoint, weights_only=True)["state_dict"].keys() == state.keys()


@pytest.mark.parametrize("case", ["wrong-classes", "pickled-code", "suffix", "too-big"])
def test_bad_uploads_are_rejected_and_not_kept(tmp_path, monkeypatch, case):
    cfg = load_preset("digits")
    name, data = "teacher.pt", b""
    if case == "wrong-classes":
        data = _bytes(create_model("digits-cnn", num_classes=7, in_channels=1, image_size=16).state_dict())
    elif case == "pickled-code":
        data = _bytes({"state_dict": {"x": torch.zeros(1)}, "hook": print})  # needs unpickling a function
    elif case == "suffix":
        name, data = "teacher.pkl", _bytes({})
    else:
        monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 10)
        data = b"x" * 11
    with pytest.raises(TeacherError) as err:
        uploads.accept_checkpoint(data, name, cfg, tmp_path)
    assert not any((tmp_path / "uploads").glob("*"))
    if case == "too-big":  # the two sizes differ in the message (not "200 MiB is over the 200 MiB limit")
        assert "11 bytes is over the upload limit of 10 bytes" in str(err.value)
    assert "weights_only" not in str(err.value)
