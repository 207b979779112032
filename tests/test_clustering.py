"""Algorithm 2 (spectral + eigengap) and the linkage option on planted structure."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from training.clustering import (
    eigengap,
    knn_graph,
    linkage_clusters,
    smallest_connected_knn,
    spectral_clusters,
)
from training.similarity import class_similarity, indicator_vectors


def planted(sizes, within=0.8, across=0.05, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    n = len(labels)
    s = np.where(labels[:, None] == labels[None, :], within, across) + rng.uniform(0, noise, (n, n))
    s = 0.5 * (s + s.T)
    perm = rng.permutation(n)
    return s[perm][:, perm], labels[perm]


def as_labels(clusters, n):
    out = np.full(n, -1)
    for i, members in enumerate(clusters):
        out[members] = i
    return out


@pytest.mark.parametrize("sizes", [[5, 8, 3, 6], [10, 10], [4, 4, 4, 4, 4, 4, 4], [20, 3, 12]])
def test_spectral_recovers_planted_blocks_and_eigengap_finds_their_number(sizes):
    s, truth = planted(sizes)
    result = spectral_clusters(s, min_clusters=2, max_clusters=10)
    assert len(result.clusters) == len(sizes)
    assert adjusted_rand_score(truth, as_labels(result.clusters, len(truth))) == 1.0
    assert sorted(c for cl in result.clusters for c in cl) == list(range(len(truth)))


def test_fixed_number_of_clusters_overrides_eigengap():
    s, _ = planted([6, 6, 6, 6])
    assert len(spectral_clusters(s, num_clusters=2).clusters) == 2


def test_smallest_connected_k():
    # Two tight pairs far apart: k=1 links only within pairs (2 components); k=2 must bridge.
    s = np.array([[0, 0.9, 0.1, 0.0], [0.9, 0, 0.0, 0.1], [0.1, 0.0, 0, 0.9], [0.0, 0.1, 0.9, 0]])
    a, k = smallest_connected_knn(s)
    assert k == 2
    assert np.allclose(a, a.T)
    assert np.all(np.diag(a) == 0)
    assert np.count_nonzero(knn_graph(s, 1)) == 4  # only the two pairs, symmetrised


def test_eigengap_respects_bounds():
    lam = np.array([0.0, 0.01, 0.02, 0.9, 0.95, 1.0])
    assert eigengap(lam, 2, 5) == 3
    assert eigengap(lam, 4, 5) in (4, 5)
    assert eigengap(lam, 1, 1) == 1


def test_linkage_recovers_blocks_and_overlap_adds_confused_classes():
    s, truth = planted([5, 5, 5])
    result = linkage_clusters(s, 3)
    assert adjusted_rand_score(truth, as_labels(result.clusters, len(truth))) == 1.0
    # Overlap: a class predicted as class 0's neighbours often joins their cluster too.
    cm = np.eye(4, dtype=int) * 10
    cm[0, 3] = 10  # true 0 often predicted 3
    cm[1, 3] = 10
    sim = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=float)
    grown = linkage_clusters(sim, 2, gamma=2.0, confusion=cm)
    assert [0, 1, 3] in grown.clusters
    with pytest.raises(ValueError, match="confusion"):
        linkage_clusters(sim, 2, gamma=2.0)


def test_indicator_vectors_eq2():
    probs = np.array([[0.8, 0.2], [0.6, 0.4], [0.1, 0.9]])
    labels = np.array([0, 0, 1])
    np.testing.assert_allclose(indicator_vectors(probs, labels, 2), [[0.7, 0.3], [0.1, 0.9]])
    with pytest.raises(ValueError, match="no held-out images"):
        indicator_vectors(probs, np.array([0, 0, 0]), 2)


@pytest.mark.parametrize("method", ["indicator", "confusion", "affinity", "codetection"])
def test_similarity_methods_see_the_planted_confusions(method):
    """Classes {0,1} and {2,3} are confused with each other: every method must find it."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    partner = np.array([1, 0, 3, 2])[labels]
    probs = np.full((200, 4), 0.02)
    probs[np.arange(200), labels] = 0.6
    probs[np.arange(200), partner] = 0.36
    flip = rng.uniform(size=200) < 0.3  # 30 % predicted as the partner
    probs[flip, labels[flip]], probs[flip, partner[flip]] = 0.36, 0.6
    sim = class_similarity(probs, labels, method, top_k=2)
    assert np.allclose(sim, sim.T)
    assert sim[0, 1] > sim[0, 2] and sim[2, 3] > sim[1, 3]
    clusters = spectral_clusters(sim, min_clusters=2, max_clusters=3).clusters
    assert sorted(clusters) == [[0, 1], [2, 3]]
