"""Thread counts: evaluations may take cores an executor reports idle, and that must not change what they compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ferd.attacks import get_attack, isolated_rng
from ferd.config import Config
from ferd.device import evaluation_threads, fixed_threads, set_evaluation_threads
from ferd.models import create_model
from ferd.stages import evaluation_stage


@pytest.fixture(autouse=True)
def _no_source():
    set_evaluation_threads(None)
    yield
    set_evaluation_threads(None)


def _digits_student(steps: int = 60) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The embedded student trained a little on the real digits (so the attacks have correct images to attack)."""
    from ferd.data import test_split, train_split

    x, y = train_split("digits")
    torch.manual_seed(0)
    model = create_model("digits-cnn-small", num_classes=10, in_channels=1, image_size=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(steps):
        b = (i * 64) % (len(x) - 64)
        loss = F.cross_entropy(model(x[b:b + 64]), y[b:b + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt = test_split("digits")
    return model.eval(), xt[:120], yt[:120]


def test_evaluation_threads_take_the_idle_cores_the_source_reports():
    assert evaluation_threads(1) == 1  # no source: the run's own count
    set_evaluation_threads(lambda: 2)
    assert evaluation_threads(1) == 2
    assert evaluation_threads(3) == 3  # never fewer than the run's own
    set_evaluation_threads(None)
    assert evaluation_threads(2) == 2


@pytest.mark.parametrize("name", ["fgsm", "pgd20", "cw", "aa"])
def test_attacks_compute_the_same_bits_at_one_and_two_threads(name):
    """What lets an evaluation change its thread count mid-run: forward passes and input gradients only."""
    model, x, y = _digits_student()
    if name == "aa":
        x, y = x[:40], y[:40]
    out = []
    for threads in (1, 2):
        with fixed_threads(threads), isolated_rng(0):
            out.append(get_attack(name)(model, x, y, eps=0.1, step_size=0.025, steps=10, seed=0))
    assert not torch.equal(out[0], x)  # the attack moved the images
    assert torch.equal(out[0], out[1])


def test_an_evaluation_uses_the_reported_cores_and_gives_the_run_its_own_count_back():
    model, x, y = _digits_student(steps=5)
    cfg = Config(eval_attacks=("clean", "pgd20", "cw"), eval_batch_size=40, eval_steps=2)
    seen: list[int] = []
    model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))

    def run(source):
        seen.clear()
        set_evaluation_threads(source)
        stage = evaluation_stage(cfg, model, x, y, num_classes=10, device=torch.device("cpu"), stop=lambda: False,
                                 epoch=1, final=False)
        events = []
        try:
            while True:
                events.append(next(stage))
        except StopIteration as done:
            return done.value, events

    with fixed_threads(1):
        alone, events = run(lambda: 2)
        assert set(seen) == {2} and torch.get_num_threads() == 1
        assert [e.label for e in events][-1] == "done"
        shared, _ = run(None)
        assert set(seen) == {1}
    for name in cfg.eval_attacks:
        assert (alone.correct[name] == shared.correct[name]).all()
