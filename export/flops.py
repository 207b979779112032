"""FLOPs of an ONNX graph, per image: FLOPs = 2 × multiply-accumulates of Conv, Gemm and MatMul.

Counted from the exported graph itself (what the server really runs), with shapes from ONNX shape
inference at batch size 1. Element-wise ops, pooling and activations are not counted — the same
convention as ``torch.utils.flop_counter``, which export uses as an independent cross-check.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx
from onnx import shape_inference


def _with_batch_one(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for value in m.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    del m.graph.value_info[:]
    return shape_inference.infer_shapes(m, strict_mode=True)


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    g = model.graph
    for v in [*g.input, *g.value_info, *g.output]:
        dims = v.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = [d.dim_value for d in dims]
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def count_flops(model: onnx.ModelProto | str | Path) -> int:
    """Per-image FLOPs (2 × MACs) of Conv, Gemm and MatMul nodes. Raises if a shape is unknown."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    model = _with_batch_one(model)
    shapes = _shapes(model)
    macs = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        try:
            ins = [shapes[name] for name in node.input[:2]]
            out = shapes[node.output[0]]
        except KeyError as e:
            raise ValueError(f"shape of {e} unknown for {node.op_type} node {node.name!r}") from e
        if node.op_type == "Conv":
            w = ins[1]  # (C_out, C_in / group, kH, kW)
            macs += math.prod(out) * math.prod(w[1:])
        elif node.op_type == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            k = ins[0][0] if trans_a else ins[0][1]
            macs += math.prod(out) * k
        else:  # MatMul: (..., M, K) @ (..., K, N)
            macs += math.prod(out) * ins[0][-1]
    return 2 * macs


def count_params(model: onnx.ModelProto | str | Path) -> int:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    return sum(math.prod(t.dims) for t in model.graph.initializer)
