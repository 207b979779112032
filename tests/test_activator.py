"""The activator (paper 002 Alg. 1, Eq. 3) on hand-made cases."""

import numpy as np
import pytest

from modelpack.activator import Activation, Activator, combine, softmax

# 4 clusters. Column j = where the truth lies when the clustifier predicts j ([true, predicted]).
CM = np.array([
    [50, 0, 5, 1],
    [2, 40, 10, 0],
    [8, 6, 60, 0],
    [0, 4, 25, 70],
])


def test_tau_zero_runs_exactly_one_head():
    act = Activator(CM)
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = softmax(rng.normal(size=4))
        a = act.select(v, 0.0)
        assert a.heads == (int(np.argmax(v)),)
        assert a.weights == (1.0,)


def test_tau_one_runs_all_heads_even_when_one_cluster_is_certain():
    act = Activator(CM)
    # V_j == 1.0 exactly in float: the paper's test "V_j >= τ" alone would run one head.
    a = act.select(np.array([0.0, 1.0, 0.0, 0.0]), 1.0)
    assert sorted(a.heads) == [0, 1, 2, 3]
    assert a.heads[0] == 1
    assert sum(a.weights) == pytest.approx(1.0)


def test_weights_sum_to_one_and_heads_unique():
    rng = np.random.default_rng(1)
    for ranking in ("confusion", "probability"):
        for weighting in ("confusion", "probability"):
            act = Activator(CM, ranking=ranking, weighting=weighting)
            for _ in range(100):
                v = softmax(rng.normal(size=4) * 2)
                a = act.select(v, float(rng.uniform()))
                assert sum(a.weights) == pytest.approx(1.0)
                assert len(set(a.heads)) == len(a.heads)
                assert all(w > 0 for w in a.weights)


def test_heads_run_never_decrease_as_tau_grows():
    rng = np.random.default_rng(2)
    taus = np.linspace(0, 1, 41)
    for ranking in ("confusion", "probability"):
        act = Activator(CM, ranking=ranking)
        for _ in range(50):
            v = softmax(rng.normal(size=4))
            counts = [len(act.select(v, t).heads) for t in taus]
            assert counts == sorted(counts)
            assert counts[0] == 1 and counts[-1] == 4


def test_paper_fig2_example():
    """Fig. 2: the clustifier predicts N but V_N < τ; CC_1 and CC_2 (the clusters most confused
    with N, from column N of the confusion matrix) are added until ΣV reaches τ, and Eq. 3 weighs
    head f by P_fN / (P_1N + P_2N + P_NN)."""
    # Predicted N = 2. Column 2 of CM (counts): [5, 10, 60, 25] -> after N, cluster 3 then 1.
    v = np.array([0.05, 0.15, 0.45, 0.35])
    act = Activator(CM, smoothing=0.0)
    assert act.select(v, 0.40).heads == (2,)  # V_N = 0.45 >= 0.40: head N alone
    a = act.select(v, 0.70)  # 0.45 < 0.7; + V_3 = 0.80 >= 0.7
    assert a.heads == (2, 3)
    np.testing.assert_allclose(a.weights, [60 / 85, 25 / 85])
    a = act.select(v, 0.90)  # 0.80 < 0.9; + V_1 = 0.95 >= 0.9: three heads as in Fig. 2
    assert a.heads == (2, 3, 1)
    np.testing.assert_allclose(a.weights, [60 / 95, 25 / 95, 10 / 95])


def test_confusion_ranking_differs_from_probability_ranking():
    # Predicted 2; V ranks cluster 1 second, the confusion column ranks cluster 3 second.
    v = np.array([0.0, 0.3, 0.4, 0.3 - 1e-9])
    a_conf = Activator(CM).select(v, 0.65)
    a_prob = Activator(CM, ranking="probability").select(v, 0.65)
    assert a_conf.heads == (2, 3)
    assert a_prob.heads == (2, 1)


def test_probability_weighting_uses_v():
    v = np.array([0.1, 0.2, 0.4, 0.3])
    a = Activator(CM, weighting="probability").select(v, 0.65)
    assert a.heads == (2, 3)
    np.testing.assert_allclose(a.weights, [0.4 / 0.7, 0.3 / 0.7])


def test_smoothing_gives_unseen_confusions_a_weight():
    cm = np.diag([10, 10, 10])  # no confusion ever seen
    a = Activator(cm, smoothing=1.0).select(np.array([0.4, 0.35, 0.25]), 0.7)
    assert len(a.heads) >= 2
    assert all(w > 0 for w in a.weights)
    with pytest.raises(ValueError, match="sums to zero"):
        Activator(np.zeros((3, 3)), smoothing=0.0)


def test_single_cluster():
    a = Activator(np.array([[5]])).select(np.array([1.0]), 0.9)
    assert a.heads == (0,) and a.weights == (1.0,)


