"""The least a Python server can do for ``POST /classify``: a framework-free ASGI app around the
very ``PackageRunner`` the service uses.

The benchmark serves it beside the real app at concurrency 1 (``uvicorn bench.floor_app:app``),
to split the time a request spends outside ONNX Runtime in two: what any Python HTTP server on
this machine pays (uvicorn with uvloop and httptools, the loopback socket, PNG decoding, a JSON
answer, the load generator sharing the cores) and what the service adds on top (the metrics and
error middlewares, the upload limits, the micro-batcher, metrics, the full response; FastAPI's
routing and validation only for requests the /classify fast path leaves to it). A target that
even this floor misses cannot be met by trimming the service.

A measuring instrument, not a product: no limits, no error handling worth the name, no metrics,
no batching, one τ (``CPCNN_TAU`` or the package's) and only the fields the load generator reads.
"""

from __future__ import annotations

import io
import json
import os
import time
from urllib.parse import parse_qs

import numpy as np
from PIL import Image
from starlette.types import Receive, Scope, Send

from modelpack.backend import RunnerOptions
from modelpack.runner import PackageRunner

_runner: PackageRunner | None = None
_tau = 0.0  # CPCNN_TAU or the package's default, read at start-up


def _load() -> None:
    global _runner, _tau
    # The service's variables for what runs the graphs, so the floor runs the model alike.
    env = os.environ.get
    options = RunnerOptions(backend=env("CPCNN_BACKEND", "onnxruntime"),
                            precision=env("CPCNN_PRECISION", "auto"),
                            threads=int(env("CPCNN_INTRA_OP_THREADS", "0")))
    runner = PackageRunner(os.environ["CPCNN_MODEL_DIR"], options, verify=False)
    runner.warmup()
    _tau = float(os.environ.get("CPCNN_TAU", runner.manifest.activator.default_tau))
    _runner = runner


def _classify(body: bytes, mode: str, tau: float) -> bytes:
    """Decode one image, run it, answer the top 5 classes and the FLOPs as JSON."""
    assert _runner is not None
    pixels = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))[None]
    result = _runner.run_original(pixels) if mode == "original" else _runner.run(pixels, tau)
    prediction = result.predictions[0]
    top = np.argsort(-prediction.scores)[:5]
    return json.dumps({"results": [{
        "top": [[int(i), float(prediction.scores[i])] for i in top],
        "flops": {"total": prediction.flops.total, "saving": prediction.flops.saving}}]}).encode()


async def _reply(send: Send, status: int, body: bytes, seconds: float | None = None) -> None:
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if seconds is not None:
        headers.append((b"server-timing", f"total;dur={seconds * 1e3:.3f}".encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            _load()
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["method"] != "POST" or scope["path"] != "/classify":  # /readyz for the launcher
        await _reply(send, 200 if _runner else 503, b"{}")
        return
    t0 = time.perf_counter()
    query = parse_qs(scope["query_string"].decode())
    answer = _classify(body, query.get("mode", ["conditional"])[0], _tau)
    await _reply(send, 200, answer, time.perf_counter() - t0)
