"""Models: small nets for the embedded digits data and the CIFAR ResNet family of KD papers.

* :class:`MLP` and :class:`SmallCNN`: sizes are parameters, so a teacher and a student of the same
  family differ only in width (the ``cpu-quick`` preset of notebook 03).
* :class:`CifarResNet` (``resnet8`` … ``resnet110``, ``resnet8x4``, ``resnet32x4``) and
  :class:`WideResNet` (``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2``): the CIFAR models of
  the CRD benchmark (RepDistiller) and of mdistiller, written here from their published
  architecture. Parameter and buffer names and shapes are those of those repositories
  (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``/``.1``, ``fc``;
  ``block1.layer.0.bn1``, ``block1.layer.0.convShortcut``, ``bn1``, ``fc``), so their released
  CIFAR-100 teacher checkpoints load with ``load_state_dict(strict=True)``; see
  :func:`load_teacher_checkpoint`. Every model returns logits of shape (B, num_classes) only.
* ImageNet: torchvision's ``resnet18``, ``resnet34``, ``resnet50`` (torchvision's weight files load
  into them as they are) and :class:`MobileNetV1` (``mobilenet_v1``), the paper's ImageNet pairs.

:func:`build_model` builds any of them by name, optionally with a fixed initialisation seed that
does not touch the global random state.
"""
from __future__ import annotations

import inspect
import pickle
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from ._checks import check_int, check_module, check_seed

__all__ = [
    "MLP",
    "SmallCNN",
    "CifarResNet",
    "WideResNet",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "wrn_28_10",
    "wrn_34_10",
    "PreActResNet",
    "preact_resnet18",
    "resnet18",
    "resnet34",
    "resnet50",
    "MobileNetV1",
    "mobilenet_v1",
    "MODELS",
    "build_model",
    "model_arguments",
    "count_parameters",
    "load_teacher_checkpoint",
    "CheckpointMismatchError",
]


