"""Runtime state every replica of a scaled-out service must share: τ and the package served.

In one process, ``PUT /admin/tau`` and ``POST /admin/reload`` change that process. With N
replicas behind a load balancer an admin call reaches one of them, so where a ``Fleet`` is
installed (``app.state.fleet``; the Ray Serve application, ``service/ray_app.py``) the admin
routes publish the change to the fleet instead, and every replica, the one that took the call
included, applies it through ``apply``. The fleet's ``publish`` returns once every replica has.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from modelpack.manifest import PackageError, load_manifest
from service.errors import Conflict
from service.model_slot import ReloadOutcome
from service.packages import resolve_package_dir
from service.runtime import InferenceService
from service.tau_input import check_tau

logger = logging.getLogger(__name__)


class FleetState(BaseModel):
    """What every replica serves. ``None``: the process's own (``CPCNN_MODEL_DIR``, then the
    package's default τ or ``CPCNN_TAU``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tau: float | None = Field(default=None, ge=0, le=1, description="τ set by an operator.")
    package: str | None = Field(default=None, description="Directory name in the models root.")


class Fleet(Protocol):
    async def publish(self, **changes: object) -> FleetState:
        """Change the fleet's state (keys of ``FleetState``) and return once every replica
        applies it; raises ``service.errors.ServiceError`` subclasses that say why not."""
        ...


async def publish_reload(fleet: Fleet, service: InferenceService,
                         package_dir: Path) -> ReloadOutcome:
    """``POST /admin/reload`` on a fleet: check the package here first (schema, files,
    checksums), so a broken one is refused before any replica tries it, then publish it and
    report what this replica serves afterwards."""
    old = service.manifest
    try:
        load_manifest(package_dir, verify=True)
    except PackageError as e:
        raise Conflict(f"{e}; still serving {old.name} {old.version}",
                       code="package_rejected") from e
    t0 = time.perf_counter()
    await fleet.publish(package=package_dir.name)
    if service.runner.package_dir.name != package_dir.name:
        raise Conflict(f"the replicas could not load {package_dir.name} (their logs say why); "
                       f"still serving {old.name} {old.version}", code="package_rejected")
    return ReloadOutcome(service.manifest, old, service.tau, time.perf_counter() - t0)


async def apply(service: InferenceService, models_root: Path, state: FleetState) -> None:
    """Make this replica serve ``state``: reload when the package differs, then set τ.

    A package that fails to load leaves the old one serving (the reload's own guarantee) and is
    logged; the admin call that published it reports it from the replica that took it.
    """
    if state.package is not None and service.runner.package_dir.name != state.package:
        await service.reload(resolve_package_dir(models_root, state.package))
    if state.tau is not None and service.tau != state.tau:
        service.set_tau(check_tau(state.tau))
