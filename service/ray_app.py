"""CP-CNN Serve as a Ray Serve application: the same FastAPI app, N replicas, one shared state.

    serve run deploy/ray/serve_config.yaml          # a local Ray, 2 replicas (make serve-ray)
    serve deploy deploy/ray/serve_config.yaml       # onto a running cluster (ray start --head)

The FastAPI app of ``service.app`` is the ingress (``serve.ingress``); each replica runs its
lifespan, so it loads, validates and warms up its own package and holds its own runner, micro-
batcher and metrics, configured by the same ``CPCNN_*`` variables (the config's
``runtime_env.env_vars``). τ and the package are the deployment's ``user_config``: Serve hands it
to every replica's ``reconfigure``, and an admin call (``PUT /admin/tau``, ``POST
/admin/reload``) on any replica rewrites it through the Serve REST API (what ``serve deploy``
calls), then answers once every replica applied it. Each replica's Prometheus registry is also
served on ``metrics_port`` + its rank on the node, so Prometheus scrapes every replica once.

Needs the ``ray`` extra (``pip install 'cpcnn-serve[ray]'``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import anyio.to_thread
from prometheus_client import start_http_server
from pydantic import BaseModel
from ray import serve
from ray.serve import Application

from service.app import create_app
from service.errors import FleetUnavailable, ServiceError
from service.fleet import FleetState, apply

logger = logging.getLogger(__name__)

fastapi_app = create_app()

DEPLOYMENT = "cpcnn"
REPLICA_HEADER = "cpcnn-replica"  # which replica answered, on every response


def _ray_auth_headers() -> dict[str, str]:
    """The cluster's token header where Ray's token authentication is on (what Ray's own
    ``serve deploy`` sends); Ray has no public API for it yet."""
    try:
        from ray._private.authentication.http_token_authentication import (
            get_auth_headers_if_auth_enabled,
        )
    except ImportError:  # a Ray without token authentication
        return {}
    return get_auth_headers_if_auth_enabled({})


class ServeConfigFleet:
    """τ and the package as this deployment's ``user_config``, changed through the Serve REST API
    of the cluster's dashboard (``RAY_DASHBOARD_ADDRESS``, default http://127.0.0.1:8265)."""

    def __init__(self, app_name: str, deployment: str, dashboard: str,
                 timeout_s: Callable[[], float]) -> None:
        self.app_name, self.deployment = app_name, deployment
        self.url = dashboard.rstrip("/") + "/api/serve/applications/"
        self.timeout_s = timeout_s  # read per change: the replica's settings come with its lifespan
        self._lock = asyncio.Lock()  # one change at a time from this replica

    def _call(self, method: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **_ray_auth_headers()}
        request = urllib.request.Request(self.url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read()
        except (urllib.error.URLError, OSError) as e:
            raise FleetUnavailable(f"the Serve REST API at {self.url} did not answer ({e}); "
                                   "set RAY_DASHBOARD_ADDRESS to the cluster's dashboard") from e
        return json.loads(text) if text else {}

    def _app(self, status: dict) -> dict:
        app = status.get("applications", {}).get(self.app_name)
        if app is None or app.get("deployed_app_config") is None:
            raise FleetUnavailable(
                f"application {self.app_name!r} was not deployed from a config, so its "
                "configuration cannot be changed: start it with `serve run "
                "deploy/ray/serve_config.yaml` or `serve deploy`")
        return app

    def _publish(self, changes: dict) -> FleetState:
        status = self._call("GET")
        app = self._app(status)
        apps = [a["deployed_app_config"] for a in status["applications"].values()
                if a.get("deployed_app_config") is not None]
        config = next(a for a in apps if a["name"] == self.app_name)
        deployments = config.setdefault("deployments", [])
        entry = next((d for d in deployments if d["name"] == self.deployment), None)
        if entry is None:
            entry = {"name": self.deployment}
            deployments.append(entry)
        state = FleetState.model_validate({**(entry.get("user_config") or {}), **changes})
        entry["user_config"] = state.model_dump()
        before = app.get("last_deployed_time_s")
        self._call("PUT", {"applications": apps})
        timeout = self.timeout_s()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # until Serve has reconfigured every replica
            app = self._app(self._call("GET"))
            ours = app.get("deployments", {}).get(self.deployment, {})
            if (app.get("last_deployed_time_s") != before and app.get("status") == "RUNNING"
                    and ours.get("status") == "HEALTHY"):
                return state
            if app.get("status") == "DEPLOY_FAILED":
                raise FleetUnavailable(f"Serve could not apply {changes}: {app.get('message')}")
            time.sleep(0.2)
        raise FleetUnavailable(f"the replicas did not all apply {changes} within {timeout:g} s")

    async def publish(self, **changes: object) -> FleetState:
        async with self._lock:
            return await anyio.to_thread.run_sync(self._publish, changes)


@fastapi_app.middleware("http")
async def _name_the_replica(request, call_next):
    response = await call_next(request)
    response.headers[REPLICA_HEADER] = getattr(request.app.state, "replica_id", "")
    return response


@serve.deployment(name=DEPLOYMENT, num_replicas=2, ray_actor_options={"num_cpus": 1},
                  user_config={}, max_ongoing_requests=64)
@serve.ingress(fastapi_app)
class CPCNNDeployment:
    """One replica: the FastAPI app with its own package, and τ/package from ``user_config``.

    ``self.app`` is this replica's copy of the app (Serve ships the class and its app by value),
    so replica state goes on it, never on this module's ``fastapi_app``.
    """

    def __init__(self, metrics_port: int | None = None) -> None:
        # Serve sets ``self.app`` only after this constructor: the replica's state is put on
        # the app at the first ``reconfigure``, which Serve calls before any request.
        self._metrics_port = metrics_port
        self._applying: asyncio.Task | None = None
        self._bound = False

    def _bind(self) -> None:
        """Name the replica, install the fleet, serve the registry (once)."""
        if self._bound:
            return
        context = serve.get_replica_context()
        state = self.app.state
        state.replica_id = context.replica_tag
        state.fleet = ServeConfigFleet(
            context.app_name, context.deployment,
            os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265"),
            # Every replica may reload within CPCNN_RELOAD_TIMEOUT_S; Serve's own work on top.
            lambda: state.settings.reload_timeout_s + 30.0)
        if self._metrics_port:
            port = self._metrics_port + context.rank.local_rank
            start_http_server(port, registry=state.metrics.registry)
            logger.info("replica %s: Prometheus metrics on :%d", context.replica_tag, port)
        self._bound = True

    async def reconfigure(self, config: dict) -> None:
        """Serve calls this on every replica with the deployment's ``user_config``: at start
        (before the app's lifespan has loaded the package, so it is applied once it has) and on
        every change."""
        self._bind()
        state = FleetState.model_validate(config or {})
        service = self.app.state.service
        if service is None or not service.ready:
            if self._applying is not None:
                self._applying.cancel()
            self._applying = asyncio.get_running_loop().create_task(self._apply_when_ready(state))
            return
        await self._apply(state)

    async def _apply_when_ready(self, state: FleetState) -> None:
        while (service := self.app.state.service) is None or not service.ready:
            await asyncio.sleep(0.1)
        await self._apply(state)

    async def _apply(self, state: FleetState) -> None:
        service = self.app.state.service
        try:
            await apply(service, service.settings.models_root, state)
        except ServiceError as e:  # a package that does not load: the old one keeps serving
            logger.error("replica could not apply %s: %s", state.model_dump(), e)


class AppArgs(BaseModel):
    """Arguments of the application (``args`` in the Serve config)."""

    num_replicas: int = 2
    num_cpus: float = 1.0
    metrics_port: int | None = 9100  # replica k on a node serves its registry on this + k


def build(args: dict) -> Application:
    """The application builder the Serve config's ``import_path`` names (``args``: ``AppArgs``)."""
    args = AppArgs.model_validate(args)
    return CPCNNDeployment.options(
        num_replicas=args.num_replicas,
        ray_actor_options={"num_cpus": args.num_cpus}).bind(args.metrics_port)
