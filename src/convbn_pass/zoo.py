"""Small reference models with the Conv→BatchNorm shapes real networks have.

Defined here so that tests, the CLI, examples and benchmarks need no download
and no torchvision. Layer layouts follow the published architectures (ResNet,
ResNeXt, MobileNetV2, EfficientNet's MBConv, U-Net); ``width`` scales every
channel count so that tests can use tiny versions of the same graphs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MODELS", "ModelSpec", "build", "randomize_bn", "ResNet", "MobileNetV2",
           "UNet", "MLPBN", "EfficientNetLite", "Detector"]


def conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act is not None:
        layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.SiLU) else act())
    return nn.Sequential(*layers)


# --- ResNet / ResNeXt --------------------------------------------------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, groups: int = 1,
                 base_width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(c_in, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, groups: int = 1,
                 base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(c_in, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class ResNet(nn.Module):
    """torchvision's ResNet layout; ``width`` is the stem's channels (64 there)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int],
                 num_classes: int = 1000, width: int = 64, groups: int = 1,
                 width_per_group: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = width
        stages = []
        for i, n in enumerate(layers):
            planes = width * 2 ** i
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(c_in, planes, stride, groups, width_per_group))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        self.out_channels = [width * 2 ** i * block.expansion for i in range(4)]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c5 = self.features(x)[-1]
        return self.fc(torch.flatten(self.avgpool(c5), 1))


# --- MobileNetV2 (depthwise) and an EfficientNet-style MBConv net (SiLU) ------

