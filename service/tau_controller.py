"""A feedback controller that moves τ to hold a p95-latency target or a FLOPs-per-second budget.

τ is the one knob that trades accuracy for compute at serving time: a higher τ runs more heads
(more accurate, more FLOPs, longer requests). The controller looks at tumbling windows of the
requests the server answered and, per window:

- measured above the target: lower τ (and remember the τ that broke it as a *ceiling*);
- measured below ``target × (1 − DEADBAND)``: raise τ, but never to the ceiling again;
- in between (the deadband): hold. A window with fewer than ``MIN_REQUESTS`` requests says
  nothing about load: hold.

Steps adapt, between ``MIN_STEP`` and ``MAX_STEP``: while searching they double at every move
the same way (a far target is reached in a few windows); the first reversal brackets the target,
and from then on a reversal halves the step and only a third move the same way in a row (the
target has moved) doubles it again. The ceiling keeps a steady load from cycling raise → violate
→ lower. What was learnt (ceiling and bracket) is forgotten when a window lands more than
``SURPRISE`` away from the target: near the ceiling the measured value sits near the target, so a
window far off it means the load has changed, and the search starts again. (The request rate is
no measure of load here: with a fixed number of clients τ itself moves the rate, and with a fixed
arrival rate τ moves the number of requests in the server.) A ceiling is also forgotten after
``CEILING_WINDOWS`` windows, so τ probes upwards again when load falls slowly. τ never leaves ``[tau_min, tau_max]``.

The controller is pure: it is fed observations and a clock reading and answers decisions, so the
tests drive it with a fake clock and synthetic latencies; ``service.runtime`` feeds it from the
request path and ticks it from a background task. These constants are behaviour, not tuning for
one machine: they are internal defaults, not settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
from pydantic import ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from modelpack.manifest import Manifest
from modelpack.sweep import Target, TargetUnreachable, expected_at, tau_for_target
from service.json_fields import Fraction, NoNulls, PositiveNumber, conflict, one_of

logger = logging.getLogger(__name__)

DEADBAND = 0.10  # hold while the measured value is within 10% below the target
MIN_STEP, FIRST_STEP, MAX_STEP = 0.01, 0.05, 0.25  # τ units
MIN_REQUESTS = 20  # a window with fewer requests holds τ (a p95 of a handful is noise)
SURPRISE = 0.30  # a window more than 30% off the target forgets what was learnt
CEILING_WINDOWS = 30  # ... or after this many windows, so τ probes upwards again

State = Literal["off", "idle", "holding", "raising", "lowering", "at_bound"]
STATES: tuple[State, ...] = ("off", "idle", "holding", "raising", "lowering", "at_bound")
Quantity = Literal["p95_latency_seconds", "flops_per_second"]


class ControllerConfig(NoNulls):
    """What the controller holds, and where τ may go (CPCNN_TAU_CONTROLLER or the admin API)."""

    model_config = ConfigDict(extra="forbid", frozen=True,
                              json_schema_extra=one_of("p95_ms", "mflops_per_s"))

    p95_ms: Annotated[PositiveNumber, Field(le=3.6e6)] | SkipJsonSchema[None] = Field(
        default=None, examples=[40.0],
        description="Hold the 95th percentile of request latency (in the service: queueing, "
        "decoding and inference) at or below this many milliseconds.")
    mflops_per_s: Annotated[PositiveNumber, Field(le=1e12)] | SkipJsonSchema[None] = Field(
        default=None, examples=[20000.0],
        description="Spend at most this many MFLOPs per second on classification.")
    tau_min: Fraction = Field(default=0.0, description="The lowest τ the controller may set.")
    tau_max: Fraction = Field(default=1.0, description="The highest τ the controller may set.")
    window_s: float = Field(default=10.0, ge=0.05, le=3600.0, allow_inf_nan=False, strict=True,
                            description="Seconds of requests each decision looks at.")

    @model_validator(mode="after")
    def _check(self) -> ControllerConfig:
        if (self.p95_ms is None) == (self.mflops_per_s is None):
            raise ValueError("give exactly one of p95_ms and mflops_per_s")
        if self.tau_min > self.tau_max:
            raise conflict(f"tau_min ({self.tau_min}) must not exceed tau_max ({self.tau_max})")
        return self

    @property
    def quantity(self) -> Quantity:
        return "p95_latency_seconds" if self.p95_ms is not None else "flops_per_second"

    @property
    def target(self) -> float:
        """The target in base units: seconds or FLOPs per second."""
        if self.p95_ms is not None:
            return self.p95_ms / 1000.0
        assert self.mflops_per_s is not None
        return self.mflops_per_s * 1e6

    def clamp(self, tau: float) -> float:
        return min(self.tau_max, max(self.tau_min, tau))


@dataclass(frozen=True)
class Decision:
    """One window's outcome: the τ to serve with and why."""

    tau: float
    previous: float
    state: State
    measured: float | None  # None: too few requests in the window
    requests: int
    rate: float  # requests per second in the window

    @property
    def changed(self) -> bool:
        return self.tau != self.previous


