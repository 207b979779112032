"""Service settings: one ``Settings(BaseSettings)`` read from ``CPCNN_*`` environment variables.

Every setting is documented in ``service/README.md``. ``get_settings()`` is cached, so the
environment is read once per process; tests pass a ``Settings(...)`` to ``create_app``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import onnxruntime as ort
from fastapi import FastAPI
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from modelpack.backend import RunnerOptions
from modelpack.manifest import default_model_dir
from service.errors import StartupError
from service.tau_controller import ControllerConfig

BYTES_PER_DECODED_PIXEL = 6


def memory_bytes() -> int:
    """Physical memory of this machine (or 8 GiB where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class Settings(BaseSettings):
    """Configuration of one server process (env prefix ``CPCNN_``)."""

    model_config = SettingsConfigDict(env_prefix="CPCNN_", extra="forbid", frozen=True)

    model_dir: Path = Field(
        default_factory=default_model_dir, description="Model package directory (holds manifest.json)."
    )
    models_root: Path | None = Field(
        default=None, description="Directory whose sub-directories POST /admin/reload may load; "
        "unset: the parent of model_dir.")
    host: str = Field(default="127.0.0.1", description="Interface `python -m service` binds.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port `python -m service` binds.")
    admin_token: SecretStr | None = Field(
        default=None, description="Bearer token for /admin/*; unset or empty disables admin."
    )
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="ONNX Runtime execution providers in order, comma-separated; empty: CUDA "
        "when available, else CPU.",
    )
    backend: Literal["onnxruntime", "openvino", "auto"] = Field(
        default="onnxruntime", description="What runs the graphs: ONNX Runtime, OpenVINO (needs "
        "the openvino extra) or auto (OpenVINO where it is installed and the CPU computes bf16, "
        "else ONNX Runtime; bench/README.md has the measurements).")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        default="auto", description="OpenVINO's compute precision: bf16 is faster and may move a "
        "close top-1 (the card's bf16 sweep says how much); auto: bf16 where the CPU has it. "
        "ONNX Runtime always computes in fp32.")
    intra_op_threads: int = Field(default=0, ge=0, description="Threads per graph (0: one per core).")
    inter_op_threads: int = Field(default=1, ge=0, description="ORT inter-op threads.")
    io_binding: bool | None = Field(
        default=None, description="ORT IOBinding: trunk features stay on the device for the "
        "clustifier and heads. Unset: on when the trunk runs on CUDA.")
    inference_concurrency: int = Field(
        default=1, ge=1, description="Inference calls allowed to run at once (worker threads)."
    )
    batching: bool = Field(
        default=True, description="Dynamic micro-batching of concurrent requests (false: each "
        "request runs alone).")
    max_batch_size: int = Field(default=32, ge=1, le=1024,
                                description="Most images in one micro-batch.")
    max_batch_delay_ms: float = Field(
        default=2.0, ge=0.0, le=1000.0, allow_inf_nan=False,
        description="Longest a request waits for others to join its batch (milliseconds).")
    verify_checksums: bool = Field(default=True, description="Check every file's sha256 on load.")
    tau: float | None = Field(
        default=None, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Initial τ; unset: the package's default_tau.",
    )
    tau_controller: ControllerConfig | None = Field(
        default=None,
        description='Start the τ controller with this JSON, e.g. {"p95_ms": 40, "tau_min": 0.3} '
        'or {"mflops_per_s": 20000}; unset: off (PUT /admin/tau/controller starts it later).',
    )
    default_top_k: int = Field(default=5, ge=1, description="top_k when a request gives none.")
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1, description="Largest request body.")
    max_files: int = Field(default=16, ge=1, description="Most images in one request.")
    max_image_pixels: int = Field(
        default=40_000_000, ge=1, description="Largest decoded image (width x height): bomb guard."
    )
    max_request_pixels: int = Field(
        default=100_000_000, ge=1, description="Most pixels one request's images may declare in "
        "all (width x height summed, from their headers): what one request may make the server "
        "decode.")
    max_image_side: int = Field(
        default=16384, ge=1, description="Longest image side (width or height) in pixels.")
    max_in_flight: int = Field(
        default=64, ge=1, description="Most inference requests (/classify, V2 infer) being read, "
        "decoded or run at once; more answer 503 overloaded with Retry-After, before their body "
        "is read.")
    max_pixels_in_flight: int | None = Field(
        default=None, ge=1, description="Most pixels (as image headers declare them) being "
        "decoded at once over all requests; a request that would pass it answers 503 overloaded. "
        "At least CPCNN_MAX_REQUEST_PIXELS. Unset: a quarter of the machine's memory at "
        f"{BYTES_PER_DECODED_PIXEL} bytes a pixel (RGB and the decoder's working copy).")
    decode_budget_s: float = Field(
        default=5.0, gt=0.0, le=600.0, allow_inf_nan=False,
        description="Most seconds decoding one request's images may take; beyond it the request "
        "is refused (413 decode_budget_exceeded).")
    body_timeout_s: float = Field(
        default=30.0, gt=0.0, le=3600.0, allow_inf_nan=False,
        description="Longest the server waits for a request's body to arrive in full (408 after).")
    header_timeout_s: float = Field(
        default=10.0, gt=0.0, le=3600.0, allow_inf_nan=False,
        description="Longest a connection may take to send a request's headers, a new one "
        "included: then it is closed. Only with `python -m service` / `make serve`.")
    keep_alive_s: float = Field(
        default=5.0, gt=0.0, le=3600.0, allow_inf_nan=False,
        description="Longest an idle keep-alive connection stays open between requests.")
    reload_timeout_s: float = Field(
        default=120.0, gt=0.0, le=3600.0, allow_inf_nan=False,
        description="Longest POST /admin/reload may take to load, check and warm a package; "
        "then it is abandoned (409 reload_timeout) and the served package stays.")
    shutdown_grace_s: float = Field(
        default=30.0, gt=0.0, le=3600.0, allow_inf_nan=False,
        description="On SIGTERM, after CPCNN_SHUTDOWN_DELAY_S: longest the server waits for "
        "requests in flight before it closes them (uvicorn's graceful-shutdown timeout, set by "
        "`python -m service`).")
    shutdown_delay_s: float = Field(
        default=0.0, ge=0.0, le=300.0, allow_inf_nan=False,
        description="On SIGTERM: seconds between readiness turning 503 and the server closing its "
        "listening socket (requests keep being served meanwhile).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level of the service's loggers."
    )

    @field_validator("model_dir")
    @classmethod
    def _model_dir_exists(cls, v: Path) -> Path:
        if not v.is_dir():
            raise ValueError(
                f"model directory {str(v)!r} does not exist or is not a directory: set "
                "CPCNN_MODEL_DIR to an exported model package (a directory with manifest.json)"
            )
        return v

    @field_validator("models_root")
    @classmethod
    def _models_root_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError(f"models root {str(v)!r} does not exist or is not a directory")
        return v

    @model_validator(mode="after")
    def _pixel_bounds_fit(self) -> Settings:
        if self.max_pixels_in_flight is None:  # frozen: set once, here
            object.__setattr__(self, "max_pixels_in_flight", max(
                self.max_request_pixels, memory_bytes() // 4 // BYTES_PER_DECODED_PIXEL))
        assert self.max_pixels_in_flight is not None
        if self.max_pixels_in_flight < self.max_request_pixels:
            raise ValueError(
                f"CPCNN_MAX_PIXELS_IN_FLIGHT ({self.max_pixels_in_flight}) is below "
                f"CPCNN_MAX_REQUEST_PIXELS ({self.max_request_pixels}): a request at the limit "
                "could never be decoded; raise the first or lower the second")
        return self

    @model_validator(mode="after")
    def _default_models_root(self) -> Settings:
        if self.models_root is None:  # frozen: set once, here
            object.__setattr__(self, "models_root", self.model_dir.parent)
        return self

    @field_validator("admin_token")
    @classmethod
    def _empty_token_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        return v if v is not None and v.get_secret_value() else None

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, v: object) -> object:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, v: list[str]) -> list[str]:
        available = ort.get_available_providers()
        unknown = [p for p in v if p not in available]
        if unknown:
            raise ValueError(
                f"execution providers {unknown} are not in this onnxruntime build; "
                f"available: {available}"
            )
        return v


def runner_options(s: Settings) -> RunnerOptions:
    """The runner's options from these settings: built once per load, handed to the runner."""
    return RunnerOptions(
        backend=s.backend, precision=s.precision, providers=tuple(s.providers) or None,
        threads=s.intra_op_threads, inter_op_threads=s.inter_op_threads,
        io_binding=s.io_binding)


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()


def describe_settings_error(error: ValidationError) -> str:
    """One line per bad setting, named by its environment variable."""
    lines = []
    for e in error.errors():
        field = str(e["loc"][0]) if e["loc"] else "?"
        lines.append(f"CPCNN_{field.upper()}: {e['msg'].removeprefix('Value error, ')}")
    return "invalid settings: " + "; ".join(lines)


def resolve_settings(app: FastAPI) -> Settings:
    """The settings this app runs with: an override (tests, ``create_app(settings)``) or the env."""
    try:
        fixed = getattr(app.state, "fixed_settings", None)
        return fixed if fixed is not None else get_settings()
    except ValidationError as e:
        raise StartupError(describe_settings_error(e)) from e
