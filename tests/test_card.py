"""The default-τ rule and the model card written beside a package's manifest."""

from __future__ import annotations

import pytest

from export.card import CARD, sweep_table
from export.sweep import choose_default_tau
from modelpack.manifest import SweepRow, load_manifest, sha256_file

ORIGINAL_TOP1 = 0.50


def row(tau: float, top1: float, saving: float, hist: list[int] | None = None) -> SweepRow:
    hist = hist or [10]
    return SweepRow(tau=tau, top1=top1, top5=min(1.0, top1 + 0.2), mean_flops=1e6 * (1 - saving),
                    flop_saving=saving, mean_heads=1.0, heads_histogram=hist,
                    cluster_accuracy=0.9, top1_gain=top1 - ORIGINAL_TOP1)


# Shaped like paper 002's Table 2: accuracy rises with τ and levels off, saving falls.
PAPER_LIKE = [row(0.5, 0.436, 0.339), row(0.6, 0.473, 0.300), row(0.7, 0.502, 0.258),
              row(0.8, 0.502, 0.200), row(0.9, 0.502, 0.114), row(0.95, 0.502, 0.037)]


def test_default_tau_is_the_biggest_saving_within_the_allowed_loss():
    tau, reason = choose_default_tau(PAPER_LIKE, ORIGINAL_TOP1, max_top1_loss=0.01)
    assert tau == 0.7  # the paper's own choice: the first τ after which accuracy stops rising
    assert "25.8%" in reason and "50.20%" in reason and "within 1 point" in reason


def test_a_looser_loss_buys_a_cheaper_tau():
    tau, _ = choose_default_tau(PAPER_LIKE, ORIGINAL_TOP1, max_top1_loss=0.03)
    assert tau == 0.6


def test_ties_in_saving_go_to_the_lower_tau():
    rows = [row(0.8, 0.50, 0.25), row(0.7, 0.50, 0.25), row(0.9, 0.50, 0.10)]
    assert choose_default_tau(rows, ORIGINAL_TOP1, 0.01)[0] == 0.7


def test_no_tau_close_enough_falls_back_to_the_most_accurate_that_saves_and_says_so():
    rows = [row(0.0, 0.40, 0.35), row(0.9, 0.46, 0.20), row(0.95, 0.46, 0.05),
            row(1.0, 0.47, -0.30)]
    tau, reason = choose_default_tau(rows, ORIGINAL_TOP1, max_top1_loss=0.01)
    assert tau == 0.9  # τ=1 is more accurate but costs more than the original; 0.95 saves less
    assert reason.startswith("τ = 0.9: no swept τ keeps top-1 within 1 point")
    assert "fewer FLOPs than the original" in reason


def test_fallback_treats_top1_within_a_tenth_of_a_point_as_a_tie_and_takes_the_cheaper():
    rows = [row(0.6, 0.4865, 0.301), row(0.7, 0.4875, 0.275), row(0.8, 0.4873, 0.231),
            row(0.9, 0.4880, 0.140)]
    tau, reason = choose_default_tau(rows, ORIGINAL_TOP1, max_top1_loss=0.01)
    assert tau == 0.7  # 0.9 is 0.05 point better (a tie) but saves 13 points less; 0.6 is 0.15 below
    assert "within 0.1 point" in reason


def test_when_nothing_saves_the_cheapest_tau_is_the_default():
    rows = [row(0.0, 0.40, -0.05), row(1.0, 0.45, -0.50)]
    tau, reason = choose_default_tau(rows, ORIGINAL_TOP1, max_top1_loss=0.01)
    assert tau == 0.0 and "cheapest" in reason


def test_an_empty_sweep_is_refused():
    with pytest.raises(ValueError, match="no sweep rows"):
        choose_default_tau([], ORIGINAL_TOP1, 0.01)


def test_sweep_table_has_the_paper_columns_and_groups_many_heads():
    rows = [row(0.0, 0.4, 0.3, [10]), row(1.0, 0.5, 0.1, [0, 0, 0, 0, 0, 0, 0, 0, 10])]
    lines = sweep_table(rows, num_heads=9, default_tau=1.0)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:8] == ["τ", "#1", "#2", "#3", "#4", "#5", "#6", "#7–9"]
    assert {"Acc. Gain", "CC. Save"} <= set(header)
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[0] == "**1** (default)" and cells[7] == "10" and cells[1] == "0"
    assert all(len(line.strip("|").split("|")) == len(header) for line in lines)


def test_pipeline_writes_a_card_the_manifest_vouches_for(synthetic_package):
    m = load_manifest(synthetic_package)  # verifies every listed file's sha256
    card = synthetic_package / CARD
    assert m.extra_files[CARD] == sha256_file(card)
    text = card.read_text()
    for section in ("## Summary", "## Default τ", "## Data and split", "## Training settings",
                    "## Components", "## Clusters", "## τ sweep"):
        assert section in text
    assert f"{100 * m.training.original_accuracy.top1:.2f}%" in text
    assert m.class_names[m.clusters[0].classes[0]].split(",")[0] in text
    assert text.count("\n| ") >= len(m.tau_sweep) + len(m.clusters)
    assert "(tau_sweep.png)" in text and (synthetic_package / "tau_sweep.png").exists()


def test_a_fresh_evaluation_reproduces_the_cards_sweep(synthetic_package, capsys):
    """`python -m export evaluate PACKAGE` rebuilds the validation split from the manifest's
    config and must print the very rows the card and manifest hold."""
    from export.__main__ import main

    m = load_manifest(synthetic_package)
    taus = [r.tau for r in m.tau_sweep][::3]
    assert main(["evaluate", str(synthetic_package), "--taus", ",".join(f"{t:g}" for t in taus)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    card = (synthetic_package / CARD).read_text()
    assert len(printed) == len(taus)
    for line, tau in zip(printed, taus, strict=True):
        expected = next(r for r in m.tau_sweep if r.tau == tau)
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert f"{100 * expected.top1:.2f}%" in cells and f"{100 * expected.flop_saving:.1f}%" in cells
        assert line in card.splitlines()  # the card's row, cell for cell


def test_the_card_shows_the_bf16_sweep_beside_fp32(synthetic_package):
    """Where OpenVINO and a bf16 CPU are there, the sweep also runs in bf16 and the card puts
    its top-1/top-5 beside fp32's at every τ (routes and FLOPs are the same)."""
    from modelpack.backend_choice import openvino_available

    if not openvino_available():
        pytest.skip("the openvino extra is not installed")
    from modelpack.openvino_backend import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions")
    m = load_manifest(synthetic_package)
    (sweep,) = m.precision_sweeps
    assert (sweep.backend, sweep.precision) == ("openvino", "bf16")
    assert [r.tau for r in sweep.rows] == [r.tau for r in m.tau_sweep]
    for fp32, bf16 in zip(m.tau_sweep, sweep.rows, strict=True):
        assert abs(fp32.top1 - bf16.top1) <= 0.05  # 240 images: a handful may move
    assert abs(sweep.original.top1 - m.training.original_accuracy.top1) <= 0.05
    text = (synthetic_package / CARD).read_text()
    assert "Served on openvino bf16" in text
    for r in sweep.rows:
        assert any(line.startswith(f"| {r.tau:g} | ") and f"{100 * r.top1:.2f}%" in line
                   for line in text.splitlines())
