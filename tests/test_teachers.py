import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ferd import teachers
from ferd.attacks import pgd
from ferd.config import Config
from ferd.models import create_model
from ferd.teachers import TeacherError, TeacherInfo, cache_dir, embedded_key, freeze, load_checkpoint, load_teacher

CPU = torch.device("cpu")
DIGITS = {"num_classes": 10, "in_channels": 1, "image_size": 16, "device": CPU}


class NotATensor:
    """Anything that is not a tensor or a plain container must never be unpickled."""


def _model(num_classes: int = 10, arch: str = "digits-cnn") -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=num_classes, in_channels=1, image_size=16)
    model.train()
    model(torch.rand(8, 1, 16, 16))  # non-default BN statistics, so a load that drops them would show
    return model.eval()


@pytest.mark.parametrize("fmt", ["plain", "module-prefix", "state_dict", "model_state_dict"])
def test_checkpoint_formats(tmp_path: Path, fmt: str) -> None:
    source = _model()
    state = source.state_dict()
    if fmt == "module-prefix":
        state = OrderedDict((f"module.{k}", v) for k, v in state.items())
    elif fmt != "plain":
        state = {fmt: state, "epoch": 7}
    path = tmp_path / "teacher.pt"
    torch.save(state, path)
    model = load_checkpoint(path, "digits-cnn", **DIGITS)
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), source(x))
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_wrong_class_count(tmp_path: Path) -> None:
    path = tmp_path / "five.pt"
    torch.save(_model(num_classes=5).state_dict(), path)
    with pytest.raises(TeacherError, match="5 classes.*10"):
        load_checkpoint(path, "digits-cnn", **DIGITS)


def test_wrong_architecture(tmp_path: Path) -> None:
    path = tmp_path / "small.pt"
    torch.save(_model(arch="digits-cnn-small").state_dict(), path)
    with pytest.raises(TeacherError, match="digits-cnn"):
        load_checkpoint(path, "digits-cnn", **DIGITS)
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(TeacherError, match="missing keys"):
        load_checkpoint(path, "digits-cnn", **DIGITS)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _model().state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(TeacherError, match="refused"):
        load_checkpoint(path, "digits-cnn", **DIGITS)
    torch.save(_model(), path)  # a whole pickled module
    with pytest.raises(TeacherError, match="refused"):
        load_checkpoint(path, "digits-cnn", **DIGITS)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt", "digits-cnn", **DIGITS)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a weights file")
    with pytest.raises(TeacherError, match="cannot read"):
        load_checkpoint(garbage, "digits-cnn", **DIGITS)
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(TeacherError, match="not a state dict"):
        load_checkpoint(listing, "digits-cnn", **DIGITS)


def test_checkpoint_without_normalisation_takes_raw_pixels(tmp_path: Path) -> None:
    state = {k: v for k, v in _model().state_dict().items() if not k.startswith("normalize.")}
    path = tmp_path / "raw.pt"
    torch.save(state, path)
    model = load_checkpoint(path, "digits-cnn", **DIGITS)
    assert float(model.normalize.mean.abs().sum()) == 0.0 and torch.all(model.normalize.std == 1.0)


def test_freeze_survives_train_backward_and_attacks() -> None:
    model = freeze(_model())
    params = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.bn1.train()
    assert not any(m.training for m in model.modules())
    x = torch.rand(16, 1, 16, 16, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    for _ in range(3):
        model(torch.rand(16, 1, 16, 16) * 3)
    pgd(model, torch.rand(8, 1, 16, 16), torch.zeros(8, dtype=torch.long), eps=0.1, steps=2)
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), f"{k} changed"


def test_other_datasets_need_a_checkpoint() -> None:
    with pytest.raises(TeacherError, match="checkpoint"):
        load_teacher(Config(dataset="cifar10", teacher_arch="resnet18", student_arch="small-cnn"), CPU)


def test_load_teacher_from_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    torch.save(_model().state_dict(), path)
    model, info = load_teacher(Config(teacher_checkpoint=str(path)), CPU)
    assert info.path == str(path) and info.arch == "digits-cnn" and info.clean_acc is None
    assert not model.training


def test_cache_key_names_what_determines_the_weights() -> None:
    assert embedded_key("digits-cnn", 30) != embedded_key("digits-cnn", 20)
    assert embedded_key("digits-cnn", 30) != embedded_key("digits-cnn-small", 30)
    assert "eps0.1" in embedded_key("digits-cnn", 30) and teachers.CACHE_VERSION in embedded_key("digits-cnn", 30)


@pytest.mark.slow
def test_embedded_teacher_is_trained_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERD_CACHE_DIR", str(tmp_path))
    cfg = Config(teacher_epochs=1)
    calls: list[tuple[int, int]] = []
    rng_before = torch.random.get_rng_state()
    model, info = load_teacher(cfg, CPU, progress=lambda e, n: calls.append((e, n)))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # training used its own RNG stream
    # One call per training batch (so a stop request is seen within a batch), then one when the epoch is done.
    assert calls[-1] == (1, 1) and len(calls) > 2 and set(calls[:-1]) == {(0, 1)}
    path = cache_dir() / "teachers" / f"{embedded_key('digits-cnn', 1)}.pt"
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert info.path == str(path) and info.train_s > 0
    assert len(info.clean_per_class) == 10 and len(info.pgd_per_class) == 10
    # classes are balanced to within one sample, so the overall accuracy is close to the class mean
    assert info.clean_acc == pytest.approx(sum(info.clean_per_class) / 10, abs=0.01)
    assert info.pgd_acc == pytest.approx(sum(info.pgd_per_class) / 10, abs=0.01)
    assert 0.0 <= info.pgd_acc <= info.clean_acc <= 1.0
    assert json.loads(path.with_suffix(".json").read_text()) == info.to_dict()
    assert not model.training

    def no_training(*_: object, **__: object) -> None:
        raise AssertionError("the cached teacher was retrained")

    monkeypatch.setattr(teachers, "train_embedded", no_training)
    model2, info2 = load_teacher(cfg, CPU)
    assert info2 == info and isinstance(info2, TeacherInfo)
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), model2(x))
    assert not any(p.requires_grad for p in model2.parameters())


@pytest.mark.slow
def test_embedded_teacher_does_not_depend_on_the_callers_thread_count() -> None:
    """The cached teacher is shared by every later run, so the first run's thread count must not shape it."""
    before = torch.get_num_threads()
    weights = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model, _ = teachers.train_embedded("digits-cnn-small", epochs=1, device=CPU)
            assert torch.get_num_threads() == threads  # the caller's count is restored
            weights.append(model.state_dict())
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
