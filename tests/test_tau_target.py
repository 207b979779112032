"""τ from a target (modelpack.sweep.tau_for_target) on hand-made sweeps: the rule, edges, refusals."""

from types import SimpleNamespace

import pytest

from modelpack.manifest import SweepRow
from modelpack.sweep import Target, TargetUnreachable, tau_for_target

ORIGINAL_TOP1 = 0.60
ORIGINAL_FLOPS = 1000e6


def _row(tau: float, top1: float, saving: float, top5: float = 0.8) -> SweepRow:
    return SweepRow(tau=tau, top1=top1, top5=top5, mean_flops=ORIGINAL_FLOPS * (1 - saving),
                    flop_saving=saving, mean_heads=1 + tau, heads_histogram=[1],
                    cluster_accuracy=0.9, top1_gain=top1 - ORIGINAL_TOP1)


def _package(rows: list[SweepRow]) -> SimpleNamespace:
    """What tau_for_target reads of a manifest: the sweep and the original's accuracy."""
    return SimpleNamespace(name="hand-made", version="0", tau_sweep=rows,
                           training=SimpleNamespace(original_accuracy=SimpleNamespace(top1=ORIGINAL_TOP1)))


# Accuracy rises and saving falls with τ, as in every real sweep.
SWEEP = _package([_row(0.0, 0.55, 0.50), _row(0.5, 0.58, 0.40), _row(0.8, 0.595, 0.20),
                  _row(1.0, 0.60, -0.30)])


def test_saving_target_takes_the_most_accurate_tau_that_meets_it():
    e = tau_for_target(SWEEP, Target("flop_saving", 0.40))
    assert e.tau == pytest.approx(0.5) and e.flop_saving == pytest.approx(0.40)
    # between rows: the interpolated saving crosses 0.30 halfway from 0.5 to 0.8
    e = tau_for_target(SWEEP, Target("flop_saving", 0.30))
    assert e.tau == pytest.approx(0.65) and e.method == "interpolated"
    assert e.flop_saving == pytest.approx(0.30) and e.top1 == pytest.approx(0.5875)
    assert tau_for_target(SWEEP, Target("flop_saving", 0.0)).flop_saving >= 0.0


def test_mflops_target_is_the_saving_target_in_flops():
    by_flops = tau_for_target(SWEEP, Target("mflops", 700))
    by_saving = tau_for_target(SWEEP, Target("flop_saving", 0.30))
    assert by_flops.tau == pytest.approx(by_saving.tau)
    assert by_flops.mean_flops <= 700e6 * (1 + 1e-9)


def test_accuracy_target_takes_the_cheapest_tau_that_meets_it():
    e = tau_for_target(SWEEP, Target("max_top1_loss", 0.02))  # top-1 >= 0.58: τ >= 0.5
    assert e.tau == pytest.approx(0.5) and e.flop_saving == pytest.approx(0.40)
    e = tau_for_target(SWEEP, Target("max_top1_loss", 0.01))  # 0.59: two thirds of 0.5 → 0.8
    assert e.tau == pytest.approx(0.7) and e.top1 == pytest.approx(0.59)
    assert tau_for_target(SWEEP, Target("max_top1_loss", 0.0)).tau == pytest.approx(1.0)
    assert tau_for_target(SWEEP, Target("max_top1_loss", 1.0)).tau == pytest.approx(0.0)


def test_unreachable_targets_name_the_best_reachable_value():
    with pytest.raises(TargetUnreachable, match="50.0%") as e:
        tau_for_target(SWEEP, Target("flop_saving", 0.6))
    assert e.value.best == pytest.approx(0.50)
    with pytest.raises(TargetUnreachable, match="500 MFLOPs") as e:
        tau_for_target(SWEEP, Target("mflops", 100))
    assert e.value.best == pytest.approx(500)
    worse = _package([_row(0.0, 0.50, 0.5), _row(1.0, 0.57, 0.1)])
    with pytest.raises(TargetUnreachable, match="3.00 points") as e:
        tau_for_target(worse, Target("max_top1_loss", 0.005))
    assert e.value.best == pytest.approx(0.03)


def test_bounds_limit_the_choice_and_the_refusal():
    e = tau_for_target(SWEEP, Target("flop_saving", 0.45), within=(0.2, 0.9))
    assert e.tau == pytest.approx(0.25)  # the crossing inside the bounds
    e = tau_for_target(SWEEP, Target("max_top1_loss", 0.1), within=(0.6, 0.9))
    assert e.tau == pytest.approx(0.6)  # any τ meets it: the cheapest inside the bounds
    with pytest.raises(TargetUnreachable, match=r"in \[0.6, 0.9\].*33.3%"):
        tau_for_target(SWEEP, Target("flop_saving", 0.45), within=(0.6, 0.9))
    with pytest.raises(ValueError, match="bounds"):
        tau_for_target(SWEEP, Target("flop_saving", 0.45), within=(0.9, 0.6))


def test_a_non_monotone_sweep_still_gets_the_best_tau():
    # a dip in accuracy at 0.5: the saving target must not stop at the first τ that meets it
    bumpy = _package([_row(0.0, 0.56, 0.5), _row(0.3, 0.58, 0.45), _row(0.5, 0.57, 0.44),
                      _row(1.0, 0.60, -0.2)])
    e = tau_for_target(bumpy, Target("flop_saving", 0.44))
    assert e.tau == pytest.approx(0.3) and e.top1 == pytest.approx(0.58)


def test_ties_prefer_the_cheaper_tau_for_compute_targets():
    flat = _package([_row(0.0, 0.55, 0.5, top5=0.8), _row(0.5, 0.58, 0.4, top5=0.8),
                     _row(0.8, 0.58, 0.2, top5=0.8), _row(1.0, 0.58, -0.3, top5=0.8)])
    assert tau_for_target(flat, Target("flop_saving", 0.1)).tau == pytest.approx(0.5)


def test_a_package_without_a_sweep_cannot_take_a_target():
    with pytest.raises(ValueError, match="no τ sweep"):
        tau_for_target(_package([]), Target("flop_saving", 0.3))
    with pytest.raises(ValueError, match="target must be one of"):
        Target("latency", 1.0)