class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int,
                 act: type[nn.Module] = nn.ReLU6, se: bool = False) -> None:
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(c_in, hidden, 1, act=act))
        layers.append(conv_bn(hidden, hidden, 3, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcite(hidden, max(1, c_in // 4)))
        layers.append(conv_bn(hidden, c_out, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(nn.functional.silu(self.reduce(s))))


def _mbconv_net(settings: list[tuple[int, int, int, int]], width: float, act: type[nn.Module],
                se: bool, stem: int, head: int, num_classes: int) -> nn.Sequential:
    def ch(c: int) -> int:
        return max(8, int(c * width + 4) // 8 * 8)

    layers: list[nn.Module] = [conv_bn(3, ch(stem), 3, 2, act=act)]
    c_in = ch(stem)
    for expand, c, n, s in settings:
        for i in range(n):
            layers.append(InvertedResidual(c_in, ch(c), s if i == 0 else 1, expand, act, se))
            c_in = ch(c)
    layers += [conv_bn(c_in, ch(head), 1, act=act), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(ch(head), num_classes)]
    return nn.Sequential(*layers)


def MobileNetV2(num_classes: int = 1000, width: float = 1.0) -> nn.Sequential:
    """MobileNetV2's layout: expand 1×1, depthwise 3×3, project 1×1, ReLU6."""
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    return _mbconv_net(settings, width, nn.ReLU6, False, 32, 1280, num_classes)


def EfficientNetLite(num_classes: int = 1000, width: float = 1.0) -> nn.Sequential:
    """EfficientNet-B0's MBConv layout with SiLU and squeeze-excite (kernels all 3×3)."""
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 40, 2, 2), (6, 80, 3, 2),
                (6, 112, 3, 1), (6, 192, 4, 2), (6, 320, 1, 1)]
    return _mbconv_net(settings, width, nn.SiLU, True, 32, 1280, num_classes)


# --- U-Net with transposed convs ----------------------------------------------

class UNet(nn.Module):
    """A four-level U-Net; the decoder upsamples with ConvTranspose2d→BN→ReLU."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: int = 32) -> None:
        super().__init__()
        chans = [width * 2 ** i for i in range(4)]
        self.down = nn.ModuleList()
        c_in = in_channels
        for c in chans:
            self.down.append(nn.Sequential(conv_bn(c_in, c), conv_bn(c, c)))
            c_in = c
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.up.append(nn.Sequential(nn.ConvTranspose2d(c * 2, c, 2, 2, bias=False),
                                         nn.BatchNorm2d(c), nn.ReLU(inplace=True)))
            self.merge.append(nn.Sequential(conv_bn(c * 2, c), conv_bn(c, c)))
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], 1))
        return self.head(x)


# --- MLP with Linear→BatchNorm1d ------------------------------------------------

class MLPBN(nn.Module):
    def __init__(self, in_features: int = 256, hidden: int = 512, depth: int = 3,
                 num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_features
        for _ in range(depth):
            layers += [nn.Linear(c_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            c_in = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# --- A detector: ResNet backbone, FPN, shared head --------------------------------

class Detector(nn.Module):
    """RetinaNet-shaped: ResNet features C2–C5, an FPN, a shared conv head per level."""

    def __init__(self, backbone: ResNet | None = None, fpn: int = 256, num_anchors: int = 9,
                 num_classes: int = 80, head_convs: int = 2) -> None:
        super().__init__()
        self.backbone = backbone or ResNet(Bottleneck, [3, 4, 6, 3])
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn, 1) for c in self.backbone.out_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(fpn, fpn, 3, padding=1)
                                    for _ in self.backbone.out_channels)
        self.head = nn.Sequential(*[conv_bn(fpn, fpn) for _ in range(head_convs)])
        self.cls = nn.Conv2d(fpn, num_anchors * num_classes, 3, padding=1)
        self.box = nn.Conv2d(fpn, num_anchors * 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.backbone.features(x)
        laterals = [lat(f) for lat, f in zip(self.lateral, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + nn.functional.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        outs = []
        for smooth, lat in zip(self.smooth, laterals):
            h = self.head(smooth(lat))
            outs += [self.cls(h), self.box(h)]
        return outs


# --- Registry -------------------------------------------------------------------

class RoutedNet(nn.Module):
    """Blocks dispatched one by one from a Python loop with a data-dependent choice
    between them, as detector codebases route their layers. Dynamo breaks the
    graph at the choice and compiles the blocks' forward once per block (each has
    its own dilation, a constant in the graph): past its recompile limit (8) the
    remaining blocks run eagerly, outside every compiled graph."""

    def __init__(self, depth: int = 12, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, width, stride=2)
        self.blocks = nn.ModuleList(_Dilated(width, dilation=i + 1) for i in range(depth))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            y = block(x)
            x = y + x if y.mean() > x.mean() else y  # the routing: a graph break
        return self.head(x.mean((2, 3)))


class _Dilated(nn.Module):
    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.dilation = dilation
        self.conv = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]   # one sample, without the batch axis
    batch: int                     # default batch for the CLI
    about: str


MODELS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec(lambda: ResNet(BasicBlock, [2, 2, 2, 2]), (3, 160, 160), 8,
                          "ResNet-18 layout (BasicBlock, ReLU), 20 conv-BN pairs"),
    "resnet50": ModelSpec(lambda: ResNet(Bottleneck, [3, 4, 6, 3]), (3, 160, 160), 8,
                          "ResNet-50 layout (Bottleneck, ReLU), 53 conv-BN pairs"),
    "resnext50": ModelSpec(lambda: ResNet(Bottleneck, [3, 4, 6, 3], groups=32,
                                          width_per_group=4), (3, 128, 128), 8,
                           "ResNeXt-50 32x4d layout (grouped 3x3 convs)"),
    "mobilenet_v2": ModelSpec(MobileNetV2, (3, 160, 160), 8,
                              "MobileNetV2 layout (depthwise convs, ReLU6)"),
    "efficientnet_lite": ModelSpec(EfficientNetLite, (3, 160, 160), 8,
                                   "EfficientNet-B0-like MBConv (SiLU, squeeze-excite)"),
    "unet": ModelSpec(UNet, (3, 128, 128), 4,
                      "U-Net, decoder with ConvTranspose2d-BN"),
    "mlp_bn": ModelSpec(MLPBN, (256,), 64, "MLP with Linear-BatchNorm1d"),
    "resnet_tiny": ModelSpec(lambda: ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10,
                                            width=8), (3, 32, 32), 4,
                             "ResNet-18 layout at width 8, one block a stage (tests)"),
    "detector": ModelSpec(lambda: Detector(ResNet(Bottleneck, [3, 4, 6, 3]), fpn=128,
                                           num_classes=20), (3, 384, 384), 1,
                          "ResNet-50 + FPN + shared conv-BN head (detection)"),
    "routed": ModelSpec(RoutedNet, (3, 64, 64), 4,
                        "12 blocks dispatched from a Python loop with data-dependent routing"),
}


def build(name: str) -> tuple[nn.Module, tuple[int, ...], int]:
    """``(model, input_shape, batch)`` for a name of :data:`MODELS`."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    spec = MODELS[name]
    return spec.factory(), spec.input_shape, spec.batch


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm and InstanceNorm non-trivial running statistics (where it
    tracks them) and affine parameters (where it has them), as a pretrained network
    has (fresh ones are the identity, which hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        # _NormBase: the base of nn.BatchNorm*d, SyncBatchNorm and nn.InstanceNorm*d
        if isinstance(module, nn.modules.batchnorm._NormBase):
            n = module.num_features
            if module.running_mean is not None:
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            if module.affine:
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model
