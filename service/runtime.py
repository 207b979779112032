"""The inference service: one loaded package, the current τ, and ``classify`` for the routes.

Routes call ``InferenceService.classify`` (or ``classify_pixels``) and never touch the runner or an
ONNX Runtime session. Each request:

1. takes the current (package, τ) once, together (a τ change or a hot reload applies to requests
   that start after it; a request in flight finishes on the package it started with),
2. decodes and prepares its images in a worker thread, or on the event loop when they are small
   (``service.decode``),
3. runs its images through the micro-batcher (``service.batcher``: concurrent requests share one
   model run) or, with batching off, through ``PackageRunner`` in a worker thread, limited to
   ``inference_concurrency`` calls at once; a small request while no other is in flight runs on
   the event loop instead (nobody to batch with or serve meanwhile, so no queue and no thread
   hop; ``INLINE_RUN_MAX_IMAGES``),
4. records its metrics and returns a ``ClassifyOutcome`` (domain data, no HTTP).

Hot reload (``reload``): the new package is loaded, validated and warmed up in a worker thread
beside the old one while requests keep being served, then swapped in with one reference
assignment under the lock. A package that fails any step is refused and the old one keeps serving.
The micro-batcher groups requests by (runner, mode), so a batch never mixes two packages.

Lifecycle: ``start`` → serving and ready; ``stop`` → still serving but no longer ready (readiness
503 while in-flight and late requests finish; the SIGTERM path); ``aclose`` → closed.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import anyio
import anyio.to_thread
import numpy as np
from PIL import Image

from modelpack.manifest import Manifest, PackageError
from modelpack.runner import BatchResult, PackageRunner, Prediction
from modelpack.sweep import Expected, Target, TargetUnreachable, tau_for_target
from service.admission import Admission
from service.batcher import BatchSlice, MicroBatcher
from service.decode import (
    DecodeLimits,
    decode_request,
    open_request,
    prepare,
    release_freed_memory,
)
from service.errors import (
    Conflict,
    InvalidImage,
    InvalidParameter,
    LimitExceeded,
    ModelNotReady,
    StartupError,
)
from service.json_fields import CONFLICTING
from service.metrics import Metrics
from service.settings import Settings, runner_options
from service.tau_control_loop import ControlLoop
from service.tau_controller import ControllerConfig

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


@dataclass(frozen=True)
class ReloadOutcome:
    manifest: Manifest  # of the package now served
    previous: Manifest  # of the package it replaced
    tau: float  # τ now applied to requests that give none
    seconds: float  # load + validate + warm-up


def _not_serving() -> ModelNotReady:
    return ModelNotReady("the model is not loaded yet (or shutting down); retry shortly and watch "
                         "GET /readyz")


class InferenceService:
    """Holds the runner and τ; loads in ``start`` (called from the app's lifespan)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self._runner_options = runner_options(settings)
        self.metrics = metrics
        # The lock guards the (runner, τ) pair: requests read both at once, reload and
        # PUT /admin/tau change them at once.
        self._lock = threading.Lock()
        self._runner: PackageRunner | None = None  # None before start and after aclose
        self._tau = 0.0
        self._tau_pinned = settings.tau is not None  # set by an operator: survives a reload
        self._draining = False
        self._reload_lock: anyio.Lock | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._batcher: MicroBatcher | None = None
        self._arriving = 0  # requests decoding now (event-loop thread only): the batcher waits for them
        self._active = 0  # requests inside _classify (event-loop thread only)
        self.admission = Admission(settings.max_in_flight, settings.max_pixels_in_flight,
                                   metrics.overload_rejections, metrics.decoding_pixels)
        self.control = ControlLoop(metrics, lambda: self.tau, self._store_tau)
        self._decode_limits = DecodeLimits(  # settings are frozen: built once, not per request
            max_pixels=settings.max_image_pixels, max_side=settings.max_image_side,
            max_request_pixels=settings.max_request_pixels, budget_s=settings.decode_budget_s)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load, validate and warm up the package; raise ``StartupError`` saying what is wrong."""
        self._limiter = anyio.CapacityLimiter(self.settings.inference_concurrency)
        self._reload_lock = anyio.Lock()
        try:
            runner = await anyio.to_thread.run_sync(self._load, self.settings.model_dir)
        except PackageError as e:
            raise StartupError(str(e)) from e
        m = runner.manifest
        tau = m.activator.default_tau if self.settings.tau is None else self.settings.tau
        with self._lock:
            self._runner = runner
            self._tau = tau
            self.metrics.bind_model(m, tau, runner.backend)
        if self.settings.batching:
            self._batcher = MicroBatcher(
                self._run_batch, max_batch_size=self.settings.max_batch_size,
                max_delay=self.settings.max_batch_delay_ms / 1000,
                on_batch=lambda key, n: self.metrics.batch_size.labels(mode=key[1]).observe(n),
                arriving=lambda: self._arriving)
            self._batcher.start()
        self._draining = False
        self.metrics.set_ready(True)
        logger.info("ready: %s %s, tau %.3f, on %s", m.name, m.version, tau,
                    runner.backend.describe())
        if self.settings.tau_controller is not None:
            self.control.start(self.settings.tau_controller)

    def _load(self, package_dir: Path) -> PackageRunner:
        """Load, validate and warm up one package (worker thread); ``PackageError`` says why not."""
        s = self.settings
        try:
            runner = PackageRunner(package_dir, self._runner_options, verify=s.verify_checksums)
            t0 = time.perf_counter()
            runner.warmup(max(s.max_batch_size, s.max_files) if s.batching else s.max_files)
            _warm_up_decoders(runner.manifest.input.size, self._decode_limits)
        except PackageError:
            raise
        except Exception as e:  # an ONNX file ORT cannot load, a provider that fails to start, ...
            logger.debug("loading %s failed", package_dir, exc_info=True)
            raise PackageError(
                f"could not load model package {package_dir}: {type(e).__name__}: {e}") from e
        logger.info("warm-up done in %.3f s", time.perf_counter() - t0)
        return runner

    async def reload(self, package_dir: Path) -> ReloadOutcome:
        """Load, validate and warm up ``package_dir`` beside the served package, then swap.

        Requests keep being served by the old package meanwhile; those in flight at the swap
        finish on it. τ: with the τ controller on, it carries τ over at the same expected FLOP
        saving on the new package's sweep; else one set by an operator (``CPCNN_TAU``,
        ``PUT /admin/tau`` or a stopped controller) is kept; otherwise τ follows the package,
        i.e. becomes the new package's ``default_tau``.
        ``Conflict``: the package is refused (the old one keeps serving), or another reload runs.
        """
        old = self.runner  # ModelNotReady before start / after close
        assert self._reload_lock is not None
        if self._reload_lock.locked():
            raise Conflict("another reload is running; retry when it has finished",
                           code="reload_in_progress")
        async with self._reload_lock:
            t0 = time.perf_counter()
            limit = self.settings.reload_timeout_s
            try:
                # A load stuck in a thread (a hung filesystem) cannot be stopped; past the
                # deadline it is abandoned, the lock released, and the old package keeps serving.
                with anyio.fail_after(limit):
                    runner = await anyio.to_thread.run_sync(self._load, package_dir,
                                                            abandon_on_cancel=True)
            except TimeoutError as e:
                self.metrics.reloads.labels(result="timeout").inc()
                logger.warning("reload of %s abandoned after %g s, still serving %s %s",
                               package_dir, limit, old.manifest.name, old.manifest.version)
                raise Conflict(f"loading the package took longer than {limit:g} s "
                               f"(CPCNN_RELOAD_TIMEOUT_S); still serving {old.manifest.name} "
                               f"{old.manifest.version}", code="reload_timeout") from e
            except PackageError as e:
                self.metrics.reloads.labels(result="rejected").inc()
                logger.warning("reload refused, still serving %s %s: %s", old.manifest.name,
                               old.manifest.version, e)
                raise Conflict(f"{e}; still serving {old.manifest.name} {old.manifest.version}",
                               code="package_rejected") from e
            m = runner.manifest
            with self._lock:
                if self._runner is None:  # closed while loading
                    raise _not_serving()
                previous, self._runner = self._runner, runner
                carried = self.control.rebase(previous.manifest, m)
                if carried is not None:
                    self._tau = carried
                elif not self._tau_pinned:
                    self._tau = m.activator.default_tau
                tau = self._tau
                self.metrics.bind_model(m, tau, runner.backend)
            seconds = time.perf_counter() - t0
        # Once its last request is done, the old package's sessions are freed; hand that memory
        # back to the OS, or the allocator's per-thread arenas keep it and each reload adds some.
        weakref.finalize(previous, release_freed_memory)
        self.metrics.reloads.labels(result="ok").inc()
        logger.info("reloaded: now %s %s from %s (was %s %s), tau %.3f, %.2f s", m.name, m.version,
                    package_dir, previous.manifest.name, previous.manifest.version, tau, seconds)
        return ReloadOutcome(m, previous.manifest, tau, seconds)

    def stop(self) -> None:
        """Stop answering ready; requests in flight, and any still arriving, are served."""
        self._draining = True
        self.metrics.set_ready(False)

    async def aclose(self) -> None:
        """Finish queued micro-batches, stop the batcher and release the package (after ``stop``)."""
        self.stop()
        await self.control.aclose()
        if self._batcher is not None:
            await self._batcher.stop()
            self._batcher = None
        with self._lock:
            self._runner = None

    @property
    def serving(self) -> bool:
        """A package is loaded and requests are answered (also while draining)."""
        return self._runner is not None

    @property
    def ready(self) -> bool:
        """Serving and not shutting down: what ``/readyz`` reports."""
        return self._runner is not None and not self._draining

    def snapshot(self) -> tuple[PackageRunner, float]:
        """The served runner and the current τ, read together (one request uses one pair)."""
        with self._lock:
            if self._runner is None:
                raise _not_serving()
            return self._runner, self._tau

    @property
    def runner(self) -> PackageRunner:
        """The loaded runner; ``ModelNotReady`` before start-up finished or after close."""
        return self.snapshot()[0]

    @property
    def manifest(self) -> Manifest:
        return self.runner.manifest

    # -- τ ---------------------------------------------------------------------------------
    @property
    def tau(self) -> float:
        with self._lock:
            return self._tau

    def set_tau(self, tau: float) -> float:
        """An operator sets τ for requests that start from now on (the controller, if on, stops:
        the operator pins τ); return the previous value."""
        tau = check_tau(tau)
        if not self.serving:
            raise _not_serving()
        self.control.stop("tau set by an operator")
        with self._lock:
            previous = self._tau
            self._tau_pinned = True
        self._store_tau(tau)
        logger.info("tau changed from %.4f to %.4f", previous, tau)
        return previous

    def start_controller(self, config: ControllerConfig) -> None:
        if not self.serving:
            raise _not_serving()
        self.control.start(config)

    def stop_controller(self) -> bool:
        """Stop the τ controller; τ stays where it left it, as if an operator had set it."""
        stopped = self.control.stop("stopped by an operator")
        if stopped:
            self._tau_pinned = True
        return stopped

    def _store_tau(self, tau: float) -> None:
        with self._lock:
            self._tau = float(tau)
            self.metrics.tau.set(self._tau)

    # -- inference -------------------------------------------------------------------------
    async def classify(self, images: Sequence[ImageInput], *, tau: float | None = None,
                       target: Target | None = None, mode: Mode = "conditional",
                       snapshot: tuple[PackageRunner, float] | None = None) -> ClassifyOutcome:
        """Classify encoded ``images`` at ``tau`` (None: the current τ, or the τ the package's
        sweep gives for ``target``) in ``mode``, on ``snapshot`` (a ``snapshot()`` the caller
        already took; None: take one now)."""
        if not images:
            raise InvalidParameter("no images to classify")
        datas, names = [img.data for img in images], [img.name for img in images]
        limits = self._decode_limits
        if sum(len(data) for data in datas) > INLINE_OPEN_MAX_BYTES:
            prepare = partial(decode_request, datas, names, limits,  # headers too: off the loop
                              reserve=self.admission.decoding)
            inline = False
        else:  # a small body's headers are cheap to parse here; its pixels decide where it decodes
            t0 = time.perf_counter()
            opened = open_request(datas, names, limits)
            prepare = partial(decode_request, datas, names, limits, opened=opened,
                              header_seconds=(time.perf_counter() - t0) / len(opened),
                              reserve=self.admission.decoding)
            inline = sum(img.width * img.height for img in opened) <= INLINE_PREPARE_MAX_PIXELS
        return await self._classify(prepare, [img.filename for img in images], tau, mode,
                                    inline=inline, snapshot=snapshot, target=target)

    async def classify_pixels(self, pixels: np.ndarray, *, tau: float | None = None,
                              target: Target | None = None, mode: Mode = "conditional",
                              snapshot: tuple[PackageRunner, float] | None = None,
                              ) -> ClassifyOutcome:
        """Classify decoded (N, H, W, 3) uint8 RGB ``pixels`` at ``tau`` in ``mode`` (on
        ``snapshot``, as ``classify``).

        Images of another size than the model's are prepared (shorter side resized, centre crop)
        with the same function as decoded uploads; decode time is 0.
        """
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3 or not pixels.size:
            raise InvalidImage(f"pixels must be a non-empty (N, H, W, 3) uint8 RGB array, got "
                               f"shape {list(pixels.shape)} of {pixels.dtype}")
        _, height, width, _ = pixels.shape
        if height * width > self.settings.max_image_pixels:
            raise LimitExceeded(
                f"{height}x{width} images are more pixels than the limit of "
                f"{self.settings.max_image_pixels} (CPCNN_MAX_IMAGE_PIXELS): send smaller images",
                code="image_too_large")
        if max(height, width) > self.settings.max_image_side:
            raise LimitExceeded(
                f"{height}x{width} images have a side longer than the limit of "
                f"{self.settings.max_image_side} pixels (CPCNN_MAX_IMAGE_SIDE): send smaller images",
                code="image_too_large")
        return await self._classify(partial(_prepare_pixels, pixels), [None] * len(pixels), tau,
                                    mode, inline=pixels[..., 0].size <= INLINE_PREPARE_MAX_PIXELS,
                                    snapshot=snapshot, target=target)

    async def _classify(self, prepare: Callable[[int], tuple[np.ndarray, list[tuple[float, float]]]],
                        filenames: list[str | None], tau: float | None, mode: Mode,
                        inline: bool = False,
                        snapshot: tuple[PackageRunner, float] | None = None,
                        target: Target | None = None) -> ClassifyOutcome:
        """The one request path: snapshot (package, τ) → prepare → infer → outcome.

        ``prepare(size)`` returns the (N, size, size, 3) uint8 batch and per-image
        (decode, preprocess) seconds. It runs in a worker thread, or on the event loop when
        ``inline`` (small images: the thread hop would cost more than the work).
        """
        self._active += 1  # the request is in flight until it returns or fails
        try:
            t0 = time.perf_counter()
            runner, current_tau = snapshot or self.snapshot()  # read once per request
            if target is not None:
                if tau is not None:
                    raise InvalidParameter("give tau or a target for this request, not both",
                                           code=CONFLICTING)
                tau_used = tau_for(runner.manifest, target).tau
            else:
                tau_used = current_tau if tau is None else check_tau(tau)
            if mode not in ("conditional", "original"):
                raise InvalidParameter(f"mode must be 'conditional' or 'original', got {mode!r}")
            size = runner.manifest.input.size
            if inline:
                batch, timings = prepare(size)
            else:
                self._arriving += 1  # the micro-batcher waits for requests still being prepared
                try:
                    batch, timings = await anyio.to_thread.run_sync(prepare, size)
                finally:
                    self._arriving -= 1
            result = await self.infer(runner, batch, tau_used, mode)
            outcome = ClassifyOutcome(
                manifest=runner.manifest,
                mode=mode,
                tau=tau_used if mode == "conditional" else None,
                images=[ImageOutcome(name, pred, dec, pre)
                        for name, pred, (dec, pre) in zip(filenames, result.predictions, timings,
                                                          strict=True)],
                stage_seconds={"decode": sum(t[0] for t in timings),
                               "preprocess": sum(t[1] for t in timings), **result.timings},
                total_seconds=time.perf_counter() - t0,
            )
            self.metrics.observe_classification(outcome)
            self.control.observe(outcome.total_seconds,
                                 sum(image.prediction.flops.total for image in outcome.images))
            return outcome
        finally:
            self._active -= 1

    async def infer(self, runner: PackageRunner, batch: np.ndarray, tau: float,
                    mode: Mode) -> BatchSlice:
        """Run prepared (N, S, S, 3) uint8 images: on the event loop when the request is alone
        (``_may_run_inline``), else through the micro-batcher when it is on, else in a worker
        thread."""
        run = partial(self._run_batch, (runner, mode), batch, np.full(len(batch), tau))
        if await self._may_run_inline(len(batch)):
            result = run()
        elif self._batcher is not None:
            return await self._batcher.submit(batch, tau, (runner, mode))
        else:
            result = await anyio.to_thread.run_sync(run, limiter=self._limiter)
        self.metrics.batch_size.labels(mode=mode).observe(len(batch))
        return BatchSlice(result.predictions, result.timings, len(batch))

    async def _may_run_inline(self, images: int) -> bool:
        """Whether this request's model run may run on the event loop: it is small, no other
        request is in flight and the micro-batcher has nothing queued or running, so blocking the
        loop for it delays nobody. That saves the batcher's queue and the hop to a worker thread
        and back (~0.3-0.5 ms at concurrency 1 on 2 cores, more than decoding the image).

        It yields to the loop once before the final answer: requests the server has already read
        but whose tasks have not run yet then count as in flight, instead of each looking alone
        in turn and being served one after another on the loop.
        """
        def alone() -> bool:
            return (images <= INLINE_RUN_MAX_IMAGES and self._active <= 1
                    and (self._batcher is None or self._batcher.idle))

        if not alone():
            return False
        await anyio.sleep(0)
        return alone()

    @staticmethod
    def _run_batch(key: tuple[PackageRunner, Mode], batch: np.ndarray,
                   taus: np.ndarray) -> BatchResult:
        runner, mode = key
        if mode == "original":
            return runner.run_original(batch)
        return runner.run(batch, taus)


def tau_for(manifest: Manifest, target: Target,
            within: tuple[float, float] = (0.0, 1.0)) -> Expected:
    """The τ the package's sweep gives for ``target`` (``modelpack.sweep.tau_for_target``); a 422
    ``target_unreachable`` naming the best reachable value, or ``no_tau_sweep``."""
    try:
        return tau_for_target(manifest, target, within)
    except TargetUnreachable as e:
        raise InvalidParameter(f"{e}; ask for less, or set tau directly",
                               code="target_unreachable") from e
    except ValueError as e:
        raise InvalidParameter(str(e), code="no_tau_sweep") from e


def query_target(flop_saving: float | None, max_top1_loss: float | None,
                 mflops: float | None) -> Target | None:
    """The one ``target_*`` query parameter given, as a ``Target``; None when none is."""
    given = [Target(kind, value) for kind, value in
             (("flop_saving", flop_saving), ("max_top1_loss", max_top1_loss), ("mflops", mflops))
             if value is not None]
    if len(given) > 1:
        raise InvalidParameter("give at most one of target_flop_saving, target_max_top1_loss and "
                               "target_mflops", code=CONFLICTING)
    return given[0] if given else None


def check_tau(tau: float) -> float:
    tau = float(tau)
    if not 0.0 <= tau <= 1.0:  # also False for NaN
        raise InvalidParameter(f"tau must be a number in [0, 1], got {tau}")
    return tau + 0.0  # -0.0 + 0.0 is 0.0: never echo a negative zero


# A request body of at most this many bytes has its image headers parsed on the event loop
# (bounded work: parsing cost grows with the bytes); larger ones are opened in a worker thread.
INLINE_OPEN_MAX_BYTES = 64 * 1024
# Requests whose images add up to at most this many pixels (by their headers) are decoded and
# prepared on the event loop: that takes ~0.1-0.6 ms (64-128 px PNG/JPEG on the 2-core machine),
# less than handing them to a worker thread and back. Larger ones go to a worker thread (Pillow
# releases the GIL while decoding), so one big image never stalls the loop.
INLINE_PREPARE_MAX_PIXELS = 128 * 128
# A model run of at most this many images may run on the event loop when nothing else is in
# flight, so a request that arrives meanwhile waits no longer than one small run before the loop
# reads it (bench/README.md: the measurements behind it; 0 sends every run to a worker thread).
INLINE_RUN_MAX_IMAGES = 4


def _warm_up_decoders(size: int, limits: DecodeLimits) -> None:
    """Decode a tiny PNG and JPEG once, so the first request pays no Pillow plugin start-up."""
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.new("RGB", (size + 3, size + 1), (127, 127, 127)).save(buf, format=fmt)
        decode_request([buf.getvalue()], ["warm-up image"], limits, size)


def _prepare_pixels(pixels: np.ndarray, size: int) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Decoded (N, H, W, 3) uint8 → (N, size, size, 3), resized like uploads when H, W differ."""
    if pixels.shape[1:3] == (size, size):
        return np.ascontiguousarray(pixels), [(0.0, 0.0)] * len(pixels)
    arrays, timings = [], []
    for image in pixels:  # (H, W, 3)
        t0 = time.perf_counter()
        arrays.append(prepare(Image.fromarray(image), size))
        timings.append((0.0, time.perf_counter() - t0))
    return np.stack(arrays), timings  # (N, size, size, 3)