@dataclass
class TauController:
    config: ControllerConfig
    tau: float
    started: float  # clock reading at the start of the first window
    step: float = FIRST_STEP
    state: State = "idle"
    measured: float | None = None
    windows: int = 0
    ceiling: float | None = None  # a τ that broke the target at ``ceiling_rate``
    ceiling_window: int = 0
    _direction: int = 0  # +1 raised, -1 lowered, 0 held, in the last window
    _run: int = 0  # moves the same way in a row
    _bracketed: bool = False  # τ has reversed since the search (re)started
    _latencies: list[float] = field(default_factory=list)
    _flops: float = 0.0

    def __post_init__(self) -> None:
        self.tau = self.config.clamp(self.tau)
        self._window_start = self.started

    def observe(self, seconds: float, flops: float) -> None:
        """One answered request: its latency and the FLOPs it executed."""
        self._latencies.append(seconds)
        self._flops += flops

    def remaining(self, now: float) -> float:
        """Seconds until the open window closes."""
        return max(0.0, self._window_start + self.config.window_s - now)

    def tick(self, now: float) -> Decision | None:
        """Close the window if it is over and decide τ; None while it is still open."""
        if self.remaining(now) > 0:
            return None
        elapsed = now - self._window_start
        latencies, flops = self._latencies, self._flops
        self._latencies, self._flops, self._window_start = [], 0.0, now
        self.windows += 1
        n, previous = len(latencies), self.tau
        rate = n / elapsed
        if n < MIN_REQUESTS:
            self.state, self.measured, self._direction = "idle", None, 0
            return Decision(self.tau, previous, "idle", None, n, rate)
        if self.config.quantity == "p95_latency_seconds":
            measured = float(np.percentile(latencies, 95))
        else:
            measured = flops / elapsed
        self.measured = measured
        target = self.config.target
        self._forget_if_surprised(measured / target)
        if measured > target:
            self._remember_ceiling(rate)
            self._move(-1, self.config.tau_min)
        elif measured < target * (1 - DEADBAND):
            upper = self.config.tau_max
            if self.ceiling is not None:
                upper = min(upper, self.ceiling - MIN_STEP)
            self._move(+1, upper)
        else:
            self.state, self._direction = "holding", 0
        return Decision(self.tau, previous, self.state, measured, n, rate)

    def _move(self, direction: int, limit: float) -> None:
        """Step τ towards ``limit`` (a bound, or below the ceiling); at it, the state says so."""
        room = (limit - self.tau) * direction
        if room < MIN_STEP / 2:
            self.state, self._direction, self._run = ("at_bound" if limit in (
                self.config.tau_min, self.config.tau_max) else "holding"), 0, 0
            return
        if self._direction == -direction:  # a reversal: the target lies between
            self.step, self._run, self._bracketed = max(MIN_STEP, self.step / 2), 1, True
        elif self._direction == direction:
            self._run += 1
            if not self._bracketed or self._run >= 3:  # searching, or the target has moved
                self.step = min(MAX_STEP, self.step * 2)
        else:
            self._run = 1
        self.tau = self.config.clamp(self.tau + direction * min(self.step, room))
        self.state, self._direction = ("raising" if direction > 0 else "lowering"), direction

    def _remember_ceiling(self, rate: float) -> None:
        if self.ceiling is None or self.tau <= self.ceiling:
            self.ceiling, self.ceiling_window = self.tau, self.windows

    def _forget_if_surprised(self, ratio: float) -> None:
        """``ratio``: measured / target."""
        if abs(ratio - 1) > SURPRISE and (self.ceiling is not None or self._bracketed):
            logger.info("tau controller: measured %.2f× the target, the load has changed: "
                        "searching again", ratio)
            self.ceiling, self._bracketed = None, False
        if self.ceiling is not None and self.windows - self.ceiling_window >= CEILING_WINDOWS:
            logger.info("tau controller: ceiling %.3f forgotten (%d windows old)", self.ceiling,
                        CEILING_WINDOWS)
            self.ceiling = None

    def rebase(self, old: Manifest, new: Manifest, now: float) -> float:
        """A reload: carry τ over at the same expected FLOP saving on the new package's sweep
        (its τ scale is its own), forget what was learnt about the old one, and return the τ."""
        self.ceiling, self.step, self._direction, self._run = None, FIRST_STEP, 0, 0
        self._bracketed = False
        self._latencies, self._flops, self._window_start = [], 0.0, now
        e = expected_at(old, self.tau)
        if e is not None and new.tau_sweep:
            within = (self.config.tau_min, self.config.tau_max)
            try:
                self.tau = tau_for_target(new, Target("flop_saving", max(0.0, e.flop_saving)),
                                          within).tau
            except TargetUnreachable:  # the new package saves less everywhere in the bounds
                self.tau = self.config.tau_min
        self.tau = self.config.clamp(self.tau)
        return self.tau
