"""Widen a trained ResNet without changing its function (Net2WiderNet, Chen et al., ICLR 2016).

Training a width-64 ResNet-18 from scratch takes many CPU hours; a trained width-32 one already
knows the task. Widening by an integer factor f copies every filter f times (with its BatchNorm)
and splits each consumer's weight on an input channel among that channel's copies, so every
layer's output — and the logits — stay exactly those of the narrow model. Fine-tuning then starts
from the narrow model's accuracy and uses the new capacity.

The split is random per consumer and per channel (Dirichlet, not 1/f each): with equal shares the
copies would receive equal gradients forever and the wide model would stay a narrow one.

Channel spaces follow the residual structure: the stem's output is layer1's stream; inside a stage
every block adds onto the same stream (one mapping for the stage); each block's inner width is a
space of its own; the classifier reads the last stream.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from training.models.resnet import BasicBlock, ResNet


def _split(channels: int, factor: int, gen: torch.Generator) -> torch.Tensor:
    """Shares of each of ``channels`` old channels among its ``factor`` copies; (factor·channels,),
    copy k of channel j at index k·channels + j, the shares of one channel summing to 1."""
    gamma = torch.empty(factor, channels).exponential_(generator=gen) + 0.5  # keep shares away from 0
    return (gamma / gamma.sum(0, keepdim=True)).reshape(-1)


def _widen_conv_bn(old: nn.Sequential, new: nn.Sequential, widen_in: bool, factor: int,
                   gen: torch.Generator) -> None:
    """Fill ``new`` (conv + BN, f× the outputs and, when ``widen_in``, f× the inputs) from ``old``."""
    conv_o, bn_o = old[0], old[1]
    conv_n, bn_n = new[0], new[1]
    out_idx = torch.arange(conv_n.out_channels) % conv_o.out_channels  # new output → old output
    w = conv_o.weight[out_idx]  # (f·C_out, C_in, k, k)
    if widen_in:
        in_idx = torch.arange(conv_n.in_channels) % conv_o.in_channels
        w = w[:, in_idx] * _split(conv_o.in_channels, factor, gen)[None, :, None, None]
    conv_n.weight.copy_(w)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn_n, name).copy_(getattr(bn_o, name)[out_idx])
    bn_n.num_batches_tracked.copy_(bn_o.num_batches_tracked)


@torch.no_grad()
def widen_resnet(model: ResNet, width: int, seed: int = 0) -> ResNet:
    """A ``ResNet`` of ``width`` whose function equals ``model``'s (``width`` = f × its width)."""
    if width % model.cfg.width:
        raise ValueError(f"cannot widen width {model.cfg.width} to {width}: the new width must be "
                         "a whole multiple of the old one")
    factor = width // model.cfg.width
    cfg = dataclasses.replace(model.cfg, width=width)
    wide = ResNet(cfg).train(model.training)
    gen = torch.Generator().manual_seed(seed)
    _widen_conv_bn(model.stem[0], wide.stem[0], widen_in=False, factor=factor, gen=gen)
    for name in model.stage_names[1:]:
        for old, new in zip(getattr(model, name), getattr(wide, name), strict=True):
            if not isinstance(old, BasicBlock):
                raise ValueError(f"widen_resnet handles basic blocks, got {type(old).__name__}")
            _widen_conv_bn(old.conv1, new.conv1, True, factor, gen)
            _widen_conv_bn(old.conv2, new.conv2, True, factor, gen)
            if isinstance(old.shortcut, nn.Sequential):
                _widen_conv_bn(old.shortcut, new.shortcut, True, factor, gen)
    in_idx = torch.arange(wide.fc.in_features) % model.fc.in_features
    wide.fc.weight.copy_(model.fc.weight[:, in_idx] * _split(model.fc.in_features, factor, gen))
    wide.fc.bias.copy_(model.fc.bias)
    return wide
