"""Which backend runs a package, and opening it: ``auto`` resolved for this machine.

Apart from the interface (``modelpack.backend``) so that the implementations can import the
interface without a circle.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from modelpack.backend import Backend, BackendName, RunnerOptions
from modelpack.manifest import Manifest


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def choose_backend(options: RunnerOptions) -> BackendName:
    """``auto``: OpenVINO where it is installed, the CPU computes bf16 and no GPU provider was
    asked for (bench/README.md measures it ahead of ONNX Runtime there); else ONNX Runtime."""
    if options.backend != "auto":
        return options.backend
    if options.providers and any(p != "CPUExecutionProvider" for p in options.providers):
        return "onnxruntime"
    if not openvino_available():
        return "onnxruntime"
    from modelpack.openvino_backend import cpu_has_bf16

    return "openvino" if cpu_has_bf16() else "onnxruntime"


def open_backend(package_dir: Path, manifest: Manifest, options: RunnerOptions) -> Backend:
    """Load every graph of the package on the backend ``options`` names."""
    name = choose_backend(options)
    if name == "openvino":
        if not openvino_available():
            raise RuntimeError("backend 'openvino' needs the openvino package: "
                               "pip install 'cpcnn-serve[openvino]', or choose 'onnxruntime'")
        from modelpack.openvino_backend import OpenVinoBackend

        return OpenVinoBackend(package_dir, manifest, options)
    from modelpack.ort_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(package_dir, manifest, options)
