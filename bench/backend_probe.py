"""ONNX Runtime fp32 against OpenVINO fp32 and bf16 on a package's ONNX files (issue 21's probe).

Each graph at batch 1 and 32 on random inputs, 2 threads, the three runtimes in interleaved
rounds; medians. Needs ``pip install openvino`` (not a dependency of the project yet).

    python bench/backend_probe.py models/tiny-imagenet-200 original,trunk,clustifier,head0
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort


def ort_runner(path: Path, threads: int) -> Callable[[np.ndarray], object]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def openvino_runner(path: Path, threads: int, precision: str) -> Callable[[np.ndarray], object]:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda x: request.infer([x])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package", type=Path)
    p.add_argument("graphs", help="comma-separated ONNX file stems, e.g. original,trunk,head0")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    for name in args.graphs.split(","):
        path = args.package / f"{name}.onnx"
        shape = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
        for batch in (1, 32):
            x = np.random.default_rng(0).standard_normal(
                [batch] + [d if isinstance(d, int) else 1 for d in shape[1:]]).astype(np.float32)
            runners = {"ORT fp32": ort_runner(path, args.threads),
                       "OpenVINO fp32": openvino_runner(path, args.threads, "f32"),
                       "OpenVINO bf16": openvino_runner(path, args.threads, "bf16")}
            times: dict[str, list[float]] = {k: [] for k in runners}
            for _ in range(30 if batch == 1 else 8):
                for key, run in runners.items():
                    t0 = time.perf_counter()
                    run(x)
                    times[key].append(time.perf_counter() - t0)
            print(f"| {name} | {batch} | " + " | ".join(
                f"{1000 * statistics.median(v):.2f} ms" for v in times.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
