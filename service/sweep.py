"""What the offline τ sweep predicts for a τ that may fall between swept values.

Linear interpolation between the two neighbouring swept τs (the sweep always holds 0 and 1, so
every τ in [0, 1] has neighbours); an exactly swept τ returns its row. Accuracy and FLOPs move in
steps between swept τs in reality, so the interpolated figure is an estimate, and the answer says
which rows it came from.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.manifest import Manifest

FIELDS = ("top1", "top5", "mean_flops", "flop_saving", "mean_heads", "cluster_accuracy")


@dataclass(frozen=True)
class Expected:
    tau: float
    top1: float
    top5: float
    mean_flops: float
    flop_saving: float
    mean_heads: float
    cluster_accuracy: float
    method: str  # "exact" | "interpolated" | "nearest"
    sweep_taus: tuple[float, ...]  # the swept τ(s) the figures come from


def expected_at(manifest: Manifest, tau: float) -> Expected | None:
    """The sweep's figures at ``tau``; None when the package has no sweep."""
    rows = sorted(manifest.tau_sweep, key=lambda r: r.tau)
    if not rows:
        return None
    for r in rows:
        if abs(r.tau - tau) <= 1e-9:
            return Expected(tau, *(getattr(r, f) for f in FIELDS), "exact", (r.tau,))
    below = [r for r in rows if r.tau < tau]
    above = [r for r in rows if r.tau > tau]
    if not below or not above:  # outside the swept range: the nearest row
        r = below[-1] if below else above[0]
        return Expected(tau, *(getattr(r, f) for f in FIELDS), "nearest", (r.tau,))
    lo, hi = below[-1], above[0]
    t = (tau - lo.tau) / (hi.tau - lo.tau)
    values = [getattr(lo, f) + t * (getattr(hi, f) - getattr(lo, f)) for f in FIELDS]
    return Expected(tau, *values, "interpolated", (lo.tau, hi.tau))
