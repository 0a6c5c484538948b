"""Classifiers. Every classifier takes [0,1] pixels and owns its normalisation.

Each classifier splits into `features(x)` (normalisation + body, up to the last BN output, before the
final ReLU; METHOD.md §3's feature layer) and `head(h)` (ReLU -> global average pool -> flatten -> linear),
with `forward(x) = head(features(x))`. Every classifier computes in the channels_last (NHWC) memory format:
`create_model` converts its weights and `features` its input, so convolutions and pooling run oneDNN's NHWC
kernels (on this project's 2-core CPU the digits teacher's forward pass took 5.7 ms against 15.1 ms for
NCHW at B 64, README "Benchmark"). Where a ReLU meets a max-pool, the pool comes first: max commutes with the
monotone ReLU, so relu(max_pool(z)) equals max_pool(relu(z)) bit for bit, forward and backward (ties pick the same
index; a window whose maximum is <= 0 passes no gradient either way), and the ReLU and its backward touch a quarter
of the values (tests/test_models.py compares both orders). Inside `folded_batchnorm` (attacks and other frozen
eval-mode passes) the digits and small CNNs compute each conv -> BN pair as one convolution with the BN folded
into its weights: the same function up to float rounding, without the BN passes. Parameter names follow the
common public implementations (kuangliu's CIFAR ResNets/MobileNetV2, Rice et al.'s PreActResNet, TRADES'
WideResNet), so their checkpoints load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are buffers, saved with the weights."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def default_normalize(in_channels: int) -> Normalize:
    """CIFAR statistics for 3 channels, mean 0.5 / std 0.5 otherwise."""
    if in_channels == 3:
        return Normalize(CIFAR_MEAN, CIFAR_STD)
    return Normalize((0.5,) * in_channels, (0.5,) * in_channels)


class Classifier(nn.Module):
    """forward(x) = head(features(x)). Subclasses define `body` (normalised pixels -> features) and `classifier`."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.normalize = default_normalize(in_channels)
        self._folded: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] | None = None

    def body(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def conv_bn_pairs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        """The (conv, BN) pairs the body computes through `conv_bn` (BN applied to the conv's output and nothing
        else): what `folded_batchnorm` folds. None by default (nothing folds)."""
        return []

    def conv_bn(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, z: torch.Tensor) -> torch.Tensor:
        """bn(conv(z)); inside `folded_batchnorm`, in eval mode, one convolution with the BN folded in."""
        folded = self._folded.get(conv) if self._folded is not None and not self.training else None
        if folded is None:
            return bn(conv(z))
        weight, bias = folded
        return F.conv2d(z, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @property
    def classifier(self) -> nn.Linear:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels in [0,1] -> (B, K, h, w) feature layer (last BN output, pre-ReLU), channels_last."""
        return self.body(self.normalize(x).contiguous(memory_format=torch.channels_last))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) features -> (B, num_classes) logits: ReLU, mean over the positions, linear. The mean runs
        over an NHWC view (no copy for channels_last features), so its backward broadcasts along contiguous
        channels: the digits student's head took 0.37 against 0.62 ms (forward + backward, B 64) as an
        average pool."""
        b, k = h.shape[:2]
        return self.classifier(F.relu(h).permute(0, 2, 3, 1).reshape(b, -1, k).mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the one convolution equal to bn(conv(.)) in eval mode:
    w' = w g / sqrt(v + e), b' = (b - m) g / sqrt(v + e) + beta, with the BN's running mean m and variance v."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    weight = (conv.weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
    return weight, shift


@contextmanager
def folded_batchnorm(model: nn.Module) -> Iterator[None]:
    """For the block, a Classifier in eval mode computes each of its `conv_bn_pairs` as one convolution with the BN
    folded in (`_fold`): the same function up to float rounding, without the BN's forward and backward passes
    (the digits student's input-gradient pass at B 55 and two threads took 18-38 % less time, README
    "Benchmark"). The weights are read once, at entry: the parameters and BN statistics must not change inside the
    block (attacks, and passes of a frozen model). Gradients flow to the input, not to the parameters. Any other
    model, a model in train mode, or a block nested in another: unchanged."""
    if not isinstance(model, Classifier) or model.training or model._folded is not None:
        yield
        return
    with torch.no_grad():
        model._folded = {conv: _fold(conv, bn) for conv, bn in model.conv_bn_pairs() if bn.track_running_stats}
    try:
        yield
    finally:
        model._folded = None


ModelFactory = Callable[[int, int, int], Classifier]
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register `factory(num_classes, in_channels, image_size)` under `name`."""

    def deco(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = factory
        return factory

    return deco


def create_model(name: str, *, num_classes: int, in_channels: int, image_size: int) -> Classifier:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if num_classes < 2 or in_channels < 1 or image_size < 8:
        raise ValueError(f"model {name!r}: need num_classes >= 2, in_channels >= 1, image_size >= 8 "
                         f"(got {num_classes}, {in_channels}, {image_size})")
    return MODELS[name](num_classes, in_channels, image_size).to(memory_format=torch.channels_last)


# ---- small CNNs ----
class DigitsCNN(Classifier):
    """Three 3x3 conv + BN stages of the given widths, 2x2 max-pool after the first two (16px -> 4x4)."""

    def __init__(self, widths: tuple[int, int, int], num_classes: int, in_channels: int) -> None:
        super().__init__(in_channels)
        w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(in_channels, w1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w2)
        self.conv3 = nn.Conv2d(w2, w3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w3)
        self.fc = nn.Linear(w3, num_classes)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def conv_bn_pairs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        return [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]

    def body(self, z: torch.Tensor) -> torch.Tensor:
        z = F.relu(F.max_pool2d(self.conv_bn(self.conv1, self.bn1, z), 2))  # (B, w1, H/2, W/2); ReLU after the pool
        z = F.relu(F.max_pool2d(self.conv_bn(self.conv2, self.bn2, z), 2))  # (B, w2, H/4, W/4)
        return self.conv_bn(self.conv3, self.bn3, z)  # (B, w3, H/4, W/4)


@register_model("digits-cnn")
def digits_cnn(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    """The embedded teacher (METHOD.md §10): widths 32-64-128."""
    return DigitsCNN((32, 64, 128), num_classes, in_channels)


@register_model("digits-cnn-small")
def digits_cnn_small(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    """The embedded student: widths 16-32-64."""
    return DigitsCNN((16, 32, 64), num_classes, in_channels)


class SmallCNN(Classifier):
    """conv 32-64 / pool / 128 / pool / 128, all 3x3 with BN: a quick model for 32px images (features 128 x H/4)."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__(in_channels)
        widths = (32, 64, 128, 128)
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.convs.append(nn.Conv2d(c, w, 3, padding=1, bias=False))
            self.bns.append(nn.BatchNorm2d(w))
            c = w
        self.fc = nn.Linear(c, num_classes)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def conv_bn_pairs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        return list(zip(self.convs, self.bns, strict=True))

    def body(self, z: torch.Tensor) -> torch.Tensor:
        last = len(self.convs) - 1
        for i, (conv, bn) in enumerate(self.conv_bn_pairs()):
            z = self.conv_bn(conv, bn, z)
            if i in (1, 2):
                z = F.max_pool2d(z, 2)  # before the ReLU: see the module docstring
            if i < last:
                z = F.relu(z)
        return z


@register_model("small-cnn")
def small_cnn(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    return SmallCNN(num_classes, in_channels)


# ---- ResNet-18 (CIFAR variant: 3x3 stem, no max-pool) ----
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu_out = True
        """False on the network's last block: the head applies that ReLU, so features stay pre-activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out) if self.relu_out else out


class ResNet(Classifier):
    """ResNet for 32px inputs (He et al. 2016; kuangliu/pytorch-cifar names). Features: last block's
    BN output plus shortcut, before its ReLU (512 x H/8 x W/8)."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int) -> None:
        super().__init__(in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        c = 64
        layers = []
        for i, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
            stage = []
            for j in range(n):
                stage.append(BasicBlock(c, width, 2 if (j == 0 and i > 0) else 1))
                c = width
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.layer4[-1].relu_out = False
        self.linear = nn.Linear(512, num_classes)

    @property
    def classifier(self) -> nn.Linear:
        return self.linear

    def body(self, z: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.bn1(self.conv1(z)))
        return self.layer4(self.layer3(self.layer2(self.layer1(z))))


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    return ResNet((2, 2, 2, 2), num_classes, in_channels)


# ---- PreAct ResNet-18 ----
class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if len(self.shortcut) else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(Classifier):
    """Pre-activation ResNet (He et al. 2016b) with a final BN, as in Rice et al.'s robust-overfitting code.
    Features: the final BN output (512 x H/8 x W/8)."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int) -> None:
        super().__init__(in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        c = 64
        layers = []
        for i, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
            stage = []
            for j in range(n):
                stage.append(PreActBlock(c, width, 2 if (j == 0 and i > 0) else 1))
                c = width
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    @property
    def classifier(self) -> nn.Linear:
        return self.linear

    def body(self, z: torch.Tensor) -> torch.Tensor:
        z = self.conv1(z)
        return self.bn(self.layer4(self.layer3(self.layer2(self.layer1(z)))))


@register_model("preactresnet18")
def preactresnet18(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels)


# ---- MobileNet-V2 (CIFAR variant: stride-1 stem) ----
class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, expansion: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        hidden = expansion * c_in
        self.conv1 = nn.Conv2d(c_in, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride == 1 and c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(Classifier):
    """MobileNet-V2 (Sandler et al. 2018) for 32px inputs (kuangliu names). Features: bn2 output (1280 x H/8 x W/8)."""

    # (expansion, out channels, blocks, stride)
    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__(in_channels)
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        blocks = []
        c = 32
        for expansion, c_out, n, stride in self.CFG:
            for j in range(n):
                blocks.append(InvertedResidual(c, c_out, expansion, stride if j == 0 else 1))
                c = c_out
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(320, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    @property
    def classifier(self) -> nn.Linear:
        return self.linear

    def body(self, z: torch.Tensor) -> torch.Tensor:
        z = self.layers(F.relu(self.bn1(self.conv1(z))))
        return self.bn2(self.conv2(z))


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    return MobileNetV2(num_classes, in_channels)


# ---- WideResNet-34-10 ----
class WideBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.equal_in_out = c_in == c_out
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        # As in TRADES' code: with a projection the shortcut starts from the activated input.
        return out + (x if self.equal_in_out else self.convShortcut(act))


class NetworkBlock(nn.Module):
    def __init__(self, n: int, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(Classifier):
    """WideResNet (Zagoruyko & Komodakis 2016), TRADES/RobustBench names. Features: the final BN output
    (64*widen x H/4 x W/4, i.e. 640 x 8 x 8 for WRN-34-10 on CIFAR)."""

    ignored_checkpoint_prefixes = ("sub_block1.",)
    """TRADES checkpoints carry an unused `sub_block1`; its weights are skipped when loading."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int) -> None:
        super().__init__(in_channels)
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def body(self, z: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.block3(self.block2(self.block1(self.conv1(z)))))


@register_model("wrn-34-10")
def wrn_34_10(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    return WideResNet(34, 10, num_classes, in_channels)
