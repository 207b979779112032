"""The model slot: the served package's runner and τ, loading, hot reload and lifecycle.

One pair (runner, τ) is read together by every request (``snapshot``) and changed together by
reload and ``PUT /admin/tau``, under one lock. A reload loads, validates and warms up the new
package in a worker thread beside the old one while requests keep being served, then swaps it in
with one reference assignment; a package that fails any step is refused and the old one keeps
serving. The request scheduler (``service.runtime.InferenceService``) stands on this.

Lifecycle: ``start`` → serving and ready; ``stop`` → still serving but no longer ready (readiness
503 while in-flight and late requests finish; the SIGTERM path); ``aclose`` → closed.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
from PIL import Image

from modelpack.manifest import Manifest, PackageError
from modelpack.runner import PackageRunner
from service.decode import DecodeLimits, decode_request, release_freed_memory
from service.errors import Conflict, ModelNotReady, StartupError
from service.metrics import Metrics
from service.settings import Settings, runner_options
from service.tau_control_loop import ControlLoop
from service.tau_controller import ControllerConfig
from service.tau_input import check_tau

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReloadOutcome:
    manifest: Manifest  # of the package now served
    previous: Manifest  # of the package it replaced
    tau: float  # τ now applied to requests that give none
    seconds: float  # load + validate + warm-up


def _not_serving() -> ModelNotReady:
    return ModelNotReady("the model is not loaded yet (or shutting down); retry shortly and watch "
                         "GET /readyz")


class ModelSlot:
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
        self.control = ControlLoop(metrics, lambda: self.tau, self._store_tau)
        self._decode_limits = DecodeLimits(  # settings are frozen: built once, not per request
            max_pixels=settings.max_image_pixels, max_side=settings.max_image_side,
            max_request_pixels=settings.max_request_pixels, budget_s=settings.decode_budget_s)

    # -- lifecycle (the scheduler's ``start`` calls load_first, then open) -------------------
    async def load_first(self) -> None:
        """Load, validate and warm up the configured package; ``StartupError`` says what is wrong."""
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

    def open(self) -> None:
        """Answer ready (and start the τ controller when the settings ask for it)."""
        runner, tau = self.snapshot()
        m = runner.manifest
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
        """Stop answering ready, stop the controller and release the package."""
        self.stop()
        await self.control.aclose()
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


def _warm_up_decoders(size: int, limits: DecodeLimits) -> None:
    """Decode a tiny PNG and JPEG once, so the first request pays no Pillow plugin start-up."""
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.new("RGB", (size + 3, size + 1), (127, 127, 127)).save(buf, format=fmt)
        decode_request([buf.getvalue()], ["warm-up image"], limits, size)


