"""The OpenVINO backend: the CPU plugin, in bf16 where the CPU has bf16 instructions.

OpenVINO reads the package's ONNX files directly. Trunk and clustifier are compiled as one model
(the clustifier's input wired to the trunk's output, the features a second output): every
boundary between compiled models costs a layout reorder and, in bf16, a conversion to fp32 and
back, and these two always run together (bench/README.md measures both ways). Heads stay models
of their own, run on the features of just the images routed to them.

A compiled model's infer requests are not thread-safe, and one request whose batch size changes
from call to call re-plans its memory every time (head0 of release 1.1.0, bf16, sizes 1-32 in a
random order: 0.78 ms at batch 1 against 0.38 ms on a request kept for that size;
bench/README.md). So each graph keeps free lists of requests per batch size: several batches may
run at once (``CPCNN_INFERENCE_CONCURRENCY``) and a request always sees the size it was planned for.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from functools import cache
from pathlib import Path

import numpy as np
import openvino as ov

from modelpack.backend import RunnerOptions
from modelpack.manifest import Manifest

logger = logging.getLogger(__name__)

_PRECISION_HINT = {"bf16": "bf16", "fp32": "f32"}


@cache
def _core() -> ov.Core:
    return ov.Core()


@cache
def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 here (avx512_bf16 or AMX)."""
    return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_precision(precision: str) -> str:
    """``auto`` → bf16 where the CPU has it, else fp32; bf16 asked for on a CPU without it is
    fp32, with a log line saying so."""
    if precision == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "bf16" and not cpu_has_bf16():
        logger.warning("precision bf16 asked for, but this CPU has no bf16 instructions: "
                       "OpenVINO computes in fp32")
        return "fp32"
    return precision


def fuse(first: ov.Model, second: ov.Model, name: str) -> ov.Model:
    """One model computing ``first`` then ``second`` on its output: outputs are ``first``'s
    output, then ``second``'s outputs."""
    (parameter,) = second.get_parameters()
    features = first.get_results()[0].input_value(0)
    for target in list(parameter.output(0).get_target_inputs()):
        target.replace_source_output(features)
    outputs = [features] + [r.input_value(0) for r in second.get_results()]
    return ov.Model(outputs, first.get_parameters(), name)


class _Graph:
    """One compiled model and free lists of its infer requests, one list per batch size."""

    def __init__(self, model: ov.Model | str, config: dict[str, object]) -> None:
        self.compiled = _core().compile_model(model, "CPU", config)
        self._outputs = list(self.compiled.outputs)
        self._idle: dict[int, queue.SimpleQueue[ov.InferRequest]] = {}
        self._lock = threading.Lock()

    def _free_list(self, size: int) -> queue.SimpleQueue[ov.InferRequest]:
        free = self._idle.get(size)
        if free is None:
            with self._lock:
                free = self._idle.setdefault(size, queue.SimpleQueue())
        return free

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        free = self._free_list(len(x))
        try:
            request = free.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            # Outputs are copied out of the request (share_outputs=False), so the request can
            # serve the next call while these arrays live on.
            result = request.infer({0: np.ascontiguousarray(x)}, share_inputs=True)
            return [result[o] for o in self._outputs]
        finally:
            free.put(request)


class OpenVinoBackend:
    """Every graph of a package compiled by OpenVINO for the CPU."""

    name = "openvino"
    providers = ["CPU"]
    # One head at a time, each on every core: two at once on a core each took 13.0 ms for the
    # heads of a batch of 32 against 8.7 ms one after another (bench/README.md).
    parallel_heads = 1

    def __init__(self, package_dir: Path, manifest: Manifest, options: RunnerOptions) -> None:
        self.precision = resolve_precision(options.precision)
        config: dict[str, object] = {
            "INFERENCE_PRECISION_HINT": _PRECISION_HINT[self.precision],
            "PERFORMANCE_HINT": "LATENCY",
        }
        if options.threads:
            config["INFERENCE_NUM_THREADS"] = options.threads
        core = _core()
        path = {role: str(package_dir / c.file) for role, c in manifest.components().items()}
        shared = fuse(core.read_model(path["trunk"]), core.read_model(path["clustifier"]),
                      "trunk+clustifier")
        self._shared = _Graph(shared, config)
        self._heads = [_Graph(path[f"head{c.index}"], config) for c in manifest.clusters]
        self._original = _Graph(path["original"], config)

    def shared(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], dict[str, float]]:
        t0 = time.perf_counter()
        features, *outputs = self._shared(x)
        return features, outputs, {"trunk": time.perf_counter() - t0}

    def head(self, index: int, features: np.ndarray, *, alone: bool = False) -> np.ndarray:
        return self._heads[index](features)[0]

    def to_host(self, features: np.ndarray) -> np.ndarray:
        return features

    def original(self, x: np.ndarray) -> np.ndarray:
        return self._original(x)[0]

    def warm_sizes(self, largest: int) -> list[int]:
        """Every batch size up to ``largest``: a request's first run at a size plans its memory
        (~3 ms for a head), which warm-up pays instead of a user's request."""
        return list(range(1, largest + 1))

    def describe(self) -> str:
        return f"openvino {ov.__version__} {self.precision} on the CPU"
