"""τ chosen from a target over the API: PUT /admin/tau, /classify's query, V2 parameters."""

from __future__ import annotations

import pytest

from modelpack.sweep import Target, tau_for_target
from tests.conftest import AUTH
from tests.test_service_api import files, png
from tests.test_service_v2 import bytes_request, infer_url


def _reachable_mflops(manifest) -> float:
    """A FLOP budget between the cheapest and the dearest swept τ (so the choice is not trivial;
    the small synthetic package need not save FLOPs at all, so no saving target here)."""
    flops = sorted({r.mean_flops for r in manifest.tau_sweep})
    assert len(flops) > 1
    return (flops[0] + flops[-1]) / 2e6


def test_put_tau_target_sets_the_tau_the_sweep_gives(fresh, manifest):
    client, registry = fresh
    budget = _reachable_mflops(manifest)
    want = tau_for_target(manifest, Target("mflops", budget))
    r = client.put("/admin/tau", json={"target": {"mflops": budget}}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tau"] == pytest.approx(want.tau)
    assert body["target"] == {"mflops": budget}  # what was given, nothing else
    assert body["expected"]["mean_flops"] <= budget * 1e6 * (1 + 1e-9)
    assert registry.get_sample_value("cpcnn_tau") == pytest.approx(want.tau)
    assert client.post("/classify", files=files(png())).json()["tau"] == pytest.approx(want.tau)


@pytest.mark.parametrize("target", [{"max_top1_loss": 1.0}, {"max_top1_loss": 0.0},
                                    {"flop_saving": 0.0}, {"mflops": 1e9}])
def test_put_tau_accuracy_and_flops_targets(fresh, manifest, target):
    client, _ = fresh
    (kind, value), = target.items()
    try:
        want = tau_for_target(manifest, Target(kind, value)).tau
    except ValueError:  # e.g. a package whose sweep never saves FLOPs: refused the same way
        want = None
    r = client.put("/admin/tau", json={"target": target}, headers=AUTH)
    if want is None:
        assert r.status_code == 422 and r.json()["error"]["code"] == "target_unreachable"
    else:
        assert r.status_code == 200, r.text
        assert r.json()["tau"] == pytest.approx(want)


def test_put_tau_unreachable_target_is_422_and_keeps_tau(fresh, manifest):
    client, registry = fresh
    before = registry.get_sample_value("cpcnn_tau")
    best = max(r.flop_saving for r in manifest.tau_sweep)
    r = client.put("/admin/tau", json={"target": {"flop_saving": 0.999}}, headers=AUTH)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "target_unreachable"
    assert f"{100 * best:.1f}%" in err["message"]
    assert registry.get_sample_value("cpcnn_tau") == before


@pytest.mark.parametrize("payload", [
    {"tau": 0.5, "target": {"flop_saving": 0.1}}, {"target": {}},
    {"target": {"flop_saving": 0.1, "mflops": 10}}, {"target": {"flop_saving": 1.5}},
    {"target": {"mflops": 0}}, {"target": {"flop_saving": "0.1"}}, {"target": {"latency": 1}},
    {"tau": None}, {"tau": 0.5, "target": None}, {"target": {"mflops": 10, "flop_saving": None}},
])
def test_put_tau_rejects_malformed_targets(fresh, payload):
    client, _ = fresh
    r = client.put("/admin/tau", json=payload, headers=AUTH)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter"


def test_classify_target_per_request_leaves_the_server_tau(served, manifest):
    client, registry = served
    budget = _reachable_mflops(manifest)
    want = tau_for_target(manifest, Target("mflops", budget)).tau
    server_tau = registry.get_sample_value("cpcnn_tau")
    r = client.post("/classify", params={"target_mflops": budget}, files=files(png()))
    assert r.status_code == 200, r.text
    assert r.json()["tau"] == pytest.approx(want)
    assert client.post("/classify", files=files(png())).json()["tau"] == server_tau
    loss = client.post("/classify", params={"target_max_top1_loss": 1.0}, files=files(png()))
    assert loss.json()["tau"] == pytest.approx(
        tau_for_target(manifest, Target("max_top1_loss", 1.0)).tau)


@pytest.mark.parametrize("query, code", [
    ({"target_flop_saving": 0.999}, "target_unreachable"),
    ({"target_flop_saving": 0.1, "tau": 0.5}, "conflicting_parameters"),
    ({"target_flop_saving": 0.1, "target_mflops": 5}, "conflicting_parameters"),
    ({"target_mflops": -1}, "invalid_parameter"),
    ({"target_max_top1_loss": "lots"}, "invalid_parameter"),
])
def test_classify_bad_targets_are_422(served, query, code):
    client, _ = served
    r = client.post("/classify", params=query, files=files(png()))
    assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text


def test_v2_target_parameters(served, manifest):
    client, _ = served
    budget = _reachable_mflops(manifest)
    want = tau_for_target(manifest, Target("mflops", budget)).tau
    r = client.post(infer_url(manifest),
                    json=bytes_request(png(), parameters={"target_mflops": budget}))
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["tau"] == pytest.approx(want)
    for params, message in (({"target_flop_saving": 0.999}, "best the package's τ sweep"),
                            ({"target_mflops": True}, "must be a number > 0"),
                            ({"target_mflops": 5, "target_flop_saving": 0.1}, "at most one"),
                            ({"target_flop_saving": 0.1, "tau": 0.2}, "not both")):
        r = client.post(infer_url(manifest), json=bytes_request(png(), parameters=params))
        assert r.status_code == 400, (params, r.text)  # V2 answers every client error 400
        assert message in r.json()["error"], (params, r.text)
