"""Hyper-class heads and the clustifier: the original model's tail, compressed (paper 002 Table 1).

A head takes trunk features and runs the tail stages of the original ResNet, some of them replaced,
counting from the last stage backwards, by one cheaper block each:

* ``bottleneck`` block: (1×1, m) → (3×3, m, stride s) → (1×1, c_out)
* ``compression`` block (the paper's bottleneck-compression): (3×3, m, stride s) → (1×1, 2m) → (3×3, m)
  — it also narrows the output to m channels, which shrinks the classifier too.
* ``pruned`` stage (departure from the paper): the original stage itself with the inner width of
  every basic block cut to m, keeping the filters with the largest L1 norm (Li et al., "Pruning
  Filters for Efficient ConvNets", 2017).
* ``blocks`` (either pretrained kind): keep only the first blocks of every such stage — a head cut
  in depth, not only in width, which costs less time per FLOP saved on a CPU (narrow convs run
  at a fraction of a wide conv's FLOP rate). It keeps the residual stream and starts from the
  original's weights, so a cheap head begins close to the original restricted to its cluster
  instead of from scratch — what a few CPU epochs cannot teach a from-scratch head.

``original`` stages are copies of the original model's stages and start from its weights, and
when the last stage is kept the classifier starts from the original's rows for the head's classes,
so the ``original`` head begins exactly as the original model restricted to the cluster.
Departure from the paper: replaced blocks always get a projection shortcut (the paper adds a skip
only when channels match); it trains faster from scratch and costs one 1×1 conv.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from training.models.resnet import BasicBlock, ResNet, conv_bn, init_weights

BLOCK_KINDS = ("original", "bottleneck", "compression", "pruned")
PRETRAINED_KINDS = ("original", "pruned")  # kinds that start from the original's weights


@dataclass(frozen=True)
class HeadArch:
    name: str  # e.g. "original", "bottleneck", "compression"
    replace: tuple[str, ...] = ()  # block kind for the last stage, the one before it, ...; others stay original
    mid_ratio: float = 0.5  # inner channels of a replaced block = mid_ratio × the stage's channels
    blocks: int = 0  # blocks kept in each original/pruned stage (0 = all): layer pruning, the depth cut

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"head name {self.name!r}: use letters, digits, '.', '_' and '-' "
                             "(it names the head's files)")
        if self.blocks < 0:
            raise ValueError(f"head {self.name!r}: blocks must be >= 0 (0 keeps all), got {self.blocks}")
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


CHANNEL_MULTIPLE = 16  # inner widths are multiples of this: what oneDNN's and MLAS's kernels tile by


def inner_width(ratio: float, width: int) -> int:
    """``ratio × width`` rounded to a multiple of ``CHANNEL_MULTIPLE`` (at least one), ≤ ``width``."""
    return min(width, max(CHANNEL_MULTIPLE, CHANNEL_MULTIPLE * round(ratio * width / CHANNEL_MULTIPLE)))


def shorten_stage(stage: nn.Sequential, blocks: int) -> nn.Sequential:
    """A copy of ``stage`` with its first ``blocks`` blocks (0 = all).

    The first block carries the stride and the projection shortcut; the later ones are identity-
    shortcut refinements, so dropping them keeps every shape (LayerPrune, ACCV 2020: removing
    whole blocks saves more latency than thinning them at equal FLOPs).
    """
    kept = list(stage)[:blocks] if blocks else list(stage)
    return nn.Sequential(*copy.deepcopy(kept))


def prune_stage(stage: nn.Sequential, mid_ratio: float) -> nn.Sequential:
    """A copy of ``stage`` whose basic blocks keep ``mid_ratio`` of their inner filters.

    Filters are ranked by the L1 norm of conv1's weight times its BN scale (the filter's
    effective size); conv1/BN1 keep those rows, conv2 keeps those input channels. Shortcuts and
    block outputs are untouched, so the stage still reads and writes the original's channels.
    """
    blocks = []
    for block in stage:
        if not isinstance(block, BasicBlock):
            raise ValueError(f"pruned stages need basic blocks, got {type(block).__name__}")
        conv1, bn1 = block.conv1[0], block.conv1[1]
        width = conv1.out_channels
        mid = inner_width(mid_ratio, width)
        scale = (bn1.weight / torch.sqrt(bn1.running_var + bn1.eps)).abs()  # (width,)
        importance = conv1.weight.abs().sum(dim=(1, 2, 3)) * scale
        keep = torch.sort(torch.topk(importance, min(mid, width)).indices).values
        new = BasicBlock(conv1.in_channels, block.conv2[0].out_channels, conv1.stride[0], mid=len(keep))
        with torch.no_grad():
            new.conv1[0].weight.copy_(conv1.weight[keep])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(new.conv1[1], name).copy_(getattr(bn1, name)[keep])
            new.conv2[0].weight.copy_(block.conv2[0].weight[:, keep])
            new.conv2[1].load_state_dict(block.conv2[1].state_dict())
            new.shortcut = copy.deepcopy(block.shortcut)
        blocks.append(new)
    return nn.Sequential(*blocks)


class ClusterPool(nn.Module):
    """Class logits (B, C) → cluster log-probabilities (B, K): log Σ_{c ∈ cluster} softmax_c.

    A clustifier built on the original's tail and classifier starts out as the original's own
    cluster prediction (its probability mass on each cluster), then is trained for clusters.
    """

    def __init__(self, groups: list[list[int]], num_classes: int) -> None:
        super().__init__()
        assign = torch.zeros(num_classes, len(groups))  # (C, K) membership
        for k, members in enumerate(groups):
            assign[members, k] = 1.0
        self.register_buffer("assign", assign / assign.sum(1, keepdim=True).clamp_min(1.0))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.softmax(logits, dim=1) @ self.assign + 1e-8)


class HeadNet(nn.Module):
    """Tail stages (original, pruned or replaced) → global average pool → linear over ``num_outputs``.

    ``classes``: a head's member classes (its classifier starts from those rows of the original's).
    ``groups``: a clustifier's clusters; with a pretrained last stage it outputs cluster
    log-probabilities through ``ClusterPool`` (softmax of them is the cluster probability)."""

    def __init__(self, original: ResNet, split_after: str, arch: HeadArch, num_outputs: int,
                 classes: list[int] | None = None, groups: list[list[int]] | None = None) -> None:
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
            if kind in PRETRAINED_KINDS:
                if c_in != stage_in(k):
                    raise ValueError(f"head {arch.name!r}: an {kind} stage cannot follow a "
                                     "compression block (channel counts differ)")
                block = shorten_stage(stage, arch.blocks)
                if kind == "pruned":
                    block = prune_stage(block, arch.mid_ratio)
                c_out = c_stage
            else:
                mid = inner_width(arch.mid_ratio, c_stage)
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
        pretrained = kinds[-1] in PRETRAINED_KINDS
        # A clustifier (``groups``) on a pretrained tail keeps the original's 200-way classifier
        # and pools it into clusters; otherwise the classifier has one row per output.
        self.cluster_pool = ClusterPool(groups, original.cfg.num_classes) \
            if groups is not None and pretrained else None
        rows = original.cfg.num_classes if self.cluster_pool is not None else num_outputs
        self.fc = nn.Linear(c_in, rows)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        if pretrained and (classes is not None or self.cluster_pool is not None):
            keep = classes if classes is not None else list(range(rows))
            with torch.no_grad():  # start from the original classifier (restricted to the cluster)
                self.fc.weight.copy_(original.fc.weight[keep])
                self.fc.bias.copy_(original.fc.bias[keep])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.fc(self.pool(self.body(features)))  # (B, rows)
        return logits if self.cluster_pool is None else self.cluster_pool(logits)  # (B, outputs)


class WithClassLogits(nn.Module):
    """A ``ClusterPool`` clustifier that also returns the class logits it pools (for export).

    Those are a 200-way classifier computed anyway: the activator's top-5 fill scores the
    classes of heads not run with them instead of 0 (``modelpack.activator.fill_unrun``).
    """

    def __init__(self, net: HeadNet) -> None:
        super().__init__()
        if net.cluster_pool is None:
            raise ValueError("only a clustifier that pools class logits (a pretrained last stage "
                             "with groups) has class logits to export")
        self.net = net

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.net
        logits = net.fc(net.pool(net.body(features)))  # (B, C)
        return net.cluster_pool(logits), logits  # (B, K), (B, C)