@pytest.mark.parametrize("tau", [-0.1, 1.1, float("nan")])
def test_tau_out_of_range_rejected(tau):
    with pytest.raises(ValueError, match="tau"):
        Activator(CM).select(np.full(4, 0.25), tau)


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="square"):
        Activator(np.ones((2, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        Activator(-np.ones((2, 2)))
    with pytest.raises(ValueError, match="shape"):
        Activator(CM).select(np.full(3, 1 / 3), 0.5)


def test_combine_eq3():
    clusters = [[0, 3], [1], [2, 4]]
    act = Activation(heads=(2, 0), weights=(0.75, 0.25))
    # Heads give logits; log-probabilities are logits whose softmax is exactly those probabilities.
    logits = {2: np.log([0.9, 0.1]), 0: np.log([0.4, 0.6])}
    scores = combine(act, logits, clusters, 5)
    np.testing.assert_allclose(scores, [0.1, 0.0, 0.675, 0.15, 0.075])
    assert scores.sum() == pytest.approx(1.0)


def test_combine_eq3_ignores_a_shift_of_one_heads_logits():
    clusters = [[0, 1], [2, 3]]
    act = Activation(heads=(0, 1), weights=(0.6, 0.4))
    base = {0: np.array([1.0, 2.0]), 1: np.array([0.5, -1.0])}
    shifted = {0: base[0] + 7.0, 1: base[1]}
    np.testing.assert_allclose(combine(act, base, clusters, 4), combine(act, shifted, clusters, 4))


def test_combine_overlapping_clusters_add_up():
    clusters = [[0, 1], [1, 2]]
    act = Activation(heads=(0, 1), weights=(0.5, 0.5))
    scores = combine(act, {0: np.log([0.2, 0.8]), 1: np.log([0.6, 0.4])}, clusters, 3)
    np.testing.assert_allclose(scores, [0.1, 0.7, 0.2])


def test_combine_joint_is_one_softmax_over_the_heads_logits_plus_log_weights():
    clusters = [[0, 3], [1], [2, 4]]
    act = Activation(heads=(2, 0), weights=(0.75, 0.25))
    logits = {2: np.array([1.0, -1.0]), 0: np.array([3.0, 0.0])}
    scores = combine(act, logits, clusters, 5, "joint")
    z = np.array([0.25 * np.exp(3.0), 0.75 * np.exp(1.0), 0.25 * np.exp(0.0), 0.75 * np.exp(-1.0)])
    np.testing.assert_allclose(scores[[0, 2, 3, 4]], z / z.sum())  # classes 0, 2, 3, 4
    assert scores[1] == 0.0  # head 1 not run
    # Unlike Eq. 3, a head's own evidence counts: head 0's large logit beats head 2's weight.
    assert scores.argmax() == 0
    assert combine(act, logits, clusters, 5, "eq3").argmax() == 2


def test_combine_joint_with_every_head_and_equal_weights_is_the_full_softmax():
    """Heads that are the original's logits restricted to their cluster reproduce the original."""
    rng = np.random.default_rng(0)
    full = rng.normal(size=7) * 3
    clusters = [[0, 4], [1, 2, 6], [3, 5]]
    act = Activation(heads=(1, 0, 2), weights=(1 / 3, 1 / 3, 1 / 3))
    scores = combine(act, {i: full[m] for i, m in enumerate(clusters)}, clusters, 7, "joint")
    np.testing.assert_allclose(scores, softmax(full))


def test_combine_joint_gives_a_zero_weight_head_no_score():
    clusters = [[0], [1]]
    act = Activation(heads=(0, 1), weights=(1.0, 0.0))
    scores = combine(act, {0: np.array([0.0]), 1: np.array([50.0])}, clusters, 2, "joint")
    np.testing.assert_allclose(scores, [1.0, 0.0])


def test_combine_joint_overlap_adds_up_and_rejects_unknown_modes():
    clusters = [[0, 1], [1, 2]]
    act = Activation(heads=(0, 1), weights=(0.5, 0.5))
    logits = {0: np.array([0.0, 0.0]), 1: np.array([0.0, 0.0])}
    np.testing.assert_allclose(combine(act, logits, clusters, 3, "joint"), [0.25, 0.5, 0.25])
    with pytest.raises(ValueError, match="combination"):
        combine(act, logits, clusters, 3, "mean")


def test_select_batch_matches_select():
    rng = np.random.default_rng(3)
    v = softmax(rng.normal(size=(6, 4)), axis=1)
    act = Activator(CM)
    assert act.select_batch(v, 0.8) == [act.select(row, 0.8) for row in v]


def test_fill_scores_unrun_classes_from_the_clustifier():
    """Top-5 fill: classes of heads not run get the clustifier's own probability; the run classes
    share its mass on them in combine's proportions, so their order is kept and the sum is 1."""
    from modelpack.activator import fill_unrun

    clusters = [[0, 1], [2, 3, 4]]
    act = Activation(heads=(0,), weights=(1.0,))
    base = combine(act, {0: np.array([2.0, 0.0])}, clusters, 5)
    assert base[2:].sum() == 0.0  # without fill: unreachable for top-k
    q = np.array([0.3, 0.1, 0.35, 0.05, 0.2])
    filled = fill_unrun(base, act, clusters, q)
    assert filled.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(filled[2:], q[2:])
    np.testing.assert_allclose(filled[:2], 0.4 * base[:2])  # M = 0.3 + 0.1
    assert np.argsort(-filled[:2]).tolist() == np.argsort(-base[:2]).tolist()
    every = Activation(heads=(0, 1), weights=(0.5, 0.5))
    all_run = combine(every, {0: np.zeros(2), 1: np.zeros(3)}, clusters, 5)
    np.testing.assert_allclose(fill_unrun(all_run, every, clusters, q), all_run)  # nothing to fill
    with pytest.raises(ValueError, match="class_probs must have shape"):
        fill_unrun(base, act, clusters, q[:4])
