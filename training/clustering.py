"""Grouping classes into hyper-classes (stage 3): paper 002 Algorithm 2, or linkage (003 Alg. 1).

Algorithm 2, step by step:
1. A = KNN graph of the similarity matrix, with the smallest k that makes the graph connected.
2. D = diag(Σ_j A_ij).
3. L = D − A (unnormalised Laplacian).
4. Solve the generalised eigenproblem L x = λ D x (scipy.linalg.eigh).
5. Number of clusters k by the eigengap heuristic within [min_clusters, max_clusters];
   X = eigenvectors of the k smallest eigenvalues.
6. Y = rows of X normalised to unit length.
7. k-means on the rows of Y (scikit-learn); class i joins the cluster of row i.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.linalg import eigh
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import squareform
from sklearn.cluster import KMeans


@dataclass
class Clustering:
    clusters: list[list[int]]  # member classes of each cluster, sorted; clusters ordered by first member
    k_neighbors: int = 0  # k of the KNN graph (spectral)
    eigenvalues: list[float] = field(default_factory=list)  # smallest generalised eigenvalues
    method: str = "spectral"


def knn_graph(similarity: np.ndarray, k: int) -> np.ndarray:
    """Keep each node's k most similar neighbours (weights = similarity), symmetrised with max."""
    s = np.asarray(similarity, dtype=np.float64).copy()
    np.fill_diagonal(s, -np.inf)
    n = len(s)
    nbrs = np.argsort(-s, axis=1, kind="stable")[:, :k]
    a = np.zeros_like(s)
    rows = np.repeat(np.arange(n), k)
    a[rows, nbrs.ravel()] = np.maximum(s[rows, nbrs.ravel()], 1e-12)  # an edge never weighs 0
    return np.maximum(a, a.T)


def smallest_connected_knn(similarity: np.ndarray) -> tuple[np.ndarray, int]:
    """Step 1: the KNN graph with the smallest k in [1, n-1] that is connected."""
    n = len(similarity)
    for k in range(1, n):
        a = knn_graph(similarity, k)
        if connected_components(a > 0, directed=False)[0] == 1:
            return a, k
    raise AssertionError("a complete graph is always connected")  # pragma: no cover


def eigengap(eigenvalues: np.ndarray, min_k: int, max_k: int) -> int:
    """k in [min_k, max_k] maximising λ_{k+1} − λ_k (eigenvalues ascending, 1-based k)."""
    lam = np.asarray(eigenvalues)
    max_k = min(max_k, len(lam) - 1)
    if max_k < min_k:
        return max(1, min(min_k, len(lam)))
    gaps = lam[min_k:max_k + 1] - lam[min_k - 1:max_k]  # gaps[i] = λ_{k+1} − λ_k for k = min_k + i
    return int(np.argmax(gaps)) + min_k


def _ordered(labels: np.ndarray) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for cls, lab in enumerate(labels):
        groups.setdefault(int(lab), []).append(cls)
    return sorted(groups.values(), key=lambda g: g[0])


def spectral_clusters(similarity: np.ndarray, *, min_clusters: int = 2, max_clusters: int = 16,
                      num_clusters: int = 0, seed: int = 0) -> Clustering:
    """Algorithm 2. ``num_clusters`` > 0 fixes k instead of the eigengap choice."""
    s = np.asarray(similarity, dtype=np.float64)
    n = len(s)
    if s.shape != (n, n) or n < 2:
        raise ValueError(f"similarity must be a square matrix of at least 2 classes, got {s.shape}")
    if min_clusters < 1 or max_clusters < min_clusters:
        raise ValueError(f"need 1 <= min_clusters <= max_clusters, got {min_clusters}, {max_clusters}")
    a, k_nn = smallest_connected_knn(s)                      # 1) (n, n)
    d = np.diag(a.sum(axis=1))                               # 2)
    lap = d - a                                              # 3)
    lam, vec = eigh(lap, d)                                  # 4) ascending λ, vec (n, n)
    k = num_clusters or eigengap(lam, min_clusters, min(max_clusters, n))  # 5)
    k = min(k, n)
    x = vec[:, :k]                                           # (n, k)
    y = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # 6)
    labels = KMeans(n_clusters=k, n_init=20, random_state=seed).fit_predict(y)  # 7)
    return Clustering(_ordered(labels), k_nn, lam[: min(n, max_clusters + 2)].tolist(), "spectral")


def linkage_clusters(similarity: np.ndarray, num_clusters: int, *, gamma: float = 0.0,
                     confusion: np.ndarray | None = None) -> Clustering:
    """Average linkage (UPGMA) on D = 1 − C (paper 003 Alg. 1), optionally with overlap γ.

    C is the similarity scaled to [0, 1]. With γ > 0, a class j outside cluster Q joins Q when the
    column-normalised confusion DCN[i, j] ≥ 1 / (γ·K) for every member i of Q (003's condition).
    """
    s = np.asarray(similarity, dtype=np.float64)
    c = s / s.max() if s.max() > 0 else s
    dist = 1.0 - c
    np.fill_diagonal(dist, 0.0)
    dist = 0.5 * (dist + dist.T)
    z = linkage(squareform(dist, checks=False), method="average")
    labels = fcluster(z, t=num_clusters, criterion="maxclust")
    clusters = _ordered(labels)
    if gamma > 0:
        if confusion is None:
            raise ValueError("overlap (gamma > 0) needs the class confusion matrix")
        cm = np.asarray(confusion, dtype=np.float64)
        dcn = cm / np.maximum(cm.sum(axis=0, keepdims=True), 1)  # P(true i | predicted j)
        threshold = 1.0 / (gamma * len(s))
        grown = []
        for members in clusters:
            extra = [j for j in range(len(s)) if j not in members
                     and all(dcn[i, j] >= threshold for i in members)]
            grown.append(sorted(members + extra))
        clusters = grown
    return Clustering(clusters, method="linkage")
