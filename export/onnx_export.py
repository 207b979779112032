"""Export one PyTorch module to ONNX, and prove the file is right before anyone serves it.

``export_onnx`` always runs the ONNX checker, compares ONNX Runtime against PyTorch on random and
real inputs with an explicit tolerance, and counts FLOPs from the graph, cross-checked against
``torch.utils.flop_counter``. A failed check raises: a package is never written from a bad file.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from export.flops import count_flops, count_params
from training.onnx_import import ort_max_difference

logger = logging.getLogger(__name__)


class ExportCheckError(RuntimeError):
    """The exported graph does not match PyTorch, or FLOP counts disagree."""


@dataclass(frozen=True)
class ExportReport:
    path: Path
    flops: int  # per image, counted from the ONNX graph
    torch_flops: int  # per image, torch.utils.flop_counter
    params: int
    max_abs_diff: float  # ONNX Runtime vs PyTorch over all parity inputs
    input_shape: list[int | str]
    output_shape: list[int | str]


def torch_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape))
    return int(counter.get_total_flops())


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_shape: tuple[int, ...],
    input_name: str = "input",
    output_name: str = "output",
    extra_outputs: tuple[str, ...] = (),
    opset: int = 17,
    real_inputs: np.ndarray | None = None,
    atol: float = 1e-4,
    flop_rtol: float = 0.01,
    check: bool = True,
) -> ExportReport:
    """Write ``model`` (eval mode, dynamic batch axis) to ``path`` and verify it.

    ``input_shape`` excludes the batch axis. A model that returns a tuple names its outputs
    ``output_name`` then ``extra_outputs``; parity covers every output. ``real_inputs`` (N, *input_shape) float32 are compared
    besides a random batch. Uses the TorchScript-based exporter (``dynamo=False``): it folds
    BatchNorm into convolutions, needs no onnxscript at run time and exports these plain CNNs in a
    fraction of a second, which keeps the end-to-end test fast.
    """
    path = Path(path)
    model = model.eval()
    example = torch.randn(2, *input_shape)
    outputs = [output_name, *extra_outputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), input_names=[input_name], output_names=outputs,
            dynamic_axes={input_name: {0: "N"}, **{o: {0: "N"} for o in outputs}}, opset_version=opset,
            do_constant_folding=True, dynamo=False,
        )
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    flops = count_flops(graph)
    ref_flops = torch_flops(model, input_shape)
    if check and ref_flops and abs(flops - ref_flops) > flop_rtol * ref_flops:
        raise ExportCheckError(f"{path.name}: ONNX graph has {flops} FLOPs, torch counts "
                               f"{ref_flops} (more than {flop_rtol:.0%} apart)")
    inputs = [np.random.default_rng(0).standard_normal((3, *input_shape)).astype(np.float32)]
    if real_inputs is not None and len(real_inputs):
        inputs.append(np.ascontiguousarray(real_inputs, dtype=np.float32))
    worst = ort_max_difference(model, path, inputs)
    if check and worst > atol:
        raise ExportCheckError(f"{path.name}: ONNX Runtime differs from PyTorch by {worst:.2e} "
                               f"(tolerance {atol:.0e})")
    with torch.no_grad():
        first = model(example)
        out_shape = ["N", *(first[0] if isinstance(first, tuple) else first).shape[1:]]
    logger.info("exported %s: %.2f MFLOPs (torch %.2f), max |diff| %.2e", path.name, flops / 1e6,
                ref_flops / 1e6, worst)
    return ExportReport(path, flops, ref_flops, count_params(graph), worst,
                        ["N", *input_shape], [*out_shape])
