"""Store an exported graph's weights in float16 while it still computes in float32.

A width-64 ResNet-18 package holds the original (45 MB of float32 weights) beside a clustifier and
a dozen heads; half-size storage keeps it within what a repository and a download should carry.
Each large float32 initializer becomes a float16 one followed by a ``Cast`` to float32: ONNX
Runtime folds those casts into float32 constants when it builds the session, so every kernel
runs exactly as before (bench/README.md), and the only change is the rounding of the weights to
float16 (11 significant bits), checked against the float32 graph here and measured by the sweep.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from modelpack.ort_backend import session_options

MIN_ELEMENTS = 64  # smaller tensors (biases of tiny layers, shapes) stay as they are


def store_float16(path: str | Path) -> int:
    """Rewrite ``path`` with its float32 weights stored as float16; returns how many were."""
    model = onnx.load(str(path))
    graph = model.graph
    casts, kept, converted = [], [], 0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < MIN_ELEMENTS:
            kept.append(init)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                       name=f"{init.name}__fp16")
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                      name=f"{init.name}__to_fp32"))
        converted += 1
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)  # the casts first: the graph stays topologically sorted
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return converted


def compare_outputs(a: str | Path, b: str | Path, inputs: list[np.ndarray]) -> tuple[float, float]:
    """(largest |output of a − output of b|, largest |output of a|) over ``inputs`` and every
    output, on ONNX Runtime: the difference and the scale it is judged against."""
    sa, sb = (ort.InferenceSession(str(p), sess_options=session_options(),
                                   providers=["CPUExecutionProvider"]) for p in (a, b))
    name = sa.get_inputs()[0].name
    worst = scale = 0.0
    for x in inputs:
        for ya, yb in zip(sa.run(None, {name: x}), sb.run(None, {name: x}), strict=True):
            worst = max(worst, float(np.max(np.abs(ya - yb))))
            scale = max(scale, float(np.max(np.abs(ya))))
    return worst, scale
