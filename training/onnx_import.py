"""Rebuild a trainable original model from an exported ``original.onnx``.

The original takes hours on a CPU; its weights also ship in every package. Importing them lets the
CP-CNN stages (clustering, clustifier, heads …) be redone on a machine that lacks the run directory.

The export folds each BatchNorm into its conv (``do_constant_folding``), so the graph holds a conv
weight W and bias b per conv. A trainable copy needs BatchNorm back: we measure each conv's output
statistics (mean m, variance v of W∗x) on real images and set the BN to
``running_mean = m, running_var = v, weight = sqrt(v + eps), bias = m + b``. In eval mode that is
exactly ``W∗x + b``; in train mode the batch statistics are close to (m, v), so fine-tuning starts
from the original's function instead of a re-normalised one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

from modelpack.ort_backend import session_options
from training.models.resnet import ResNet, ResNetConfig

logger = logging.getLogger(__name__)


def _convs_in_call_order(model: ResNet, input_size: int) -> list[nn.Conv2d]:
    """The model's convs in the order forward() calls them: the order the tracer wrote them."""
    order: list[nn.Conv2d] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    for h in hooks:
        h.remove()
    return order


def _bn_after(model: ResNet) -> dict[nn.Conv2d, nn.BatchNorm2d]:
    """Each conv's BatchNorm (every conv here is built by ``conv_bn``: Sequential(conv, bn))."""
    pairs = {}
    for m in model.modules():
        if isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], nn.Conv2d) \
                and isinstance(m[1], nn.BatchNorm2d):
            pairs[m[0]] = m[1]
    return pairs


def _weights(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every constant of the graph as float32 arrays, by name; weights stored as float16 behind a
    ``Cast`` (``package.weights = "fp16"``, export.storage) under the name the cast produces."""
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Cast" and node.input[0] in init:
            init[node.output[0]] = init[node.input[0]].astype(np.float32)
    return init


def onnx_stem_width(onnx_path: str | Path) -> int:
    """Output channels of the graph's first conv: the ``width`` of the ResNet it was exported from."""
    graph = onnx.load(str(onnx_path)).graph
    init = _weights(graph)
    first = next((n for n in graph.node if n.op_type == "Conv"), None)
    if first is None or first.input[1] not in init:
        raise ValueError(f"{onnx_path}: no convolution with a stored weight; is it an original.onnx?")
    return int(init[first.input[1]].shape[0])


def import_original(onnx_path: str | Path, cfg: ResNetConfig, images: Iterable[torch.Tensor]) -> ResNet:
    """A ``ResNet(cfg)`` whose eval-mode function equals ``onnx_path``'s, with BN re-estimated.

    ``images`` are normalised batches (B, 3, H, W) used to measure the conv output statistics.
    Raises ValueError when the graph does not match ``cfg`` (conv count or weight shapes differ).
    """
    graph = onnx.load(str(onnx_path)).graph
    init = _weights(graph)
    conv_nodes = [n for n in graph.node if n.op_type == "Conv"]
    gemm = [n for n in graph.node if n.op_type == "Gemm"]
    model = ResNet(cfg).eval()
    convs = _convs_in_call_order(model, cfg.input_size)
    bns = _bn_after(model)
    if len(conv_nodes) != len(convs) or len(gemm) != 1:
        raise ValueError(f"{onnx_path}: {len(conv_nodes)} convs and {len(gemm)} Gemm in the graph, "
                         f"the config builds {len(convs)} convs and 1 linear; is it the same "
                         "architecture (layers, width, stem_stride)?")
    biases: dict[nn.Conv2d, torch.Tensor] = {}
    with torch.no_grad():
        for node, conv in zip(conv_nodes, convs, strict=True):
            w = torch.from_numpy(init[node.input[1]].copy())
            if tuple(w.shape) != tuple(conv.weight.shape):
                raise ValueError(f"{onnx_path}: conv weight {tuple(w.shape)} where the config "
                                 f"expects {tuple(conv.weight.shape)}")
            conv.weight.copy_(w)
            b = torch.from_numpy(init[node.input[2]].copy()) if len(node.input) > 2 \
                else torch.zeros(w.shape[0])
            biases[conv] = b
            bn = bns[conv]  # identity BN + folded bias: the graph's exact function
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            bn.weight.fill_(1.0)
            bn.bias.copy_(b)
        fc_w = torch.from_numpy(init[gemm[0].input[1]].copy())
        transposed = any(a.name == "transB" and a.i == 1 for a in gemm[0].attribute)
        model.fc.weight.copy_(fc_w if transposed else fc_w.T)
        model.fc.bias.copy_(torch.from_numpy(init[gemm[0].input[2]].copy()))

    # Statistics of W∗x (the conv output before the bias) under the exact function.
    sums = {c: torch.zeros(c.out_channels, dtype=torch.float64) for c in convs}
    sq = {c: torch.zeros(c.out_channels, dtype=torch.float64) for c in convs}
    count = {c: 0 for c in convs}

    def record(conv: nn.Conv2d, _inp: tuple, out: torch.Tensor) -> None:
        z = out.detach().double().transpose(0, 1).reshape(out.shape[1], -1)  # (C, B·H·W)
        sums[conv] += z.sum(1)
        sq[conv] += (z * z).sum(1)
        count[conv] += z.shape[1]

    hooks = [c.register_forward_hook(record) for c in convs]
    with torch.no_grad():
        for x in images:
            model(x)
    for h in hooks:
        h.remove()
    if not all(count.values()):
        raise ValueError("import_original needs at least one batch of images to measure BN statistics")
    with torch.no_grad():
        for conv in convs:
            mean = sums[conv] / count[conv]
            var = (sq[conv] / count[conv] - mean * mean).clamp_min(1e-6)
            bn = bns[conv]
            bn.running_mean.copy_(mean.float())
            bn.running_var.copy_(var.float())
            bn.weight.copy_(torch.sqrt(var + bn.eps).float())
            bn.bias.copy_((mean + biases[conv].double()).float())
    logger.info("imported %s: %d convs, BN statistics from %d positions per channel (first conv)",
                onnx_path, len(convs), count[convs[0]])
    return model


def ort_max_difference(model: nn.Module, path: str | Path, inputs: list[np.ndarray]) -> float:
    """Largest |PyTorch − ONNX Runtime| output difference of ``model`` (eval mode) and the graph at
    ``path`` over ``inputs`` (float32 batches): the export's parity check, also the import's."""
    session = ort.InferenceSession(str(path), sess_options=session_options(),
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            expected = model.eval()(torch.from_numpy(x))
        expected = expected if isinstance(expected, tuple) else (expected,)
        for got, want in zip(session.run(None, {name: x}), expected, strict=True):
            worst = max(worst, float(np.max(np.abs(got - want.numpy()))))
    return worst
