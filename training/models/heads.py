"""Hyper-class heads and the clustifier: the original model's tail, compressed (paper 002 Table 1).

A head takes trunk features and runs the tail stages of the original ResNet, some of them replaced,
counting from the last stage backwards, by one cheaper block each:

* ``bottleneck`` block: (1×1, m) → (3×3, m, stride s) → (1×1, c_out)
* ``compression`` block (the paper's bottleneck-compression): (3×3, m, stride s) → (1×1, 2m) → (3×3, m)
  — it also narrows the output to m channels, which shrinks the classifier too.

``original`` stages are copies of the original model's stages and start from its weights, and
when the last stage is kept the classifier starts from the original's rows for the head's classes,
so the ``original`` head begins exactly as the original model restricted to the cluster.
Departure from the paper: replaced blocks always get a projection shortcut (the paper adds a skip
only when channels match); it trains faster from scratch and costs one 1×1 conv.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from training.models.resnet import ResNet, conv_bn, init_weights

BLOCK_KINDS = ("original", "bottleneck", "compression")


@dataclass(frozen=True)
class HeadArch:
    name: str  # e.g. "original", "bottleneck", "compression"
    replace: tuple[str, ...] = ()  # block kind for the last stage, the one before it, ...; others stay original
    mid_ratio: float = 0.5  # inner channels of a replaced block = mid_ratio × the stage's channels

    def __post_init__(self) -> None:
        bad = [k for k in self.replace if k not in BLOCK_KINDS]
        if bad:
            raise ValueError(f"head {self.name!r}: unknown block kinds {bad}; use {BLOCK_KINDS}")
        if not 0 < self.mid_ratio <= 4:
            raise ValueError(f"head {self.name!r}: mid_ratio must be in (0, 4], got {self.mid_ratio}")


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, mid: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(c_in, mid, 1), nn.ReLU(inplace=True),
            conv_bn(mid, mid, 3, stride), nn.ReLU(inplace=True),
            conv_bn(mid, c_out, 1),
        )
        self.shortcut = conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class Compression(nn.Module):
    def __init__(self, c_in: int, mid: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(c_in, mid, 3, stride), nn.ReLU(inplace=True),
            conv_bn(mid, 2 * mid, 1), nn.ReLU(inplace=True),
            conv_bn(2 * mid, mid, 3),
        )
        self.shortcut = conv_bn(c_in, mid, 1, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class HeadNet(nn.Module):
    """Tail stages (original or replaced) → global average pool → linear over ``num_outputs``."""

    def __init__(self, original: ResNet, split_after: str, arch: HeadArch, num_outputs: int,
                 classes: list[int] | None = None) -> None:
        super().__init__()
        first = original.split_index(split_after)
        tail = original.stages()[first:]
        channels = original.cfg.stage_channels()
        if len(arch.replace) > len(tail):
            raise ValueError(
                f"head {arch.name!r} replaces {len(arch.replace)} stages but only {len(tail)} "
                f"follow the split at {split_after!r}"
            )
        kinds = ["original"] * (len(tail) - len(arch.replace)) + list(reversed(arch.replace))
        blocks: list[nn.Module] = []
        def stage_in(k: int) -> int:  # input channels of original stage layer{k}
            return channels[0] if k == 1 else channels[k - 2]

        c_in = stage_in(first)  # trunk output channels
        for k, stage, kind in zip(range(first, first + len(tail)), tail, kinds, strict=True):
            c_stage = channels[k - 1]
            stride = 1 if k == 1 else 2
            if kind == "original":
                if c_in != stage_in(k):
                    raise ValueError(f"head {arch.name!r}: an original stage cannot follow a "
                                     "compression block (channel counts differ)")
                block = copy.deepcopy(stage)
                c_out = c_stage
            else:
                mid = max(8, int(round(arch.mid_ratio * c_stage)))
                if kind == "bottleneck":
                    block = Bottleneck(c_in, mid, c_stage, stride)
                    c_out = c_stage
                else:
                    block = Compression(c_in, mid, stride)
                    c_out = mid
                init_weights(block)
            blocks.append(block)
            c_in = c_out
        self.arch = arch
        self.kinds = kinds
        self.body = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_outputs)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        if kinds[-1] == "original" and classes is not None:
            with torch.no_grad():  # start from the original classifier restricted to the cluster
                self.fc.weight.copy_(original.fc.weight[classes])
                self.fc.bias.copy_(original.fc.bias[classes])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.body(features)))  # (B, num_outputs)
