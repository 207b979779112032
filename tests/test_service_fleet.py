"""Admin calls on a fleet (``service.fleet``): published, not applied locally, and applied by
every replica through ``apply``. Two in-process apps stand for two replicas; the fleet is the
shared state a real one (Ray Serve's user_config, tests/test_ray_serve.py) would hold."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.fleet import FleetState, apply
from tests.test_service_reload import (
    AUTH,
    B,
    classify,
    make_app,
    models_root,  # noqa: F401  (the fixture)
)


class TwoReplicas:
    """A fleet of apps: ``publish`` merges the change and applies it on each, in turn."""

    def __init__(self, clients: list[TestClient]) -> None:
        self.clients, self.state, self.published = clients, FleetState(), []

    async def publish(self, **changes: object) -> FleetState:
        self.published.append(changes)
        self.state = FleetState.model_validate({**self.state.model_dump(), **changes})
        for client in self.clients:
            service, settings = client.app.state.service, client.app.state.settings
            if client.app is self.clients[0].app:  # the replica that took the call: this loop
                await apply(service, settings.models_root, self.state)
            else:  # another replica: its own event loop, as another process would be
                client.portal.call(apply, service, settings.models_root, self.state)
        return self.state


@pytest.fixture
def fleet(models_root):  # noqa: F811
    (a, _), (b, _) = make_app(models_root), make_app(models_root)
    with TestClient(a) as first, TestClient(b) as second:
        fleet = TwoReplicas([first, second])
        a.state.fleet = b.state.fleet = fleet
        yield fleet


def test_a_tau_change_is_published_and_reaches_every_replica(fleet):
    first, second = fleet.clients
    r = first.put("/admin/tau", json={"tau": 0.85}, headers=AUTH)
    assert r.status_code == 200 and r.json()["tau"] == 0.85 and r.json()["previous"] == 0.7
    assert fleet.published == [{"tau": 0.85}]
    for client in fleet.clients:
        assert client.get("/admin/tau", headers=AUTH).json()["tau"] == 0.85
        assert classify(client).json()["tau"] == 0.85


def test_a_target_is_resolved_once_and_the_tau_published(fleet):
    first, _ = fleet.clients
    r = first.put("/admin/tau", json={"target": {"flop_saving": 0.0}}, headers=AUTH)
    assert r.status_code == 200
    assert fleet.published == [{"tau": r.json()["tau"]}]


def test_a_reload_reaches_every_replica(fleet):
    first, second = fleet.clients
    r = first.post("/admin/reload", json={"package": "b"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["model"]["version"] == B and fleet.published == [{"package": "b"}]
    for client in fleet.clients:
        assert classify(client).json()["model"]["version"] == B


@pytest.mark.parametrize("package", ["tampered", "bad-schema", "no-manifest"])
def test_a_broken_package_is_refused_before_it_is_published(fleet, package):
    first, second = fleet.clients
    r = first.post("/admin/reload", json={"package": package}, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "package_rejected"
    assert fleet.published == []
    assert classify(second).json()["model"]["version"] != B


def test_apply_reloads_only_when_the_package_differs(fleet):
    first, _ = fleet.clients
    service = first.app.state.service
    runner = service.runner
    root = first.app.state.settings.models_root
    first.portal.call(apply, service, root, FleetState(package="a"))
    assert service.runner is runner  # already served: no reload
    first.portal.call(apply, service, root, FleetState(tau=0.4))
    assert service.tau == 0.4 and service.runner is runner
