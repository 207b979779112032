"""Pick one head per cluster: the cheapest candidate within a tolerance of the most accurate.

"Cheapest" is whatever ``HeadCandidate.cost`` holds — measured time relative to the original by
default (``export.timing.relative_time``), FLOPs as an option — so the rule is one function for
both, and the manifest keeps every candidate with its cost for the model card.
"""

from __future__ import annotations

from collections import defaultdict

from modelpack.manifest import HeadCandidate


def choose_heads(candidates: list[HeadCandidate], tolerance: float) -> list[HeadCandidate]:
    """``candidates`` with ``chosen`` set on exactly one per cluster (ties: the more accurate)."""
    by_cluster: dict[int, list[HeadCandidate]] = defaultdict(list)
    for c in candidates:
        by_cluster[c.cluster].append(c)
    chosen = set()
    for cluster, group in by_cluster.items():
        best = max(c.accuracy for c in group)
        ok = [c for c in group if c.accuracy >= best - tolerance]
        pick = min(ok, key=lambda c: (c.cost, -c.accuracy))
        chosen.add((cluster, pick.arch))
    return [c.model_copy(update={"chosen": (c.cluster, c.arch) in chosen}) for c in candidates]
