"""The inference service: one loaded package, the current τ, and ``classify`` for the routes.

Routes (``/classify`` now; KServe V2 and a micro-batcher later) call ``InferenceService.classify``
and never touch the runner or an ONNX Runtime session. Each request:

1. reads τ once (a τ change applies to requests that start after it),
2. decodes and prepares its images in a worker thread (``service.decode``),
3. runs its images through the micro-batcher (``service.batcher``: concurrent requests share one
   model run) or, with batching off, through ``PackageRunner`` in a worker thread, limited to
   ``inference_concurrency`` calls at once,
4. records its metrics and returns a ``ClassifyOutcome`` (domain data, no HTTP).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import anyio
import anyio.to_thread
import numpy as np
from PIL import Image

from service.batcher import BatchSlice, MicroBatcher
from service.decode import decode, prepare
from service.errors import (
    InvalidImage,
    InvalidParameter,
    LimitExceeded,
    ModelNotReady,
    StartupError,
)
from service.manifest import Manifest, PackageError
from service.metrics import Metrics
from service.runner import BatchResult, PackageRunner, Prediction
from service.settings import Settings

logger = logging.getLogger(__name__)

Mode = Literal["conditional", "original"]


@dataclass(frozen=True)
class ImageInput:
    """One image as it arrived: its bytes and, for multipart uploads, its file name."""

    data: bytes
    filename: str | None = None
    name: str = "image"  # how error messages refer to it ("file 2 ('cat.png')")


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


class InferenceService:
    """Holds the runner and τ; loads in ``start`` (called from the app's lifespan)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._runner: PackageRunner | None = None
        self._ready = False
        self._tau = 0.0
        self._tau_lock = threading.Lock()
        self._limiter: anyio.CapacityLimiter | None = None
        self._batcher: MicroBatcher | None = None
        self._arriving = 0  # requests decoding now (event-loop thread only): the batcher waits for them

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load, validate and warm up the package; raise ``StartupError`` saying what is wrong."""
        self._limiter = anyio.CapacityLimiter(self.settings.inference_concurrency)
        runner = await anyio.to_thread.run_sync(self._load)
        m = runner.manifest
        tau = m.activator.default_tau if self.settings.tau is None else self.settings.tau
        with self._tau_lock:
            self._runner = runner
            self._tau = tau
            self.metrics.bind_model(m, tau)
        if self.settings.batching:
            self._batcher = MicroBatcher(
                self._run_batch, max_batch_size=self.settings.max_batch_size,
                max_delay=self.settings.max_batch_delay_ms / 1000,
                on_batch=lambda key, n: self.metrics.batch_size.labels(mode=key[1]).observe(n),
                arriving=lambda: self._arriving)
            self._batcher.start()
        self._ready = True
        self.metrics.set_ready(True)
        logger.info("ready: %s %s, tau %.3f, providers %s", m.name, m.version, tau, runner.providers)

    def _load(self) -> PackageRunner:
        s = self.settings
        try:
            runner = PackageRunner(
                s.model_dir,
                providers=s.providers or None,
                intra_op_threads=s.intra_op_threads,
                inter_op_threads=s.inter_op_threads,
                allow_spinning=s.allow_spinning,
                verify=s.verify_checksums,
            )
            t0 = time.perf_counter()
            runner.warmup()
            _warm_up_decoders(runner.manifest.input.size, s.max_image_pixels)
        except PackageError as e:
            raise StartupError(str(e)) from e
        except Exception as e:  # an ONNX file ORT cannot load, a provider that fails to start, ...
            logger.debug("loading %s failed", s.model_dir, exc_info=True)
            raise StartupError(
                f"could not load model package {s.model_dir}: {type(e).__name__}: {e}"
            ) from e
        logger.info("warm-up done in %.3f s", time.perf_counter() - t0)
        return runner

    def stop(self) -> None:
        """Stop answering ready (requests already running finish normally)."""
        self._ready = False
        self.metrics.set_ready(False)

    async def aclose(self) -> None:
        """Finish queued micro-batches and stop the batcher (after ``stop``)."""
        if self._batcher is not None:
            await self._batcher.stop()
            self._batcher = None

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def runner(self) -> PackageRunner:
        """The loaded runner; ``ModelNotReady`` before start-up finished or after shutdown began."""
        if not self._ready or self._runner is None:
            raise ModelNotReady("the model is not loaded yet (or shutting down); retry shortly "
                                "and watch GET /readyz")
        return self._runner

    @property
    def manifest(self) -> Manifest:
        return self.runner.manifest

    # -- τ ---------------------------------------------------------------------------------
    @property
    def tau(self) -> float:
        with self._tau_lock:
            return self._tau

    def set_tau(self, tau: float) -> float:
        """Set τ for requests that start from now on; return the previous value."""
        check_tau(tau)
        if not self.ready:
            raise ModelNotReady("the model is not loaded yet; retry when GET /readyz answers 200")
        with self._tau_lock:
            previous, self._tau = self._tau, float(tau)
            self.metrics.tau.set(self._tau)
        logger.info("tau changed from %.4f to %.4f", previous, tau)
        return previous

    # -- inference -------------------------------------------------------------------------
    async def classify(self, images: Sequence[ImageInput], *, tau: float | None = None,
                       mode: Mode = "conditional") -> ClassifyOutcome:
        """Classify ``images`` at ``tau`` (None: the current τ) in ``mode``."""
        t0 = time.perf_counter()
        runner = self.runner
        tau_used = self.tau if tau is None else check_tau(tau)  # read once per request
        if mode not in ("conditional", "original"):
            raise InvalidParameter(f"mode must be 'conditional' or 'original', got {mode!r}")
        if not images:
            raise InvalidParameter("no images to classify")
        size = runner.manifest.input.size
        self._arriving += 1
        try:
            batch, timings = await anyio.to_thread.run_sync(
                partial(_decode_all, images, size, self.settings.max_image_pixels))
        finally:
            self._arriving -= 1
        result = await self.infer(runner, batch, tau_used, mode)
        stage_seconds = {"decode": sum(t[0] for t in timings),
                         "preprocess": sum(t[1] for t in timings), **result.timings}
        outcome = ClassifyOutcome(
            manifest=runner.manifest,
            mode=mode,
            tau=tau_used if mode == "conditional" else None,
            images=[ImageOutcome(img.filename, pred, dec, pre)
                    for img, pred, (dec, pre) in zip(images, result.predictions, timings,
                                                     strict=True)],
            stage_seconds=stage_seconds,
            total_seconds=time.perf_counter() - t0,
        )
        self.metrics.observe_classification(outcome)
        return outcome

    async def classify_pixels(self, pixels: np.ndarray, *, tau: float | None = None,
                              mode: Mode = "conditional") -> ClassifyOutcome:
        """Classify decoded (N, H, W, 3) uint8 RGB ``pixels`` at ``tau`` in ``mode``.

        Images of another size than the model's are prepared (shorter side resized, centre crop)
        with the same function as decoded uploads, in a worker thread; decode time is 0.
        """
        t0 = time.perf_counter()
        runner = self.runner
        tau_used = self.tau if tau is None else check_tau(tau)  # read once per request
        if mode not in ("conditional", "original"):
            raise InvalidParameter(f"mode must be 'conditional' or 'original', got {mode!r}")
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3 or not pixels.size:
            raise InvalidImage(f"pixels must be a non-empty (N, H, W, 3) uint8 RGB array, got "
                               f"shape {list(pixels.shape)} of {pixels.dtype}")
        n, height, width, _ = pixels.shape
        if height * width > self.settings.max_image_pixels:
            raise LimitExceeded(
                f"{height}x{width} images are more pixels than the limit of "
                f"{self.settings.max_image_pixels} (CPCNN_MAX_IMAGE_PIXELS): send smaller images",
                code="image_too_large")
        size = runner.manifest.input.size
        if (height, width) == (size, size):
            batch, timings = np.ascontiguousarray(pixels), [(0.0, 0.0)] * n
        else:
            def prepare_all() -> tuple[np.ndarray, list[tuple[float, float]]]:
                arrays, seconds = [], []
                for image in pixels:  # (H, W, 3)
                    t = time.perf_counter()
                    arrays.append(prepare(Image.fromarray(image), size))
                    seconds.append((0.0, time.perf_counter() - t))
                return np.stack(arrays), seconds  # (N, size, size, 3)

            batch, timings = await anyio.to_thread.run_sync(prepare_all)
        result = await self.infer(runner, batch, tau_used, mode)
        outcome = ClassifyOutcome(
            manifest=runner.manifest,
            mode=mode,
            tau=tau_used if mode == "conditional" else None,
            images=[ImageOutcome(None, pred, 0.0, pre)
                    for pred, (_, pre) in zip(result.predictions, timings, strict=True)],
            stage_seconds={"decode": 0.0, "preprocess": sum(t[1] for t in timings),
                           **result.timings},
            total_seconds=time.perf_counter() - t0,
        )
        self.metrics.observe_classification(outcome)
        return outcome

    async def infer(self, runner: PackageRunner, batch: np.ndarray, tau: float,
                    mode: Mode) -> BatchSlice:
        """Run prepared (N, S, S, 3) uint8 images, through the micro-batcher when it is on."""
        if self._batcher is not None:
            return await self._batcher.submit(batch, tau, (runner, mode))
        result = await anyio.to_thread.run_sync(
            partial(self._run_batch, (runner, mode), batch, np.full(len(batch), tau)),
            limiter=self._limiter)
        self.metrics.batch_size.labels(mode=mode).observe(len(batch))
        return BatchSlice(result.predictions, result.timings, len(batch))

    @staticmethod
    def _run_batch(key: tuple[PackageRunner, Mode], batch: np.ndarray,
                   taus: np.ndarray) -> BatchResult:
        runner, mode = key
        if mode == "original":
            return runner.run_original(batch)
        return runner.run(batch, taus)


def check_tau(tau: float) -> float:
    tau = float(tau)
    if not 0.0 <= tau <= 1.0:  # also False for NaN
        raise InvalidParameter(f"tau must be a number in [0, 1], got {tau}")
    return tau


def _warm_up_decoders(size: int, max_pixels: int) -> None:
    """Decode a tiny PNG and JPEG once, so the first request pays no Pillow plugin start-up."""
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.new("RGB", (size + 3, size + 1), (127, 127, 127)).save(buf, format=fmt)
        _decode_all([ImageInput(buf.getvalue(), name="warm-up image")], size, max_pixels)


def _decode_all(images: Sequence[ImageInput], size: int,
                max_pixels: int) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Decode and prepare every image: (N, size, size, 3) uint8 and (decode, preprocess) seconds."""
    arrays, timings = [], []
    for image in images:
        t0 = time.perf_counter()
        pil = decode(image.data, max_pixels=max_pixels, name=image.name)
        t1 = time.perf_counter()
        arrays.append(prepare(pil, size))
        timings.append((t1 - t0, time.perf_counter() - t1))
    return np.stack(arrays), timings
