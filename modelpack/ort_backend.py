"""The ONNX Runtime backend: the CPU provider, and CUDA with IOBinding where the build has it.

Heads run on sessions whose threads divide the cores among the heads that run at once
(``RunnerOptions.head_workers``); heads big enough to split also get a session on every core for
when they run alone (``wide_head_mflops``). bench/README.md has the measurements behind both.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelpack.backend import RunnerOptions
from modelpack.manifest import Component, Manifest

logger = logging.getLogger(__name__)


def session_options(intra_op: int = 0, inter_op: int = 1,
                    allow_spinning: bool = False) -> ort.SessionOptions:
    """Options for every ONNX Runtime session of the project (runner, export check, bench):
    a thread pool of ``intra_op`` threads per session (0: one per core).

    Spinning threads answer the next op sooner but burn CPU between runs; with several sessions
    and a decoder sharing few cores that costs more than it saves (bench/README.md), so they do
    not spin unless asked. One process-wide pool (ONNX Runtime's global thread pool) was measured
    and dropped: it is fixed per process and spins, starving decoding (bench/README.md).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op
    options.inter_op_num_threads = inter_op
    options.add_session_config_entry("session.intra_op.allow_spinning",
                                     "1" if allow_spinning else "0")
    return options


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, else CPU."""
    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


class _Session:
    """One ONNX Runtime session, its single input and its outputs (the component's output first;
    a clustifier's class logits second when it has them)."""

    def __init__(self, path: Path, component: Component, options: ort.SessionOptions,
                 providers: Sequence[str]) -> None:
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        self.input_name = component.input_name
        self.output_name = component.output_name
        self.output_names = [component.output_name] + (
            [component.class_output] if component.class_output else [])
        # Where IOBinding leaves outputs: on the GPU when the session runs there.
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: x})

    def run_bound(self, x: np.ndarray | ort.OrtValue) -> list[ort.OrtValue]:
        """Run with IOBinding: a host array is copied in once, an ``OrtValue`` already on the
        device is used in place, and the outputs stay on the device for the next session."""
        binding = self.session.io_binding()
        if isinstance(x, np.ndarray):
            binding.bind_cpu_input(self.input_name, x)
        else:
            binding.bind_ortvalue_input(self.input_name, x)
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()


class OnnxRuntimeBackend:
    """Every graph of a package as an ONNX Runtime session."""

    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, package_dir: Path, manifest: Manifest, options: RunnerOptions) -> None:
        self.providers = list(options.providers) if options.providers else default_providers()
        threads = options.threads
        graph = session_options(threads, options.inter_op_threads, options.allow_spinning)
        cores = threads or os.cpu_count() or 1  # what the trunk's session gets
        workers = options.head_workers
        head_threads = options.head_threads
        if head_threads is None:
            head_threads = threads if workers <= 1 else max(1, cores // workers)
        heads = session_options(head_threads, options.inter_op_threads, options.allow_spinning)
        self._sessions = {
            role: _Session(package_dir / comp.file, comp,
                           heads if role.startswith("head") else graph, self.providers)
            for role, comp in manifest.components().items()
        }
        self.device = self._sessions["trunk"].device
        # IOBinding (default: on when the trunk runs on CUDA): the trunk's features stay on the
        # GPU and feed the clustifier and the heads there; only the small logits come back.
        self.io_binding = self.device == "cuda" if options.io_binding is None else options.io_binding
        # On a GPU the heads share one device and IOBinding keeps their inputs there: one at a time.
        self.parallel_heads = workers if workers > 1 and not self.io_binding else 1
        self._wide_heads: dict[str, _Session] = {}
        if self.parallel_heads > 1 and options.wide_head_mflops > 0 and 0 < head_threads < cores:
            self._wide_heads = {
                f"head{c.index}": _Session(package_dir / c.head.file, c.head, graph, self.providers)
                for c in manifest.clusters if c.head.flops >= options.wide_head_mflops * 1e6}

    def shared(self, x: np.ndarray) -> tuple[np.ndarray | ort.OrtValue, list[np.ndarray],
                                             dict[str, float]]:
        t0 = time.perf_counter()
        clustifier = self._sessions["clustifier"]
        if self.io_binding:
            features = self._sessions["trunk"].run_bound(x)[0]  # OrtValue (N, C', H', W') on device
            t1 = time.perf_counter()
            outputs = [o.numpy() for o in clustifier.run_bound(features)]
        else:
            features = self._sessions["trunk"](x)  # (N, C', H', W')
            t1 = time.perf_counter()
            outputs = clustifier.run_all(features)
        return features, outputs, {"trunk": t1 - t0, "clustifier": time.perf_counter() - t1}

    def head(self, index: int, features: np.ndarray | ort.OrtValue, *,
             alone: bool = False) -> np.ndarray:
        role = f"head{index}"
        session = (alone and self._wide_heads.get(role)) or self._sessions[role]
        return session.run_bound(features)[0].numpy() if self.io_binding else session(features)

    def to_host(self, features: np.ndarray | ort.OrtValue) -> np.ndarray:
        return features if isinstance(features, np.ndarray) else features.numpy()

    def original(self, x: np.ndarray) -> np.ndarray:
        return self._sessions["original"](x)

    def warm_sizes(self, largest: int) -> list[int]:
        """One size: sessions plan their memory per run, so a first run at batch 1 warms them all."""
        return [1]

    def describe(self) -> str:
        return f"onnxruntime fp32, providers {self.providers}"
