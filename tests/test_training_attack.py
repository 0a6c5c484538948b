"""The training attacks as the student sees them: predictions in eval mode, success rate, target spread."""

from __future__ import annotations

import torch
import torch.nn as nn

from ferd.distillation import adversarial_predictions


def _bn_model_whose_modes_disagree() -> tuple[nn.Module, torch.Tensor]:
    """A BN model and a batch where batch statistics (train mode) and running statistics (eval mode) give
    different predictions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    x = torch.tensor([[5.0, 0.0], [6.0, 0.0], [7.0, 0.0]])  # eval: class 0 (running mean 0); train: centred
    model.train()
    return model, x


def test_adversarial_predictions_use_eval_mode_and_restore_train_mode():
    model, x = _bn_model_whose_modes_disagree()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        train_pred = model(x).argmax(1)
    model.load_state_dict(state)  # undo the running-statistics update of that train-mode forward
    pred = adversarial_predictions(model, x)
    assert pred.tolist() == [0, 0, 0]
    assert train_pred.tolist() != pred.tolist()  # the case really separates the two modes
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # no running-statistics update
