"""τ as a request or an admin call gives it: a value checked, or a target met on the sweep."""

from __future__ import annotations

from modelpack.manifest import Manifest
from modelpack.sweep import Expected, Target, TargetUnreachable, tau_for_target
from service.errors import InvalidParameter
from service.json_fields import CONFLICTING


def tau_for(manifest: Manifest, target: Target,
            within: tuple[float, float] = (0.0, 1.0)) -> Expected:
    """The τ the package's sweep gives for ``target`` (``modelpack.sweep.tau_for_target``); a 422
    ``target_unreachable`` naming the best reachable value, or ``no_tau_sweep``."""
    try:
        return tau_for_target(manifest, target, within)
    except TargetUnreachable as e:
        raise InvalidParameter(f"{e}; ask for less, or set tau directly",
                               code="target_unreachable") from e
    except ValueError as e:
        raise InvalidParameter(str(e), code="no_tau_sweep") from e


def query_target(flop_saving: float | None, max_top1_loss: float | None,
                 mflops: float | None) -> Target | None:
    """The one ``target_*`` query parameter given, as a ``Target``; None when none is."""
    given = [Target(kind, value) for kind, value in
             (("flop_saving", flop_saving), ("max_top1_loss", max_top1_loss), ("mflops", mflops))
             if value is not None]
    if len(given) > 1:
        raise InvalidParameter("give at most one of target_flop_saving, target_max_top1_loss and "
                               "target_mflops", code=CONFLICTING)
    return given[0] if given else None


def check_tau(tau: float) -> float:
    tau = float(tau)
    if not 0.0 <= tau <= 1.0:  # also False for NaN
        raise InvalidParameter(f"tau must be a number in [0, 1], got {tau}")
    return tau + 0.0  # -0.0 + 0.0 is 0.0: never echo a negative zero
