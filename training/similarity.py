"""Class similarity from a trained model's held-out predictions (stage 2 of the pipeline).

Every method returns a symmetric (C, C) similarity matrix with non-negative entries, so the
clustering stage has one input type whatever the method:

* ``indicator`` (paper 002 Eq. 2, default): V_i = mean softmax over held-out images of class i;
  similarity = self-tuning Gaussian kernel of the euclidean distances between indicator vectors.
* ``confusion`` (paper 001 Eq. 7): A = (F + Fᵀ)/2, F the row-normalised confusion matrix.
* ``affinity`` (paper 001 Eq. 6): A_pq = (Σ_{y=p} score_q + Σ_{y=q} score_p) / N.
* ``codetection`` (paper 004 Eq. 4): A_ij = E[M_i,K(x) · M_j,K(x)], M = class in the top-K.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.spatial.distance import cdist

Method = Literal["indicator", "confusion", "affinity", "codetection"]
METHODS: tuple[str, ...] = ("indicator", "confusion", "affinity", "codetection")


def indicator_vectors(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Eq. 2: row i is the mean predicted distribution over held-out images of true class i."""
    v = np.zeros((num_classes, probs.shape[1]), dtype=np.float64)
    np.add.at(v, labels, probs)
    counts = np.bincount(labels, minlength=num_classes)
    if np.any(counts == 0):
        missing = np.nonzero(counts == 0)[0][:10].tolist()
        raise ValueError(f"no held-out images for classes {missing}: enlarge the calibration split")
    return v / counts[:, None]


def kernel_similarity(points: np.ndarray, scale_neighbor: int = 7) -> np.ndarray:
    """Self-tuning Gaussian kernel exp(-d²/(σ_i σ_j)), σ_i = distance to the i-th point's n-th neighbour.

    A local scale keeps tight groups tight and far groups far without one global bandwidth to tune.
    """
    d = cdist(points, points)
    n = min(scale_neighbor, len(points) - 1)
    sigma = np.sort(d, axis=1)[:, n]
    sigma = np.maximum(sigma, 1e-12)
    s = np.exp(-(d**2) / np.outer(sigma, sigma))
    np.fill_diagonal(s, 0.0)
    return s


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true, predicted]."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def class_similarity(probs: np.ndarray, labels: np.ndarray, method: Method = "indicator",
                     *, top_k: int = 5) -> np.ndarray:
    """Similarity between classes from held-out softmax ``probs`` (N, C) and true ``labels``."""
    num_classes = probs.shape[1]
    if method == "indicator":
        sim = kernel_similarity(indicator_vectors(probs, labels, num_classes))
    elif method == "confusion":
        cm = confusion_matrix(probs.argmax(1), labels, num_classes).astype(np.float64)
        f = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        sim = 0.5 * (f + f.T)
    elif method == "affinity":
        s = np.zeros((num_classes, num_classes))
        np.add.at(s, labels, probs)  # s[p, q] = Σ_{y=p} score_q
        sim = (s + s.T) / len(labels)
    elif method == "codetection":
        k = min(top_k, num_classes)
        top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
        m = np.zeros_like(probs, dtype=np.float64)
        np.put_along_axis(m, top, 1.0, axis=1)
        sim = m.T @ m / len(labels)
    else:
        raise ValueError(f"unknown similarity method {method!r}; choose one of {METHODS}")
    sim = np.asarray(sim, dtype=np.float64)
    np.fill_diagonal(sim, 0.0)
    return 0.5 * (sim + sim.T)
