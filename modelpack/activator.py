"""The confusion-threshold activator (CP-CNN, paper 002 Algorithm 1 and Eq. 3).

This is the one implementation of head selection and score combination: the server runs it per
image and the offline τ sweep calls the very same functions. Pure numpy on purpose — no torch,
ONNX Runtime or FastAPI — so it can be tested with hand-made arrays.

Conventions
-----------
* ``probs`` (V in the paper): softmax of the clustifier's logits, shape (K,).
* ``confusion``: the clustifier's confusion matrix on held-out data, ``confusion[true, predicted]``
  counts. Column j therefore says which true clusters hide behind a prediction of j.
* τ = 0 always runs exactly one head; τ = 1 always runs every head.

Top-5 fill (``fill_unrun``, a departure): with ``combine`` alone the classes of heads not run
score 0, so an image whose true class lies in a cluster not run can never have it in its top-5.
Scoring them from the clustifier's own class softmax (computed anyway) costs nothing.

Combination (``combine``): ``eq3`` is the paper's Eq. 3, w_i × softmax(H_i(x)); ``joint`` (a
departure, offered beside it) is w_i × exp(H_i(x)_c) normalised over all heads run: one softmax
over the heads' logits plus log w_i. Eq. 3 normalises each head on its own, so a head run for
the wrong cluster is as sure of its classes as the right head is, and only the weights decide
between clusters. Joint also lets a head's own evidence (how large its logits are) count, which
needs heads whose logits share a scale: heads distilled with ``logit_match`` on images of other
clusters too (``head_negatives``). Measured on Tiny-ImageNet in docs/tiny-imagenet-200-status.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Ranking = Literal["confusion", "probability"]
Weighting = Literal["confusion", "probability"]
Combination = Literal["eq3", "joint"]


@dataclass(frozen=True)
class Activation:
    """Heads chosen for one image, in the order they were added, with their Eq. 3 weights."""

    heads: tuple[int, ...]
    weights: tuple[float, ...]


class Activator:
    """Algorithm 1 with the paper's policy and the two options of SPEC §4.

    ranking="confusion" (paper): after the predicted cluster j, add clusters in decreasing order of
    column j of the confusion matrix. ranking="probability": add them in decreasing order of V.
    weighting="confusion" (paper, Eq. 3): weights are the chosen clusters' column-j entries,
    normalised. weighting="probability" (003 Eq. 2): weights are the chosen clusters' V, normalised.
    ``smoothing`` is added to every confusion count (Laplace smoothing) so that a confusion never seen
    on held-out data still has a non-zero weight and no column sums to zero.
    """

    def __init__(
        self,
        confusion: np.ndarray,
        *,
        ranking: Ranking = "confusion",
        weighting: Weighting = "confusion",
        smoothing: float = 1.0,
    ) -> None:
        cm = np.asarray(confusion, dtype=np.float64)
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] < 1:
            raise ValueError(f"confusion matrix must be square (K, K), got shape {cm.shape}")
        if np.any(cm < 0) or not np.all(np.isfinite(cm)):
            raise ValueError("confusion matrix must hold finite, non-negative counts")
        if smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}")
        if ranking not in ("confusion", "probability"):
            raise ValueError(f"ranking must be 'confusion' or 'probability', got {ranking!r}")
        if weighting not in ("confusion", "probability"):
            raise ValueError(f"weighting must be 'confusion' or 'probability', got {weighting!r}")
        smoothed = cm + smoothing
        col_sums = smoothed.sum(axis=0, keepdims=True)
        if np.any(col_sums <= 0):
            raise ValueError("a confusion column sums to zero; use smoothing > 0")
        self.num_clusters = cm.shape[0]
        self.ranking: Ranking = ranking
        self.weighting: Weighting = weighting
        # P[i, j] = P(true cluster i | clustifier predicted j): each column sums to 1.
        self.column_probs = smoothed / col_sums
        # For each predicted j: cluster order, j first, then the rest by decreasing P[:, j].
        # Stable sort so that ties break by cluster index and results are reproducible.
        order = np.empty((self.num_clusters, self.num_clusters), dtype=np.int64)
        for j in range(self.num_clusters):
            rest = [i for i in np.argsort(-self.column_probs[:, j], kind="stable") if i != j]
            order[j] = [j, *rest]
        self._confusion_order = order

    def select(self, probs: np.ndarray, tau: float) -> Activation:
        """Choose the heads for one image whose clustifier softmax is ``probs``."""
        v = np.asarray(probs, dtype=np.float64)
        if v.shape != (self.num_clusters,):
            raise ValueError(f"probs must have shape ({self.num_clusters},), got {v.shape}")
        if not 0.0 <= tau <= 1.0 or np.isnan(tau):
            raise ValueError(f"tau must be in [0, 1], got {tau}")
        j = int(np.argmax(v))
        if self.ranking == "confusion":
            order = self._confusion_order[j]
        else:
            order = np.argsort(-v, kind="stable")
        if tau >= 1.0:
            n = self.num_clusters  # τ = 1 runs every head, whatever the float sums say.
        elif v[j] >= tau:
            n = 1
        else:
            # First l >= 2 whose summed V reaches τ; none does -> all heads.
            reached = np.nonzero(np.cumsum(v[order])[1:] >= tau)[0]
            n = int(reached[0]) + 2 if reached.size else self.num_clusters
        chosen = order[:n]
        if n == 1:
            return Activation(heads=(j,), weights=(1.0,))
        if self.weighting == "confusion":
            raw = self.column_probs[chosen, j]
        else:
            raw = v[chosen]
        total = raw.sum()
        w = raw / total if total > 0 else np.full(n, 1.0 / n)
        return Activation(heads=tuple(int(h) for h in chosen), weights=tuple(float(x) for x in w))

    def select_batch(self, probs: np.ndarray, tau: float) -> list[Activation]:
        """``select`` for each row of a (B, K) array."""
        p = np.asarray(probs)
        if p.ndim != 2:
            raise ValueError(f"probs must have shape (B, K), got {p.shape}")
        return [self.select(row, tau) for row in p]


def combine(
    activation: Activation,
    head_logits: dict[int, np.ndarray],
    clusters: list[list[int]],
    num_classes: int,
    combination: Combination = "eq3",
) -> np.ndarray:
    """Class scores (a probability vector over ``num_classes``) from the heads run.

    ``head_logits[i]`` is head i's raw output over its member classes ``clusters[i]`` (in that order).
    ``eq3``: score of class c in cluster i = w_i × softmax(H_i(x))_c. ``joint``: score ∝
    w_i × exp(H_i(x)_c) over every class of every head run, i.e. softmax(H_i(x)_c + log w_i).
    Either way classes of heads not run score 0, and with overlapping clusters a class's scores
    from several heads add up, so the result sums to 1.
    """
    if combination not in ("eq3", "joint"):
        raise ValueError(f"combination must be 'eq3' or 'joint', got {combination!r}")
    logits = []
    for head in activation.heads:
        z = np.asarray(head_logits[head], dtype=np.float64)
        if z.shape != (len(clusters[head]),):
            raise ValueError(f"head {head} gave {z.shape[0]} scores for {len(clusters[head])} classes")
        logits.append(z)
    members = np.concatenate([clusters[h] for h in activation.heads])
    if combination == "eq3":
        parts = [w * softmax(z) for w, z in zip(activation.weights, logits, strict=True)]
        p = np.concatenate(parts)
    else:
        with np.errstate(divide="ignore"):  # a zero weight is log 0 = -inf: that head scores 0
            p = softmax(np.concatenate([z + np.log(w) for w, z in
                                        zip(activation.weights, logits, strict=True)]))
    # bincount adds the scores of a class that several heads share (overlapping clusters).
    return np.bincount(members, weights=p, minlength=num_classes)


def fill_unrun(scores: np.ndarray, activation: Activation, clusters: list[list[int]],
               class_probs: np.ndarray) -> np.ndarray:
    """``combine``'s scores with the classes of heads not run filled from the clustifier.

    ``class_probs`` (C,) is the clustifier's own softmax over all classes (its cluster
    probabilities are sums of it). A class of a head not run scores its ``class_probs``; the
    classes of the heads run share the clustifier's mass on them, M = Σ class_probs there, in the
    proportions ``combine`` gave them. The result still sums to 1, and their order among
    themselves is unchanged — only classes that used to score 0 can now enter the top-k.
    """
    q = np.asarray(class_probs, dtype=np.float64)
    if q.shape != scores.shape:
        raise ValueError(f"class_probs must have shape {scores.shape}, got {q.shape}")
    run = np.zeros(len(q), dtype=bool)
    run[np.concatenate([clusters[h] for h in activation.heads])] = True
    return np.where(run, q[run].sum() * scores, q)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (float64 in, float64 out)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)
