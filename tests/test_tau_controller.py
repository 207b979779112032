"""The τ controller (service.tau_controller) on a fake clock against a synthetic server.

The "server" is a law: a request's latency grows with τ (more heads) and with the request rate
(queueing), with multiplicative noise; its FLOPs grow with τ. The controller only sees the
observations and the clock, as in the service.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from service.tau_controller import (
    CEILING_WINDOWS,
    DEADBAND,
    MIN_REQUESTS,
    ControllerConfig,
    Decision,
    TauController,
)
from tests.test_tau_target import _package, _row

WINDOW_S = 5.0


def latency(tau: float, rate: float) -> float:
    """5 ms + 30 ms·τ at 100 requests/s, the τ part growing with the rate."""
    return 0.005 + 0.030 * tau * rate / 100


def flops(tau: float) -> float:
    return 100e6 + 200e6 * tau


class Plant:
    """Feeds the controller a window of requests per tick, on a fake clock: ``load`` requests a
    second (open loop: the rate is given, latency grows with it)."""

    def __init__(self, controller: TauController, jitter: float = 0.03, seed: int = 0) -> None:
        self.c, self.jitter, self.now = controller, jitter, controller.started
        self.rng = np.random.default_rng(seed)
        self.taus: list[float] = []
        self.decisions: list[Decision] = []

    def requests(self, tau: float, load: float) -> tuple[float, float]:
        """(requests per second, latency of each) at ``tau`` under ``load``."""
        return load, latency(tau, load)

    def run(self, windows: int, load: float = 100.0) -> list[float]:
        for _ in range(windows):
            rate, seconds = self.requests(self.c.tau, load)
            n = int(rate * self.c.config.window_s)
            noise = 1 + self.jitter * self.rng.standard_normal(n)
            for k in range(n):
                self.c.observe(seconds * noise[k], flops(self.c.tau))
            self.now += self.c.config.window_s
            decision = self.c.tick(self.now)
            assert decision is not None
            self.decisions.append(decision)
            self.taus.append(self.c.tau)
        return self.taus[-windows:]


class ClosedPlant(Plant):
    """``load`` clients on a saturated 2-core server: a request takes ``2 + 8 τ`` ms of compute,
    so the rate is 2 / that and each request waits for the others (latency = clients × compute
    / 2). τ moves the rate here, not the number of requests in the server."""

    def requests(self, tau: float, load: float) -> tuple[float, float]:
        compute = 0.002 + 0.008 * tau
        return 2 / compute, load * compute / 2


def controller(tau: float = 1.0, **config) -> TauController:
    if "mflops_per_s" not in config:
        config.setdefault("p95_ms", 20.0)
    return TauController(ControllerConfig(window_s=WINDOW_S, **config), tau, started=0.0)


def reversals(taus: list[float]) -> int:
    moves = [np.sign(b - a) for a, b in zip(taus, taus[1:], strict=False) if b != a]
    return sum(1 for a, b in zip(moves, moves[1:], strict=False) if a != b)


def p95_at(tau: float, rate: float = 100.0, jitter: float = 0.03) -> float:
    return latency(tau, rate) * (1 + 1.645 * jitter)


@pytest.mark.parametrize("start", [0.0, 1.0])
def test_converges_to_the_p95_target_within_a_bounded_number_of_windows(start):
    plant = Plant(controller(start))
    plant.run(15)
    tau = plant.c.tau
    target = 0.020
    assert p95_at(tau) <= target * 1.01  # meets it...
    assert p95_at(tau) >= target * (1 - DEADBAND) * 0.97  # ...without giving away much accuracy
    settled = plant.run(60)  # and then holds on a steady load
    assert max(settled) - min(settled) <= 0.02
    assert reversals(plant.taus[-60:]) == 0
    assert plant.decisions[-1].state == "holding"


def test_holds_a_flops_per_second_budget():
    # 100 requests/s × (100 + 200 τ) MFLOPs ≤ 20 000 MFLOPs/s ⟺ τ ≤ 0.5
    plant = Plant(controller(0.0, mflops_per_s=20_000.0))
    plant.run(15)
    assert 0.5 * (1 - DEADBAND) - 0.1 <= plant.c.tau <= 0.5
    settled = plant.run(40)
    assert reversals(settled) == 0 and max(settled) - min(settled) <= 0.02


def test_never_leaves_the_bounds_and_says_when_it_sits_on_one():
    tight = Plant(controller(0.5, p95_ms=1.0, tau_min=0.2, tau_max=0.9))  # unreachable
    taus = tight.run(20)
    assert min(taus) >= 0.2 and tight.c.tau == pytest.approx(0.2)
    assert tight.decisions[-1].state == "at_bound"
    loose = Plant(controller(0.5, p95_ms=1000.0, tau_min=0.2, tau_max=0.9))  # always met
    taus = loose.run(20)
    assert max(taus) <= 0.9 and loose.c.tau == pytest.approx(0.9)
    assert loose.decisions[-1].state == "at_bound"
    outside = controller(0.95, tau_min=0.2, tau_max=0.9)  # a start outside is clamped
    assert outside.tau == pytest.approx(0.9)


def test_a_load_step_lowers_tau_and_its_end_lets_tau_climb_back():
    plant = Plant(controller(1.0))
    before = plant.run(20, load=100)[-1]
    during = plant.run(20, load=200)  # twice the load: the τ part of the latency doubles
    assert during[-1] < before
    assert p95_at(during[-1], rate=200) <= 0.020 * 1.01
    assert reversals(during[-10:]) == 0
    after = plant.run(10, load=100)  # far under the target: the ceiling learnt at 200/s goes
    assert after[-1] == pytest.approx(before, abs=0.05)


def test_a_closed_loop_load_settles_although_tau_moves_the_request_rate():
    # 12 clients, target 30 ms: 12 × (2 + 8 τ) / 2 × 1.05 ≤ 30 ⟺ τ ≤ 0.35. Each τ step changes the
    # rate by far more than 25%; taken for a new load, it would restart the search every time.
    plant = ClosedPlant(controller(0.95, p95_ms=30.0))
    plant.run(15, load=12)
    settled = plant.run(40, load=12)
    assert 0.25 <= settled[-1] <= 0.35
    assert reversals(settled) == 0 and max(settled) - min(settled) <= 0.02
    fewer = plant.run(10, load=4)  # the load falls: τ climbs to its bound at once
    assert fewer[-1] == pytest.approx(1.0) and plant.decisions[-1].state == "at_bound"


def test_the_ceiling_stops_a_limit_cycle_under_noise():
    # Noise big enough that single windows cross the target now and then: without the ceiling
    # τ would go up and down by a step every few windows.
    plant = Plant(controller(1.0), jitter=0.08, seed=3)
    plant.run(20)
    assert reversals(plant.run(CEILING_WINDOWS - 5)) <= 2


def test_a_quiet_window_holds_tau():
    c = controller(0.7)
    for _ in range(MIN_REQUESTS - 1):
        c.observe(1.0, 1e9)  # far over the target, but too few requests to judge
    decision = c.tick(WINDOW_S)
    assert decision is not None and decision.state == "idle" and not decision.changed
    assert c.tick(WINDOW_S + 1.0) is None  # the next window is still open


def test_reload_carries_tau_over_at_the_same_expected_saving():
    old = _package([_row(0.0, 0.55, 0.50), _row(1.0, 0.60, 0.10)])  # saving 0.30 at τ 0.5
    new = _package([_row(0.0, 0.55, 0.40), _row(1.0, 0.60, 0.20)])  # saving 0.30 at τ 0.5 too...
    c = controller(0.5)
    assert c.rebase(old, new, now=0.0) == pytest.approx(0.5)
    shifted = _package([_row(0.0, 0.55, 0.30), _row(1.0, 0.60, 0.0)])  # 0.30 only at τ 0
    c = controller(0.5, tau_min=0.1)
    assert c.rebase(old, shifted, now=0.0) == pytest.approx(0.1)  # the bound, never outside
    assert c.ceiling is None


@pytest.mark.parametrize("config", [
    {}, {"p95_ms": 10.0, "mflops_per_s": 5.0}, {"p95_ms": 0.0}, {"p95_ms": 10.0, "tau_min": 1.5},
    {"p95_ms": 10.0, "tau_min": 0.8, "tau_max": 0.2}, {"p95_ms": 10.0, "window_s": 0.0},
    {"p95_ms": None, "mflops_per_s": 5.0}, {"p95_ms": "10"}, {"p95_ms": 10.0, "gain": 2},
])
def test_config_refuses_what_it_cannot_do(config):
    with pytest.raises(ValidationError):
        ControllerConfig.model_validate(config)
