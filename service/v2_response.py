"""The V2 response: the requested outputs as JSON data, or as binary tensor data after the JSON
header (``Inference-Header-Content-Length``), with the request's FLOPs, heads and latency as
parameters."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import Response

from service.schemas import ClassifyResponse
from service.v2_codec import InferCall
from service.v2_schemas import HEADER_LENGTH, OUTPUT_DATATYPES
from service.v2_tensors import tensor_bytes


def encode_response(call: InferCall, result: ClassifyResponse, scores: np.ndarray) -> Response:
    """The V2 response: JSON, or JSON + binary outputs when any output is binary."""
    results = result.results
    tensors: dict[str, np.ndarray] = {
        "probabilities": scores.astype(np.float32),  # (N, C)
        "top_k_indices": np.array([[p.index for p in r.predictions] for r in results],
                                  dtype=np.int64),  # (N, k)
        "top_k_scores": np.array([[p.score for p in r.predictions] for r in results],
                                 dtype=np.float32),  # (N, k)
        "labels": np.array([[p.class_name for p in r.predictions] for r in results],
                           dtype=np.object_),  # (N, k)
    }
    outputs, blobs = [], []
    for name, binary in call.outputs:
        array, datatype = tensors[name], OUTPUT_DATATYPES[name]
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = tensor_bytes(array, datatype)
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = array.ravel().tolist()
        outputs.append(out)
    body: dict[str, Any] = {"model_name": result.model.name,
                            "model_version": result.model.version}
    if call.id is not None:
        body["id"] = call.id
    body["parameters"] = response_parameters(result)
    body["outputs"] = outputs
    header = json.dumps(body).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


def response_parameters(result: ClassifyResponse) -> dict[str, bool | int | float | str]:
    """FLOPs, heads and latency of the request; structured values as JSON strings (V2 allows
    only bool/number/string parameter values)."""
    flops_total = sum(r.flops.total for r in result.results)
    flops_original = sum(r.flops.original for r in result.results)
    params: dict[str, bool | int | float | str] = {"mode": result.mode, "top_k": result.top_k}
    if result.tau is not None:
        params["tau"] = result.tau
    params.update(flops_total=flops_total, flops_original=flops_original,
                  flop_saving=1.0 - flops_total / flops_original if flops_original else 0.0)
    if result.mode == "conditional":
        params["heads"] = json.dumps([[[h.head, h.weight] for h in r.heads or []]
                                      for r in result.results])
    params["flops"] = json.dumps([r.flops.model_dump() for r in result.results])
    params["latency_ms"] = json.dumps({stage: round(seconds * 1000, 4) for stage, seconds
                                       in result.latency.model_dump(exclude_none=True).items()})
    return params
