import pytest
import torch
import torch.nn.functional as F

from ferd.models import MODELS, Generator, create_model, register_model

# (in_channels, image_size) small enough to keep the walk fast; CIFAR models at 32px, digits models at 16px.
SHAPES = {"digits-cnn": (1, 16), "digits-cnn-small": (1, 16)}
HEAVY = {"wrn-34-10": (640, 8, 8)}  # name -> feature-layer shape on 32px inputs


def _inputs(name: str, batch: int = 2) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    c, s = SHAPES.get(name, (3, 32))
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=c, image_size=s)
    return model, torch.rand(batch, c, s, s), torch.arange(batch) % 7


@pytest.mark.parametrize("name", sorted(set(MODELS) - set(HEAVY)))
def test_forward_features_head_and_gradients(name: str) -> None:
    model, x, y = _inputs(name)
    model.train()
    logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, y).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing[:5]}"
    model.eval()
    with torch.no_grad():
        h = model.features(x)
        assert h.dim() == 4
        assert torch.allclose(model.head(h), model(x), atol=1e-5)
        # The feature layer is a BN output before the final ReLU, so it takes negative values.
        assert (h < 0).any()


@pytest.mark.parametrize("name", sorted(HEAVY))
def test_heavy_model_forward(name: str) -> None:
    model, x, _ = _inputs(name)
    model.eval()
    with torch.no_grad():
        h = model.features(x)
        logits = model.head(h)
    assert h.shape == (2, *HEAVY[name])
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def test_feature_layer_shapes() -> None:
    assert create_model("digits-cnn", num_classes=10, in_channels=1, image_size=16).features(
        torch.rand(2, 1, 16, 16)).shape == (2, 128, 4, 4)
    assert create_model("digits-cnn-small", num_classes=10, in_channels=1, image_size=16).features(
        torch.rand(2, 1, 16, 16)).shape == (2, 64, 4, 4)


def test_models_own_their_normalisation() -> None:
    model = create_model("digits-cnn", num_classes=10, in_channels=1, image_size=16).eval()
    state = model.state_dict()
    assert "normalize.mean" in state and "normalize.std" in state
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
        model.normalize.mean.fill_(0.0)
        assert not torch.allclose(before, model(x))


def test_unknown_model_lists_names() -> None:
    with pytest.raises(ValueError, match="digits-cnn.*wrn-34-10"):
        create_model("resnet1000", num_classes=10, in_channels=3, image_size=32)


def test_registering_a_taken_name_fails() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("digits-cnn")(lambda n, c, s: None)


@pytest.mark.parametrize("size", [16, 28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_shape_and_range(size: int, channels: int) -> None:
    torch.manual_seed(0)
    gen = Generator(16, channels, size, width=8)
    z = torch.randn(3, 16) * 10  # large latents would push an unbounded output outside [0,1]
    x = gen(z)
    assert x.shape == (3, channels, size, size)
    assert x.min() >= 0 and x.max() <= 1
    x.mean().backward()
    assert all(p.grad is not None for p in gen.parameters())


def test_generator_rejects_sizes_not_divisible_by_4() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        Generator(16, 1, 30)


def _relu_then_pool(model: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The textbook order (ReLU, then max-pool) of the digits and small CNN bodies, written out."""
    if hasattr(model, "conv1"):  # DigitsCNN
        z = F.max_pool2d(F.relu(model.bn1(model.conv1(z))), 2)
        z = F.max_pool2d(F.relu(model.bn2(model.conv2(z))), 2)
        return model.bn3(model.conv3(z))
    for i, (conv, bn) in enumerate(zip(model.convs, model.bns, strict=True)):  # SmallCNN
        z = bn(conv(z))
        if i < len(model.convs) - 1:
            z = F.relu(z)
        if i in (1, 2):
            z = F.max_pool2d(z, 2)
    return z


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", ["digits-cnn", "digits-cnn-small", "small-cnn"])
def test_pooling_before_relu_computes_the_same_bits(name: str, train: bool) -> None:
    """The models pool before their ReLUs (fewer values to rectify); outputs, input gradients and weight gradients
    must equal the ReLU-then-pool order bit for bit, ties and all-negative windows included."""
    c, s = SHAPES.get(name, (3, 32))
    torch.manual_seed(1)
    model = create_model(name, num_classes=10, in_channels=c, image_size=s)
    for m in model.modules():  # BN statistics away from (0, 1), so that many windows are all negative
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.normal_()
    x = torch.rand(16, c, s, s)
    x[:4] = 0.0  # constant images: equal values in every pooling window
    y = torch.arange(16) % 10
    results = []
    for body in (model.body, lambda z: _relu_then_pool(model, z)):
        model.train(train)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.zero_grad()
        xi = x.clone().requires_grad_(True)
        h = body(model.normalize(xi).contiguous(memory_format=torch.channels_last))
        logits = model.head(h)
        F.cross_entropy(logits, y).backward()
        results.append([logits.detach(), xi.grad] + [p.grad for p in model.parameters()]
                       + [b.clone() for b in model.buffers()])
        model.load_state_dict(state)  # the train-mode pass moved the running statistics
    assert (results[0][0] != 0).any()
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["digits-cnn", "digits-cnn-small", "small-cnn"])
def test_folded_batchnorm_computes_the_eval_function_and_restores_the_model(name: str) -> None:
    from ferd.models import folded_batchnorm

    torch.manual_seed(0)
    channels, size = SHAPES.get(name, (3, 32))
    model = create_model(name, num_classes=10, in_channels=channels, image_size=size)
    x = torch.rand(8, channels, size, size)
    model.train()
    for _ in range(3):  # running statistics away from 0 / 1, so that folding them matters
        model(torch.rand(16, channels, size, size) * 3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-1.0, 1.0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    xa = x.clone().requires_grad_(True)
    plain = model(xa)
    (g_plain,) = torch.autograd.grad(plain.logsumexp(1).sum(), xa)
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules()
             if isinstance(m, torch.nn.BatchNorm2d)]
    with folded_batchnorm(model):
        with folded_batchnorm(model):  # nested: unchanged
            folded = model(xa)
        (g_folded,) = torch.autograd.grad(folded.logsumexp(1).sum(), xa)
    assert calls == []  # no BN layer ran: each was folded into its convolution
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_folded, g_plain, rtol=1e-3, atol=1e-6)
    assert model._folded is None
    model(x)
    assert len(calls) == len(model.conv_bn_pairs())  # every BN runs again after the block
    model.train()
    with folded_batchnorm(model):  # train mode: batch statistics, nothing folds
        model(x)
    assert model._folded is None
    for h in hooks:
        h.remove()