# ------------------------------------------------------------------------------ small digits models
class MLP(nn.Module):
    """Flatten, then Linear-ReLU layers of the given ``hidden`` widths, then a Linear classifier.

    Args:
        in_shape: (C, H, W) of one input image (digits: (1, 8, 8)).
        hidden: widths of the hidden layers, e.g. (32,) or (256, 256); () for a linear model.
        num_classes: width of the logits.
    """

    def __init__(self, *, in_shape: Sequence[int] = (1, 8, 8), hidden: Sequence[int] = (32,),
                 num_classes: int = 10):
        super().__init__()
        check_int("num_classes", num_classes, 2)
        for name, value in (("in_shape", in_shape), ("hidden", hidden)):
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise TypeError(f"{name} must be a sequence of integers such as "
                                f"{'(1, 8, 8)' if name == 'in_shape' else '(32,) or (256, 256)'}, got {value!r}")
        features = 1
        for s in in_shape:
            features *= check_int("in_shape entries", s)
        layers = []
        for width in hidden:
            layers += [nn.Linear(features, check_int("hidden width", width)), nn.ReLU(inplace=True)]
            features = int(width)
        self.body = nn.Sequential(nn.Flatten(), *layers)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class SmallCNN(nn.Module):
    """conv(w)-BN-ReLU, conv(2w)-BN-ReLU, max-pool 2, conv(2w)-BN-ReLU, global average pool, Linear.

    For 8x8 digits (``in_channels=1``); works on any image size >= 2. ``width`` = w sets the size:
    the ``cpu-quick`` teacher uses a wide one, and a narrow one is a student.
    """

    def __init__(self, *, in_channels: int = 1, width: int = 16, num_classes: int = 10):
        super().__init__()
        check_int("in_channels", in_channels)
        check_int("width", width)
        check_int("num_classes", num_classes, 2)

        def unit(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *unit(in_channels, width), *unit(width, 2 * width), nn.MaxPool2d(2),
            *unit(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# ---------------------------------------------------------------------------- CIFAR ResNet (CRD)
def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class _ResNetBlock(nn.Module):
    """Post-activation basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    The shortcut is the identity, or ``downsample`` = Sequential(1x1 conv with stride, BN) when the
    stride or the width changes (names ``downsample.0`` and ``downsample.1`` as in the reference).
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut, inplace=True)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of the CRD benchmark: depth = 6n + 2, three stages of n basic blocks.

    conv1 (3x3, widths[0]) - bn1 - relu - layer1 (widths[1], stride 1) - layer2 (widths[2],
    stride 2) - layer3 (widths[3], stride 2) - global average pool - fc. ``widths`` =
    (16, 16, 32, 64) for resnet20/56/110, (32, 64, 128, 256) for the "x4" models.

    Input (B, 3, H, W) normalised images (32x32 for CIFAR); output logits (B, num_classes).
    """

    def __init__(self, *, depth: int, widths: Sequence[int] = (16, 16, 32, 64), num_classes: int = 100,
                 in_channels: int = 3):
        super().__init__()
        check_int("depth", depth, 8)
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (8, 14, 20, 32, 44, 56, 110), got {depth}")
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or len(widths) != 4:
            raise ValueError(f"widths must hold 4 numbers (stem and three stages), got {widths!r}")
        widths = [check_int("widths entries", w) for w in widths]
        check_int("num_classes", num_classes, 2)
        check_int("in_channels", in_channels)
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for stage, (cout, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            layers = []
            for i in range(blocks):
                layers.append(_ResNetBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------- Wide ResNet (CRD)
class _WideBlock(nn.Module):
    """Pre-activation block: o = relu(bn1(x)); out = conv2(relu(bn2(conv1(o)))) + shortcut.

    The shortcut is x when the width is unchanged, else ``convShortcut`` (1x1 conv with stride)
    applied to o; the attribute keeps the reference's camel-case name so checkpoints load.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.convShortcut = None  # noqa: N815 (name fixed by the released checkpoints)
        if cin != cout:
            self.convShortcut = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(o)), inplace=True))
        return out + (x if self.convShortcut is None else self.convShortcut(o))


class _WideStage(nn.Module):
    """One stage of n blocks, held as ``self.layer`` (so keys read ``block1.layer.0...``)."""

    def __init__(self, blocks: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[_WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """The CIFAR Wide ResNet WRN-depth-k of the CRD benchmark: depth = 6n + 4.

    conv1 (3x3, 16) - block1 (16k, stride 1) - block2 (32k, stride 2) - block3 (64k, stride 2)
    - bn1 - relu - global average pool - fc. Input (B, 3, H, W); output logits (B, num_classes).
    """

    def __init__(self, *, depth: int, widen_factor: int = 1, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        check_int("depth", depth, 10)
        if (depth - 4) % 6:
            raise ValueError(f"Wide ResNet depth must be 6n + 4 (10, 16, 22, 28, 40), got {depth}")
        check_int("widen_factor", widen_factor)
        check_int("num_classes", num_classes, 2)
        check_int("in_channels", in_channels)
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.block1 = _WideStage(blocks, widths[0], widths[1], 1)
        self.block2 = _WideStage(blocks, widths[1], widths[2], 2)
        self.block3 = _WideStage(blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn1(x), inplace=True)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ------------------------------------------------------------- PreAct ResNet (adversarial training)
class _PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., 2016): o = relu(bn1(x));
    out = conv2(relu(bn2(conv1(o)))) + shortcut, the shortcut being x or a 1x1 conv of o."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(o)
        out = self.conv2(F.relu(self.bn2(self.conv1(o)), inplace=True))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet for 32x32 images (the PreActResNet-18 of the adversarial-training
    literature, e.g. Rice et al., 2020): conv3x3(64) - four stages of pre-activation blocks
    (64, 128, 256, 512; strides 1, 2, 2, 2) - bn - relu - global average pool - linear.

    Input (B, 3, H, W); output logits (B, num_classes). Used by the ``gpu-short`` adversarial
    preset (notebook 04), where the normalisation sits in front of it (``dkl_lib.attacks.Normalized``).
    """

    def __init__(self, *, blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or len(blocks) != 4:
            raise ValueError(f"blocks must hold 4 numbers (one per stage), got {blocks!r}")
        blocks = [check_int("blocks entries", n) for n in blocks]
        check_int("num_classes", num_classes, 2)
        check_int("in_channels", in_channels)
        self.conv1 = _conv3x3(in_channels, 64)
        cin = 64
        for stage, (cout, stride, n) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2), blocks), start=1):
            layers = []
            for i in range(n):
                layers.append(_PreActBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        x = F.relu(self.bn(x), inplace=True)
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ------------------------------------------------------------------------------------ constructors
_THIN = (16, 16, 32, 64)
_WIDE4 = (32, 64, 128, 256)


def resnet8(num_classes: int = 100) -> CifarResNet:
    """ResNet-8 for CIFAR (0.08 M parameters at 100 classes)."""
    return CifarResNet(depth=8, widths=_THIN, num_classes=num_classes)


def resnet14(num_classes: int = 100) -> CifarResNet:
    """ResNet-14 for CIFAR (0.18 M parameters at 100 classes)."""
    return CifarResNet(depth=14, widths=_THIN, num_classes=num_classes)


def resnet20(num_classes: int = 100) -> CifarResNet:
    """ResNet-20 for CIFAR (0.28 M parameters at 100 classes)."""
    return CifarResNet(depth=20, widths=_THIN, num_classes=num_classes)


def resnet32(num_classes: int = 100) -> CifarResNet:
    """ResNet-32 for CIFAR (0.47 M parameters at 100 classes)."""
    return CifarResNet(depth=32, widths=_THIN, num_classes=num_classes)


def resnet44(num_classes: int = 100) -> CifarResNet:
    """ResNet-44 for CIFAR (0.67 M parameters at 100 classes)."""
    return CifarResNet(depth=44, widths=_THIN, num_classes=num_classes)


def resnet56(num_classes: int = 100) -> CifarResNet:
    """ResNet-56 for CIFAR (0.86 M parameters at 100 classes); a CRD teacher."""
    return CifarResNet(depth=56, widths=_THIN, num_classes=num_classes)


def resnet110(num_classes: int = 100) -> CifarResNet:
    """ResNet-110 for CIFAR (1.74 M parameters at 100 classes); a CRD teacher."""
    return CifarResNet(depth=110, widths=_THIN, num_classes=num_classes)


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-8x4 (4x wider ResNet-8, 1.23 M parameters at 100 classes); the CRD student."""
    return CifarResNet(depth=8, widths=_WIDE4, num_classes=num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-32x4 (7.43 M parameters at 100 classes); the CRD teacher of resnet8x4."""
    return CifarResNet(depth=32, widths=_WIDE4, num_classes=num_classes)


def wrn_16_1(num_classes: int = 100) -> WideResNet:
    """WRN-16-1 (0.18 M parameters at 100 classes)."""
    return WideResNet(depth=16, widen_factor=1, num_classes=num_classes)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    """WRN-16-2 (0.70 M parameters at 100 classes); a CRD student."""
    return WideResNet(depth=16, widen_factor=2, num_classes=num_classes)


def wrn_40_1(num_classes: int = 100) -> WideResNet:
    """WRN-40-1 (0.57 M parameters at 100 classes); a CRD student."""
    return WideResNet(depth=40, widen_factor=1, num_classes=num_classes)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    """WRN-40-2 (2.26 M parameters at 100 classes); a CRD teacher."""
    return WideResNet(depth=40, widen_factor=2, num_classes=num_classes)


def wrn_28_10(num_classes: int = 10) -> WideResNet:
    """WRN-28-10 (36.5 M parameters at 10 classes); adversarial training on CIFAR."""
    return WideResNet(depth=28, widen_factor=10, num_classes=num_classes)


def wrn_34_10(num_classes: int = 10) -> WideResNet:
    """WRN-34-10 (46.2 M parameters at 10 classes): the model of TRADES and of the DKL paper's
    adversarial-training tables (the ``paper`` adversarial preset)."""
    return WideResNet(depth=34, widen_factor=10, num_classes=num_classes)


def preact_resnet18(num_classes: int = 10) -> PreActResNet:
    """PreActResNet-18 (11.2 M parameters at 10 classes); the ``gpu-short`` adversarial preset."""
    return PreActResNet(blocks=(2, 2, 2, 2), num_classes=num_classes)


# ------------------------------------------------------------------------------------ ImageNet
def resnet18(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-18 (11.7 M parameters at 1000 classes): the ImageNet student of the
    paper's ResNet34 -> ResNet18 pair. torchvision's weight files load into it as they are."""
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=check_int("num_classes", num_classes, 2))


def resnet34(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-34 (21.8 M parameters): the ImageNet teacher of the KD tables (the paper
    and mdistiller use torchvision's pretrained weights, top-1 73.31 %)."""
    import torchvision

    return torchvision.models.resnet34(weights=None, num_classes=check_int("num_classes", num_classes, 2))


def resnet50(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-50 (25.6 M parameters): the teacher of the ResNet50 -> MobileNet pair."""
    import torchvision

    return torchvision.models.resnet50(weights=None, num_classes=check_int("num_classes", num_classes, 2))


class MobileNetV1(nn.Module):
    """MobileNet (v1, width 1.0; Howard et al. 2017): a 3x3 stride-2 convolution, then 13
    depthwise-separable blocks (3x3 depthwise + 1x1 pointwise, each with BatchNorm and ReLU),
    global average pooling and a linear classifier; 4.2 M parameters at 1000 classes. The student
    of the paper's ResNet50 -> MobileNet ImageNet pair (mdistiller's MobileNetV1)."""

    # (output channels, stride) of the depthwise-separable blocks
    BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1),
              (512, 1), (512, 1), (1024, 2), (1024, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        check_int("num_classes", num_classes, 2)
        layers = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True)]
        channels = 32
        for out, stride in self.BLOCKS:
            layers += [nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                       nn.Conv2d(channels, out, 1, 1, 0, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v1(num_classes: int = 1000) -> MobileNetV1:
    """:class:`MobileNetV1` with ``num_classes`` outputs (4.2 M parameters at 1000 classes)."""
    return MobileNetV1(num_classes=num_classes)


def _mlp(num_classes: int = 10, **kw) -> MLP:
    return MLP(num_classes=num_classes, **kw)


def _small_cnn(num_classes: int = 10, **kw) -> SmallCNN:
    return SmallCNN(num_classes=num_classes, **kw)


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "small_cnn": _small_cnn,
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "wrn_28_10": wrn_28_10,
    "wrn_34_10": wrn_34_10,
    "preact_resnet18": preact_resnet18,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "mobilenet_v1": mobilenet_v1,
}


_CONFIGURABLE = {"mlp": MLP, "small_cnn": SmallCNN}  # the models whose constructor takes more than num_classes


def model_arguments(name: str) -> list:
    """The keyword arguments :func:`build_model` passes on to model ``name``'s constructor (besides
    ``num_classes``): ``in_shape`` and ``hidden`` for "mlp", ``in_channels`` and ``width`` for
    "small_cnn", none for the others."""
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if name not in _CONFIGURABLE:
        return []
    return [p for p in inspect.signature(_CONFIGURABLE[name]).parameters if p != "num_classes"]


def build_model(name: str, num_classes: int, *, seed: Optional[int] = None, **kw) -> nn.Module:
    """Build the model ``name`` (a key of :data:`MODELS`) with ``num_classes`` outputs.

    ``kw`` goes to the constructor (``hidden=(64,)`` for "mlp", ``width=8`` for "small_cnn"; the
    other models take none, see :func:`model_arguments`); an argument the model does not take raises
    ``TypeError``, an unknown name or a ``num_classes`` below 2 ``ValueError``. With ``seed`` the
    initial weights are drawn under that seed inside ``torch.random.fork_rng``, so the same seed
    gives the same model and the global random state is left untouched.
    """
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    check_int("num_classes", num_classes, 2)
    if seed is not None:
        seed = check_seed("seed", seed)
    allowed = model_arguments(name)
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise TypeError(f"model {name!r} takes no argument(s) {unknown}; "
                        + (f"its arguments: {allowed}" if allowed else "it takes none besides num_classes"))
    if seed is None:
        return MODELS[name](num_classes=num_classes, **kw)
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed would also reseed every GPU's generator, which
        # fork_rng(devices=[]) does not restore (the weights are drawn on the CPU)
        torch.random.default_generator.manual_seed(seed)
        return MODELS[name](num_classes=num_classes, **kw)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter entries (buffers such as BN running statistics not counted); with
    ``trainable_only`` only those of parameters that require grad."""
    check_module("model", model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ------------------------------------------------------------------------------------ checkpoints
class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model; the message lists the differences."""


_STATE_KEYS = ("model", "state_dict", "model_state_dict", "net")


def _find_state_dict(obj) -> Optional[Mapping[str, torch.Tensor]]:
    """The first state_dict found: ``obj`` itself, or under one of _STATE_KEYS (tried in turn, nested)."""
    if not isinstance(obj, Mapping):
        return None
    if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return obj
    for key in _STATE_KEYS:
        found = _find_state_dict(obj.get(key))
        if found is not None:
            return found
    return None


def _extract_state_dict(obj) -> Mapping[str, torch.Tensor]:
    found = _find_state_dict(obj)
    if found is not None:
        return found
    raise CheckpointMismatchError(
        "checkpoint holds neither a state_dict nor a dict with one under 'model' (RepDistiller / "
        f"mdistiller layout) or {list(_STATE_KEYS[1:])}; top-level keys: "
        f"{sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__}")


def _match_prefix(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict:
    """``state`` with the DataParallel / DistributedDataParallel ``prefix`` taken off or put on, as the
    model's own keys (``own``, its state_dict) have it (a wrapped model's keys carry it, a plain model's do not)."""
    state = dict(state)
    wrapped = bool(own) and all(k.startswith(prefix) for k in own)  # (a plain model may have a "module" child)
    prefixed = bool(state) and all(k.startswith(prefix) for k in state)
    if prefixed and not wrapped:
        return {k[len(prefix):]: v for k, v in state.items()}
    if wrapped and not prefixed:
        return {prefix + k: v for k, v in state.items()}
    return state


def load_teacher_checkpoint(checkpoint, model: nn.Module, *, map_location="cpu",
                            trusted: bool = False) -> nn.Module:
    """Load a teacher's weights into ``model`` with strict key and shape checking; returns ``model``.

    ``checkpoint`` is a path, or an already loaded object. Accepted layouts: a dict with the
    state_dict under "model" (how RepDistiller and mdistiller release their CIFAR-100 teachers,
    e.g. ``resnet32x4_vanilla/ckpt_epoch_240.pth``), under "state_dict", "model_state_dict" or
    "net", or a bare state_dict; the "module." prefix of DataParallel / DistributedDataParallel is
    taken off or put on as ``model``'s own keys have it.

    Files are read with ``torch.load(weights_only=True)``; a checkpoint that pickles other objects
    is refused unless ``trusted=True`` (only for files whose origin you trust).

    Raises:
        CheckpointMismatchError: missing or unexpected keys, or shapes that differ; the message
            lists them (first few of each). Also for a file that ``weights_only`` loading refuses
            (without ``trusted=True``) and for an object that holds no state_dict.
        FileNotFoundError: no file at the path.
        TypeError: ``model`` is not a ``torch.nn.Module``.
    """
    check_module("model", model)
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint file at {path}")
        with open(path, "rb") as fh:
            head = fh.read(4)
        # torch.save writes a zip archive ("PK\x03\x04"); files of torch < 1.6 are a pickle ("\x80")
        if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
            raise CheckpointMismatchError(
                f"{path} is not a PyTorch checkpoint (it starts with {head!r}; a web page or error message saved "
                "in its place by a failed download?): fetch the file again")
        try:
            obj = torch.load(path, map_location=map_location, weights_only=not trusted)
        except pickle.UnpicklingError as err:
            raise CheckpointMismatchError(
                f"{path} holds objects that weights_only loading refuses ({err}); if you trust the file, pass "
                "trusted=True in Python, or (for the command line) save its state_dict alone once, read with "
                "torch.load(..., weights_only=False), over the file") from err
        except (RuntimeError, EOFError) as err:  # a truncated or damaged archive (an interrupted download)
            raise CheckpointMismatchError(
                f"{path} cannot be read as a PyTorch checkpoint, it is truncated or damaged ({err}): fetch the "
                "file again") from err
    else:
        obj = checkpoint
    try:
        own = model.state_dict()
        state = _match_prefix(_extract_state_dict(obj), own)
        missing = _check_state_dict(state, own, type(model).__name__)
    except CheckpointMismatchError as err:
        if isinstance(checkpoint, (str, Path)):  # say which file (a run may look in several places)
            raise CheckpointMismatchError(f"{Path(checkpoint).expanduser()}: {err}") from None
        raise
    for k in missing:  # only num_batches_tracked here
        state[k] = own[k]
    model.load_state_dict(state, strict=True)
    return model


def _check_state_dict(state: dict, own: Mapping[str, torch.Tensor], model_name: str) -> list:
    """Raise CheckpointMismatchError listing the missing, unexpected and misshapen keys of ``state``
    against the model's state_dict ``own``; else return the keys ``state`` lacks (only BatchNorm's
    num_batches_tracked)."""
    missing = [k for k in own if k not in state]  # in the model's order: the first layer first
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    # BatchNorm checkpoints from before PyTorch 0.4.1 have no num_batches_tracked; that is harmless
    missing_real = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing_real or unexpected or shapes:
        parts = []
        for label, items in (("missing in checkpoint", missing_real), ("unexpected in checkpoint", unexpected),
                             ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{label} ({len(items)}): {', '.join(items[:8])}{more}")
        raise CheckpointMismatchError(
            f"checkpoint does not match {model_name}: " + "; ".join(parts))
    return missing
