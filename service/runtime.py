"""The request scheduler: ``classify`` for the routes, on the model slot (``service.model_slot``:
the package, τ, reload and lifecycle).

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

The micro-batcher groups requests by (runner, mode), so a batch never mixes two packages during
a hot reload.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import partial

import anyio
import anyio.to_thread
import numpy as np

from modelpack.runner import BatchResult, PackageRunner
from modelpack.sweep import Target
from service import intake
from service.admission import Admission
from service.batcher import BatchSlice, MicroBatcher
from service.errors import InvalidParameter
from service.intake import ImageInput
from service.json_fields import CONFLICTING
from service.metrics import Metrics
from service.model_slot import ModelSlot
from service.outcome import ClassifyOutcome, ImageOutcome, Mode
from service.settings import Settings
from service.tau_input import check_tau, tau_for

logger = logging.getLogger(__name__)

class InferenceService(ModelSlot):
    """The request scheduler on the model slot: decoding, the micro-batcher, worker threads."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        super().__init__(settings, metrics)
        self._limiter: anyio.CapacityLimiter | None = None
        self._batcher: MicroBatcher | None = None
        self._arriving = 0  # requests decoding now (event-loop thread only): the batcher waits for them
        self._active = 0  # requests inside _classify (event-loop thread only)
        self.admission = Admission(settings.max_in_flight, settings.max_pixels_in_flight,
                                   metrics.overload_rejections, metrics.decoding_pixels)

    async def start(self) -> None:
        """Load the package (``ModelSlot``), start the micro-batcher, then answer ready."""
        self._limiter = anyio.CapacityLimiter(self.settings.inference_concurrency)
        await self.load_first()
        if self.settings.batching:
            self._batcher = MicroBatcher(
                self._run_batch, max_batch_size=self.settings.max_batch_size,
                max_delay=self.settings.max_batch_delay_ms / 1000,
                on_batch=lambda key, n: self.metrics.batch_size.labels(mode=key[1]).observe(n),
                arriving=lambda: self._arriving)
            self._batcher.start()
        self.open()

    async def aclose(self) -> None:
        """Finish queued micro-batches and stop the batcher, then close the slot."""
        self.stop()
        if self._batcher is not None:
            await self._batcher.stop()
            self._batcher = None
        await super().aclose()

    # -- inference -------------------------------------------------------------------------
    async def classify(self, images: Sequence[ImageInput], *, tau: float | None = None,
                       target: Target | None = None, mode: Mode = "conditional",
                       snapshot: tuple[PackageRunner, float] | None = None) -> ClassifyOutcome:
        """Classify encoded ``images`` at ``tau`` (None: the current τ, or the τ the package's
        sweep gives for ``target``) in ``mode``, on ``snapshot`` (a ``snapshot()`` the caller
        already took; None: take one now)."""
        preparation = intake.from_bytes(images, self._decode_limits, self.admission.decoding)
        return await self._classify(preparation, tau, mode, snapshot=snapshot, target=target)

    async def classify_pixels(self, pixels: np.ndarray, *, tau: float | None = None,
                              target: Target | None = None, mode: Mode = "conditional",
                              snapshot: tuple[PackageRunner, float] | None = None,
                              ) -> ClassifyOutcome:
        """Classify decoded (N, H, W, 3) uint8 RGB ``pixels`` (``intake.from_pixels``) at ``tau``
        in ``mode`` (on ``snapshot``, as ``classify``); decode time is 0."""
        preparation = intake.from_pixels(pixels, self._decode_limits)
        return await self._classify(preparation, tau, mode, snapshot=snapshot, target=target)

    async def _classify(self, preparation: intake.Preparation, tau: float | None, mode: Mode,
                        snapshot: tuple[PackageRunner, float] | None = None,
                        target: Target | None = None) -> ClassifyOutcome:
        """The one request path: snapshot (package, τ) → prepare → infer → outcome.

        The preparation runs in a worker thread, or on the event loop when it says it is cheap
        enough (small images: the thread hop would cost more than the work).
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
            if preparation.inline:
                batch, timings = preparation.prepare(size)
            else:
                self._arriving += 1  # the micro-batcher waits for requests still being prepared
                try:
                    batch, timings = await anyio.to_thread.run_sync(preparation.prepare, size)
                finally:
                    self._arriving -= 1
            result = await self.infer(runner, batch, tau_used, mode)
            outcome = ClassifyOutcome(
                manifest=runner.manifest,
                mode=mode,
                tau=tau_used if mode == "conditional" else None,
                images=[ImageOutcome(name, pred, dec, pre)
                        for name, pred, (dec, pre) in zip(preparation.filenames, result.predictions, timings,
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


# A model run of at most this many images may run on the event loop when nothing else is in
# flight, so a request that arrives meanwhile waits no longer than one small run before the loop
# reads it (bench/README.md: the measurements behind it; 0 sends every run to a worker thread).
INLINE_RUN_MAX_IMAGES = 4
