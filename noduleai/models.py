"""3D ResNets (He et al. 2016, 3-D as in Hara et al. 2018) with a width multiplier for CPU-sized variants."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ARCHITECTURES: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet10_3d": ("basic", (1, 1, 1, 1)),
    "resnet18_3d": ("basic", (2, 2, 2, 2)),
    "resnet34_3d": ("basic", (3, 4, 6, 3)),
    "resnet50_3d": ("bottleneck", (3, 4, 6, 3)),
}
CAM_LAYERS = ("layer1", "layer2", "layer3", "layer4")


class BasicBlock3D(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(ch)
        self.conv2 = nn.Conv3d(ch, ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_ch, ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck3D(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int = 1):
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv3d(in_ch, ch, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(ch)
        self.conv2 = nn.Conv3d(ch, ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(ch)
        self.conv3 = nn.Conv3d(ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv3d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm3d(out_ch))


class ResNet3D(nn.Module):
    """A 3D ResNet classifier: stem, four residual stages (``layer1``..``layer4``), pooling, linear head.

    ``small_input`` swaps the 7^3/stride-2 stem and max-pool (for whole scans, 128^3) for a 3^3
    stride-1 stem (for ~32^3 nodule patches, where early down-sampling would erase 3 mm nodules).
    """

    def __init__(self, block: str, layers: tuple[int, int, int, int], num_classes: int = 2,
                 in_channels: int = 1, width: float = 1.0, small_input: bool = False):
        super().__init__()
        unit: type[BasicBlock3D] | type[Bottleneck3D] = BasicBlock3D if block == "basic" else Bottleneck3D
        widths = [max(4, int(round(c * width))) for c in (64, 128, 256, 512)]
        if small_input:
            self.stem = nn.Sequential(nn.Conv3d(in_channels, widths[0], 3, 1, 1, bias=False),
                                      nn.BatchNorm3d(widths[0]), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv3d(in_channels, widths[0], 7, 2, 3, bias=False),
                                      nn.BatchNorm3d(widths[0]), nn.ReLU(inplace=True),
                                      nn.MaxPool3d(3, 2, 1))
        in_ch = widths[0]
        stages = []
        for i, (ch, n) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(n):
                blocks.append(unit(in_ch, ch, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = ch * unit.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (before pooling)."""
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def build_model(arch: str, num_classes: int = 2, width: float = 1.0, small_input: bool = False) -> ResNet3D:
    """Build a named 3D ResNet (see :data:`ARCHITECTURES`)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if not 0 < width <= 4:
        raise ValueError(f"width multiplier {width} must be in (0, 4]")
    block, layers = ARCHITECTURES[arch]
    return ResNet3D(block, layers, num_classes=num_classes, width=width, small_input=small_input)


def _named(arch: str) -> Callable[..., ResNet3D]:
    def factory(num_classes: int = 2, **kwargs) -> ResNet3D:
        return build_model(arch, num_classes=num_classes, **kwargs)

    factory.__name__ = arch
    factory.__doc__ = f"The seed's ``{arch}(num_classes=2)``: {ARCHITECTURES[arch][1]} blocks per stage."
    return factory


resnet10_3d = _named("resnet10_3d")
resnet18_3d = _named("resnet18_3d")
resnet34_3d = _named("resnet34_3d")
resnet50_3d = _named("resnet50_3d")


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` takes CUDA when available, else the CPU; ``cpu`` and ``cuda`` are honoured or refused."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but no CUDA GPU is available to PyTorch")
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {requested!r}")
    return torch.device(requested)
