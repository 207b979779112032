"""Runs a ``TauController`` inside the server: fed by every answered request, ticked by a task.

The service owns τ; this loop only reads it and asks the service to store a new one. It keeps the
controller's metrics (state, target, measured value, changes) and logs every change of τ.
Started from ``CPCNN_TAU_CONTROLLER`` or ``PUT /admin/tau/controller``; stopped by
``DELETE /admin/tau/controller`` or by an operator setting τ (``PUT /admin/tau`` pins it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from modelpack.manifest import Manifest
from service.metrics import Metrics
from service.tau_controller import ControllerConfig, Decision, TauController

logger = logging.getLogger(__name__)


class ControlLoop:
    def __init__(self, metrics: Metrics, read_tau: Callable[[], float],
                 store_tau: Callable[[float], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self._read_tau, self._store_tau = read_tau, store_tau
        self.clock = clock  # the tests drive it by hand
        self.controller: TauController | None = None
        self._task: asyncio.Task[None] | None = None
        metrics.tau_controller_state.state("off")

    @property
    def active(self) -> bool:
        return self.controller is not None

    def start(self, config: ControllerConfig) -> TauController:
        """Start (or restart with a new config) from the current τ, clamped into the bounds."""
        self.stop(None)
        tau = self._read_tau()
        c = self.controller = TauController(config, tau, started=self.clock())
        if c.tau != tau:
            self._store_tau(c.tau)
        m = self.metrics
        m.tau_controller_state.state(c.state)
        m.tau_controller_target.labels(quantity=config.quantity).set(config.target)
        logger.info("tau controller on: %s %g, tau in [%g, %g], %g s windows, from tau %.3f",
                    config.quantity, config.target, config.tau_min, config.tau_max,
                    config.window_s, c.tau)
        self._task = asyncio.get_running_loop().create_task(self._run(c))
        return c

    def stop(self, why: str | None) -> bool:
        """Stop the controller (τ stays where it is); False when none was running."""
        if self.controller is None:
            return False
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.controller = None
        m = self.metrics
        m.tau_controller_state.state("off")
        m.tau_controller_target.clear()
        m.tau_controller_measured.clear()
        if why:
            logger.info("tau controller off (%s); tau stays %.3f", why, self._read_tau())
        return True

    async def aclose(self) -> None:
        task = self._task
        self.stop(None)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def observe(self, seconds: float, flops: float) -> None:
        """One answered request (called on the event loop, like the ticks)."""
        if self.controller is not None:
            self.controller.observe(seconds, flops)

    def tick(self) -> Decision | None:
        """Close the controller's window if it is over and apply its decision."""
        c = self.controller
        if c is None:
            return None
        decision = c.tick(self.clock())
        if decision is None:
            return None
        m = self.metrics
        m.tau_controller_state.state(decision.state)
        if decision.measured is not None:
            m.tau_controller_measured.labels(quantity=c.config.quantity).set(decision.measured)
        if decision.changed:
            self._store_tau(decision.tau)
            m.tau_controller_changes.labels(
                direction="up" if decision.tau > decision.previous else "down").inc()
            logger.info("tau controller: tau %.3f -> %.3f (%s %.4g, target %.4g, %d requests, "
                        "%.1f/s, step %.3f)", decision.previous, decision.tau, c.config.quantity,
                        decision.measured, c.config.target, decision.requests, decision.rate,
                        c.step)
        return decision

    def rebase(self, old: Manifest, new: Manifest) -> float | None:
        """On a reload: the τ the controller carries over to ``new`` (None when it is off)."""
        if self.controller is None:
            return None
        tau = self.controller.rebase(old, new, self.clock())
        logger.info("tau controller: reload, tau %.3f on %s %s (same expected FLOP saving)",
                    tau, new.name, new.version)
        return tau

    async def _run(self, c: TauController) -> None:
        while self.controller is c:
            await asyncio.sleep(c.remaining(self.clock()) + 1e-3)
            self.tick()
