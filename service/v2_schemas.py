"""Pydantic models of the Open Inference Protocol (KServe V2) REST API, as this server speaks it.

The protocol's JSON objects (server/model metadata, inference request and response) plus the
names, datatypes and shapes of this model's V2 inputs and outputs. The tensor codec (JSON data,
the binary tensor data extension) lives in ``service.v2_codec``.
"""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    StrictBool,
    StrictFloat,
    StrictInt,
)

# A V2 parameter value: the protocol allows only these; structured values travel as JSON strings.
ParameterValue = StrictBool | StrictInt | StrictFloat | str
Parameters = dict[str, ParameterValue]

PLATFORM = "cpcnn"  # a trunk, a clustifier and per-cluster heads in ONNX Runtime, plus the activator
EXTENSIONS = ["binary_tensor_data", "parameters"]

# Inputs: exactly one per request, either encoded images or decoded pixels.
IMAGE_INPUT = "image"  # BYTES [N] or [N, 1]: JPEG/PNG/... files (base64 strings in JSON)
HEADER_LENGTH = "Inference-Header-Content-Length"  # binary tensor data: JSON header size
PIXELS_INPUT = "pixels"  # UINT8 [N, H, W, 3]: RGB pixels, resized/cropped to the model's size

# Outputs, in the order they are returned when a request names none.
OUTPUTS = ("probabilities", "top_k_indices", "top_k_scores", "labels")
OUTPUT_DATATYPES = {"probabilities": "FP32", "top_k_indices": "INT64", "top_k_scores": "FP32",
                    "labels": "BYTES"}


# -- errors and health ---------------------------------------------------------------------
class V2Error(BaseModel):
    error: str = Field(description="What was wrong and what to do.")


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool


# -- metadata ------------------------------------------------------------------------------
class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a variable-size dimension.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor] = Field(
        description="Alternatives: a request sends exactly one of these inputs.")
    outputs: list[MetadataTensor]


def model_metadata(name: str, version: str, num_classes: int) -> ModelMetadata:
    c = num_classes
    outputs = {"probabilities": [-1, c], "top_k_indices": [-1, -1], "top_k_scores": [-1, -1],
               "labels": [-1, -1]}
    return ModelMetadata(
        name=name, versions=[version], platform=PLATFORM,
        inputs=[MetadataTensor(name=IMAGE_INPUT, datatype="BYTES", shape=[-1]),
                MetadataTensor(name=PIXELS_INPUT, datatype="UINT8", shape=[-1, -1, -1, 3])],
        outputs=[MetadataTensor(name=o, datatype=OUTPUT_DATATYPES[o], shape=outputs[o])
                 for o in OUTPUTS],
    )


# -- inference -----------------------------------------------------------------------------
class RequestInput(BaseModel):
    name: str
    shape: list[NonNegativeInt]
    datatype: str
    parameters: Parameters | None = Field(
        default=None, description="binary_data_size: bytes of this input after the JSON header.")
    data: list[Any] | None = Field(
        default=None, description="Flat or nested row-major data; absent with binary_data_size. "
        "BYTES elements are base64 strings.")


class RequestOutput(BaseModel):
    name: str
    parameters: Parameters | None = Field(
        default=None, description="binary_data: return this output after the JSON header.")


class InferenceRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "42",
        "parameters": {"tau": 0.7, "mode": "conditional", "top_k": 3},
        "inputs": [{"name": IMAGE_INPUT, "shape": [1], "datatype": "BYTES",
                    "data": ["iVBORw0KGgo...base64 of a PNG..."]}],
        "outputs": [{"name": "top_k_indices"}, {"name": "labels"}],
    }]})

    id: str | None = None
    parameters: Parameters | None = Field(
        default=None, description="tau (number in [0, 1]) or one target to choose τ from the "
        "package's sweep (target_flop_saving, target_max_top1_loss: numbers in [0, 1]; "
        "target_mflops: a number > 0), mode ('conditional'|'original'), top_k (integer >= 1), "
        "binary_data_output (bool).")
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(default=None, description="Default: all outputs.")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = Field(default=None, description="Absent for a binary output.")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(default=None, description="The request's id, when it gave one.")
    parameters: Parameters = Field(
        description="tau, mode, top_k, flops_total, flops_original, flop_saving; JSON strings: "
        "heads (per image [[head, weight], ...]), flops (per image), latency_ms (per stage).")
    outputs: list[ResponseOutput]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined, for an OpenAPI ``openapi_extra``."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)
