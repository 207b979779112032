"""ResNet family for small images, split into named stages so the trunk/tail cut is one index.

Stages: ``stem`` → ``layer1`` … ``layerN`` → ``pool``+``fc``. ``forward_features`` runs the
stages, ``forward_head`` pools and classifies (timm's split). The CP-CNN trunk is the stages up to
and including ``split_after``; the heads replace what follows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class ResNetConfig:
    layers: tuple[int, ...] = (2, 2, 2, 2)  # basic blocks per stage (ResNet-18 layout)
    width: int = 32  # channels of the first stage; stage i has width * 2**i
    stem_stride: int = 1  # 1 for 32x32 inputs, 2 for 64x64 (keeps the stage resolutions alike)
    num_classes: int = 100  # outputs of the classifier
    input_size: int = 32  # square input side, recorded so exports never guess

    def stage_channels(self) -> list[int]:
        return [self.width * 2**i for i in range(len(self.layers))]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ResNetConfig:
        d = dict(d)
        d["layers"] = tuple(d["layers"])
        return cls(**d)


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm: the unit every block here is built of."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut.

    ``mid`` (default ``c_out``) is the width between the two convs; a pruned copy narrows it.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, mid: int | None = None) -> None:
        super().__init__()
        mid = mid or c_out
        self.conv1 = conv_bn(c_in, mid, 3, stride)
        self.conv2 = conv_bn(mid, c_out, 3)
        self.shortcut = (
            conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        return self.act(self.conv2(y) + self.shortcut(x))


def make_stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        *[BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(blocks)]
    )


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.stage_channels()
        self.stem = nn.Sequential(conv_bn(3, ch[0], 3, cfg.stem_stride), nn.ReLU(inplace=True))
        c_prev = ch[0]
        self.stage_names = ["stem"]
        for i, (c, n) in enumerate(zip(ch, cfg.layers, strict=True)):
            setattr(self, f"layer{i + 1}", make_stage(c_prev, c, n, 1 if i == 0 else 2))
            self.stage_names.append(f"layer{i + 1}")
            c_prev = c
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_prev, cfg.num_classes)
        init_weights(self)

    def stages(self) -> list[nn.Module]:
        return [getattr(self, n) for n in self.stage_names]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages():
            x = stage(x)
        return x  # (B, C_last, H/s, W/s)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def split_index(self, split_after: str) -> int:
        """Index of the first stage after the trunk; raises with the valid names if unknown."""
        if split_after not in self.stage_names[:-1]:
            raise ValueError(
                f"split_after={split_after!r}: choose one of {self.stage_names[:-1]} "
                "(the last stage cannot be the trunk's end: heads need at least one stage)"
            )
        return self.stage_names.index(split_after) + 1


class Trunk(nn.Module):
    """The shared first stages of the original model (frozen in CP-CNN)."""

    def __init__(self, stages: list[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)


def build_trunk(model: ResNet, split_after: str) -> Trunk:
    """A frozen trunk sharing weights with ``model`` (stem … split_after)."""
    trunk = Trunk(model.stages()[: model.split_index(split_after)])
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk.eval()


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
    # Zero-init the last BN of each residual branch: blocks start as identity, trains faster.
    for m in module.modules():
        if isinstance(m, BasicBlock):
            nn.init.zeros_(m.conv2[1].weight)
