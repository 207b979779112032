"""What a classification produces, as domain data (no HTTP): the routes render it, the metrics
record it. One list of stage names for both: the request's own stages around the runner's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from modelpack.manifest import Manifest
from modelpack.runner import ORIGINAL_STAGE, Prediction
from modelpack.runner import STAGES as RUNNER_STAGES

# Seconds are reported for these, in this order: decoding and preparing the images, waiting for
# a micro-batch, the runner's stages (conditional mode) or the original model (original mode).
STAGES: tuple[str, ...] = ("decode", "preprocess", "queue", *RUNNER_STAGES, ORIGINAL_STAGE)

Mode = Literal["conditional", "original"]


@dataclass(frozen=True)
class ImageOutcome:
    filename: str | None
    prediction: Prediction
    decode_seconds: float
    preprocess_seconds: float


@dataclass(frozen=True)
class ClassifyOutcome:
    """The result of one request: per-image predictions, the τ used and where the time went."""

    manifest: Manifest  # of the package that answered (stays right across a future reload)
    mode: Mode
    tau: float | None  # None in original mode (no activator)
    images: list[ImageOutcome]
    # decode/preprocess summed over the images; inference stages once for the whole batch
    stage_seconds: dict[str, float]
    total_seconds: float

    @property
    def inference_seconds(self) -> float:
        return sum(v for k, v in self.stage_seconds.items() if k not in ("decode", "preprocess"))


