"""The τ controller in the server: admin API, metrics, hand-back to the operator, reloads.

The control law itself is tested in test_tau_controller.py. Here the server's control loop reads
a fake clock, and a test closes a window by advancing it and ticking the loop on the server's event
loop (as its own task does), after enough requests; the target is unreachable (a p95 of a
microsecond), so every judged window lowers τ whatever this machine's speed.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from modelpack.manifest import copy_package, load_manifest
from modelpack.sweep import Target, expected_at, tau_for_target
from service.tau_controller import MIN_REQUESTS, ControllerConfig
from tests.conftest import AUTH, SHIPPED_PACKAGE, make_app
from tests.test_service_api import files, png

UNREACHABLE = {"p95_ms": 0.001, "window_s": 60.0, "tau_min": 0.2, "tau_max": 0.9}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clocked(fresh):
    """(client, registry, clock): the server's τ control loop reads ``clock``."""
    client, registry = fresh
    clock = FakeClock()
    client.app.state.service.control.clock = clock
    return client, registry, clock


def controller(client) -> dict:
    r = client.get("/admin/tau/controller", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def drive(client, clock: FakeClock, until, windows: int = 12) -> dict:
    """Judge windows of requests until ``until(controller state)`` holds."""
    for _ in range(windows):
        for _ in range(MIN_REQUESTS + 5):
            assert client.post("/classify", files=files(png())).status_code == 200
        clock.now += UNREACHABLE["window_s"]
        client.portal.call(client.app.state.service.control.tick)
        state = controller(client)
        if until(state):
            return state
    pytest.fail(f"the controller never got there in {windows} windows: {controller(client)}")


def test_the_controller_lowers_tau_to_its_bound_and_shows_it_in_metrics(clocked):
    client, registry, clock = clocked
    assert controller(client) == {"state": "off", "tau": client.get("/admin/tau",
                                                                      headers=AUTH).json()["tau"]}
    r = client.put("/admin/tau/controller", json=UNREACHABLE, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["config"] == UNREACHABLE
    assert body["quantity"] == "p95_latency_seconds" and body["target"] == pytest.approx(1e-6)
    assert 0.2 <= body["tau"] <= 0.9  # the start is clamped into the bounds
    state = drive(client, clock, lambda s: s["state"] == "at_bound")
    assert state["tau"] == pytest.approx(0.2) and state["measured"] > 1e-6
    assert client.post("/classify", files=files(png())).json()["tau"] == pytest.approx(0.2)
    value = registry.get_sample_value
    assert value("cpcnn_tau") == pytest.approx(0.2)
    assert value("cpcnn_tau_controller_state", {"cpcnn_tau_controller_state": "at_bound"}) == 1
    assert value("cpcnn_tau_controller_target", {"quantity": "p95_latency_seconds"}) == \
        pytest.approx(1e-6)
    assert value("cpcnn_tau_controller_measured", {"quantity": "p95_latency_seconds"}) > 1e-6
    assert value("cpcnn_tau_controller_changes_total", {"direction": "down"}) >= 1


def test_an_operator_tau_stops_the_controller_and_stays(clocked):
    client, registry, clock = clocked
    client.put("/admin/tau/controller", json=UNREACHABLE, headers=AUTH)
    drive(client, clock, lambda s: s["state"] in ("lowering", "at_bound"))
    r = client.put("/admin/tau", json={"tau": 0.8}, headers=AUTH)
    assert r.status_code == 200 and r.json()["controller_stopped"] is True
    assert controller(client) == {"state": "off", "tau": 0.8}
    for _ in range(2 * MIN_REQUESTS):
        assert client.post("/classify", files=files(png())).json()["tau"] == 0.8
    clock.now += UNREACHABLE["window_s"]
    assert client.portal.call(client.app.state.service.control.tick) is None
    assert controller(client)["tau"] == 0.8  # nobody moves it any more
    assert registry.get_sample_value("cpcnn_tau_controller_state",
                                     {"cpcnn_tau_controller_state": "off"}) == 1
    again = client.put("/admin/tau", json={"tau": 0.5}, headers=AUTH).json()
    assert again["controller_stopped"] is False


def test_delete_stops_the_controller_where_it_left_tau(clocked):
    client, _, clock = clocked
    client.put("/admin/tau/controller", json=UNREACHABLE, headers=AUTH)
    left = drive(client, clock, lambda s: s["state"] in ("lowering", "at_bound"))["tau"]
    r = client.delete("/admin/tau/controller", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"state": "off", "tau": left}
    assert client.get("/admin/tau", headers=AUTH).json()["tau"] == left


@pytest.mark.parametrize("payload, code", [
    ({}, "invalid_parameter"), ({"p95_ms": 10, "mflops_per_s": 5}, "invalid_parameter"),
    ({"p95_ms": -1}, "invalid_parameter"), ({"p95_ms": 10, "tau_max": 2}, "invalid_parameter"),
    ({"p95_ms": None}, "invalid_parameter"), ({"p95_ms": 10, "kp": 1}, "invalid_parameter"),
    ({"p95_ms": 10, "tau_min": 0.9, "tau_max": 0.1}, "conflicting_parameters"),
])
def test_a_bad_controller_config_is_422(served, payload, code):
    client, _ = served
    r = client.put("/admin/tau/controller", json=payload, headers=AUTH)
    assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text
    assert controller(client)["state"] == "off"


def test_the_controller_endpoints_need_the_token(served):
    client, _ = served
    assert client.get("/admin/tau/controller").status_code == 401
    assert client.put("/admin/tau/controller", json=UNREACHABLE).status_code == 401
    assert client.delete("/admin/tau/controller").status_code == 401


def test_a_setting_starts_it_with_the_server(synthetic_package):
    config = ControllerConfig(mflops_per_s=1e6, tau_min=0.1, tau_max=0.6)
    app, _ = make_app(synthetic_package, tau_controller=config, tau=0.9)
    with TestClient(app) as client:
        state = controller(client)
        assert state["quantity"] == "flops_per_second" and state["target"] == pytest.approx(1e12)
        assert state["tau"] == pytest.approx(0.6)  # CPCNN_TAU 0.9, clamped into the bounds


def _with_sweep(package, saving_at_0: float):
    """Rewrite ``package``'s sweep: top-1 rises and the FLOP saving falls linearly with τ."""
    raw = json.loads((package / "manifest.json").read_text())
    first = raw["tau_sweep"][0]
    original = first["mean_flops"] / (1 - first["flop_saving"])
    for row in raw["tau_sweep"]:
        row["flop_saving"] = saving_at_0 - 0.5 * row["tau"]
        row["mean_flops"] = original * (1 - row["flop_saving"])
        row["top1"] = 0.5 + 0.1 * row["tau"]
    (package / "manifest.json").write_text(json.dumps(raw))
    return load_manifest(package)


def test_a_reload_carries_tau_over_at_the_same_expected_saving(tmp_path):
    old = _with_sweep(copy_package(SHIPPED_PACKAGE, tmp_path / "a", version="1-a"), 0.5)
    new = _with_sweep(copy_package(SHIPPED_PACKAGE, tmp_path / "b", version="2-b"), 0.6)
    app, _ = make_app(tmp_path / "a", tau=0.5)  # saves 25% on a; b saves 25% at τ 0.7
    with TestClient(app) as client:
        window = {"p95_ms": 1e6, "window_s": 3600.0}  # never judges during the test
        assert client.put("/admin/tau/controller", json=window, headers=AUTH).status_code == 200
        r = client.post("/admin/reload", json={"package": "b"}, headers=AUTH)
        assert r.status_code == 200, r.text
        want = tau_for_target(new, Target("flop_saving", expected_at(old, 0.5).flop_saving)).tau
        assert r.json()["tau"] == pytest.approx(want) == pytest.approx(0.7)
        assert controller(client)["state"] != "off"  # it keeps running on the new package
