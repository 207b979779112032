"""What the offline τ sweep predicts for a τ that may fall between swept values.

Linear interpolation between the two neighbouring swept τs (the sweep always holds 0 and 1, so
every τ in [0, 1] has neighbours); an exactly swept τ returns its row. Accuracy and FLOPs move in
steps between swept τs in reality, so the interpolated figure is an estimate, and the answer says
which rows it came from.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelpack.manifest import Manifest

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


# -- τ from a target -----------------------------------------------------------------------------
TARGET_KINDS = ("flop_saving", "max_top1_loss", "mflops")


@dataclass(frozen=True)
class Target:
    """What a user asks for instead of a τ.

    ``flop_saving``: save at least this fraction of the original's FLOPs; ``mflops``: spend at
    most this many MFLOPs an image on average; ``max_top1_loss``: lose at most this much top-1
    (a fraction: 0.005 is half a point) against the original model.
    """

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"target must be one of {TARGET_KINDS}, got {self.kind!r}")

    def describe(self) -> str:
        if self.kind == "flop_saving":
            return f"a FLOP saving of at least {100 * self.value:.1f}%"
        if self.kind == "mflops":
            return f"at most {self.value:g} MFLOPs an image"
        return f"a top-1 loss of at most {100 * self.value:.2f} points"


class TargetUnreachable(ValueError):
    """No τ in the range meets the target; ``best`` is the closest reachable value of its kind."""

    def __init__(self, target: Target, best: float, where: str) -> None:
        self.target, self.best = target, best
        if target.kind == "flop_saving":
            best_text = f"{100 * best:.1f}%"
        elif target.kind == "mflops":
            best_text = f"{best:g} MFLOPs an image"
        else:
            best_text = f"{100 * best:.2f} points"
        super().__init__(f"no τ {where} gives {target.describe()}: the best the package's τ sweep "
                         f"reaches there is {best_text}")


def _constraint(target: Target, e: Expected, original_top1: float) -> float:
    """≥ 0 where ``e`` meets ``target``; linear in the swept figures, so it interpolates too."""
    if target.kind == "flop_saving":
        return e.flop_saving - target.value
    if target.kind == "mflops":
        return target.value - e.mean_flops / 1e6
    return target.value - (original_top1 - e.top1)


def _preference(target: Target, e: Expected) -> tuple[float, ...]:
    """What is best among the τs that meet the target: compute targets want accuracy (top-1, then
    top-5, then the cheaper), an accuracy target wants the biggest saving (then top-1)."""
    if target.kind == "max_top1_loss":
        return (e.flop_saving, e.top1, e.top5)
    return (e.top1, e.top5, e.flop_saving)


def _reach(target: Target, e: Expected, original_top1: float) -> float:
    """The target's quantity at ``e``: the value a refusal names as the best reachable."""
    if target.kind == "flop_saving":
        return e.flop_saving
    if target.kind == "mflops":
        return e.mean_flops / 1e6
    return original_top1 - e.top1


def tau_for_target(manifest: Manifest, target: Target,
                   within: tuple[float, float] = (0.0, 1.0)) -> Expected:
    """The τ in ``within`` that meets ``target`` best, with what the sweep predicts there.

    The rule: between swept τs every figure is the linear interpolation ``expected_at`` reports,
    so the target holds on intervals of τ whose ends are swept τs, the bounds of ``within`` or
    the points where an interpolated figure crosses the target. Among those candidate τs that
    meet it, compute targets (flop_saving, mflops) take the most accurate (top-1, then top-5, then
    the cheaper) and an accuracy target (max_top1_loss) the cheapest (largest saving, then top-1).
    ``ValueError`` when the package has no sweep; ``TargetUnreachable`` when no τ meets it.
    """
    lo, hi = within
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"τ bounds must satisfy 0 <= min <= max <= 1, got {within}")
    original_top1 = manifest.training.original_accuracy.top1
    taus = sorted({r.tau for r in manifest.tau_sweep if lo <= r.tau <= hi} | {lo, hi})
    points = [expected_at(manifest, t) for t in taus]
    if not manifest.tau_sweep or None in points:
        raise ValueError(f"package {manifest.name} {manifest.version} has no τ sweep to choose τ "
                         "from: set tau directly")
    rows = [p for p in points if p is not None]
    candidates = [e for e in rows if _constraint(target, e, original_top1) >= -1e-12]
    for a, b in zip(rows, rows[1:], strict=False):
        ca, cb = _constraint(target, a, original_top1), _constraint(target, b, original_top1)
        if (ca < 0) != (cb < 0):  # the target is crossed inside (a.tau, b.tau)
            cross = expected_at(manifest, a.tau + (b.tau - a.tau) * ca / (ca - cb))
            if cross is not None:
                candidates.append(cross)
    if not candidates:
        reach = [_reach(target, e, original_top1) for e in rows]
        best = min(reach) if target.kind in ("mflops", "max_top1_loss") else max(reach)
        raise TargetUnreachable(target, best, f"in [{lo:g}, {hi:g}]")
    return max(candidates, key=lambda e: _preference(target, e))
