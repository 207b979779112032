"""Execution backends: what runs a package's graphs (ONNX Runtime or OpenVINO).

The runner (``modelpack.runner``) owns the CP-CNN logic — activator, routing, Eq. 3 — and asks a
backend for four things only: the shared part (trunk and clustifier) of a batch, one head on some
of its images, the original model, and the trunk features as a host array. The manifest, the
activator, batching and the API are the same whichever backend runs.

``RunnerOptions`` is the one options object a caller builds (the service from its settings, the
bench and the offline sweep from their flags) and hands to ``PackageRunner``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

logger = logging.getLogger(__name__)

BackendName = Literal["onnxruntime", "openvino"]
BACKENDS: tuple[str, ...] = ("onnxruntime", "openvino", "auto")
Precision = Literal["fp32", "bf16", "auto"]


@dataclass(frozen=True)
class RunnerOptions:
    """How a package is executed. Nothing here changes a result beyond float rounding.

    ``backend``: ``onnxruntime``, ``openvino`` or ``auto`` (``choose_backend``). ``precision``:
    the compute precision OpenVINO uses (``bf16`` rounds activations to bfloat16 on CPUs that
    have bf16 instructions; ``auto``: bf16 where the CPU has it); ONNX Runtime always computes
    in fp32. ``providers``: ONNX Runtime execution providers (None: CUDA when present, else
    CPU). ``threads``: threads a graph may use (0: one per core).
    """

    backend: Literal["onnxruntime", "openvino", "auto"] = "onnxruntime"
    precision: Precision = "auto"
    providers: tuple[str, ...] | None = None
    threads: int = 0
    inter_op_threads: int = 1
    allow_spinning: bool = False
    io_binding: bool | None = None  # ONNX Runtime: features stay on the device (default: on CUDA)
    head_workers: int = 2  # heads of one batch run this many at once (ONNX Runtime, CPU)
    head_threads: int | None = None  # threads per head session (None: the cores split)
    wide_head_mflops: float = 40.0
    heads_at_once_mflops: float = 100.0


class Backend(Protocol):
    """A package's graphs loaded on one runtime. ``features`` are whatever the backend keeps
    them as (a host array, or an ONNX Runtime ``OrtValue`` on a GPU); ``to_host`` copies them out.
    """

    name: str  # "onnxruntime" | "openvino"
    precision: str  # "fp32" | "bf16": what the graphs compute in
    providers: list[str]  # ONNX Runtime's execution providers; OpenVINO: its device
    parallel_heads: int  # how many heads of a batch may run at once (1: one after another)

    def shared(self, x: np.ndarray) -> tuple[Any, list[np.ndarray], dict[str, float]]:
        """Trunk features, the clustifier's outputs (cluster logits, then class logits when it
        has them) and seconds per stage (``trunk``, ``clustifier``; ``trunk`` alone where both
        run as one graph)."""
        ...

    def head(self, index: int, features: Any, *, alone: bool = False) -> np.ndarray:
        """Head ``index``'s logits on ``features`` (the batch's, or a host subset of them);
        ``alone``: no other head runs beside it, so it may take every core."""
        ...

    def to_host(self, features: Any) -> np.ndarray: ...

    def original(self, x: np.ndarray) -> np.ndarray: ...

    def warm_sizes(self, largest: int) -> list[int]:
        """The batch sizes a warm-up should run (up to ``largest``) so no request pays a first run."""
        ...

    def describe(self) -> str: ...
