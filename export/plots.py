"""The τ sweep's plot: top-1 against compute, the picture a person tunes τ from."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: exports run on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

from modelpack.manifest import SweepRow  # noqa: E402


def plot_tau_sweep(rows: Sequence[SweepRow], original_top1: float, original_flops: int,
                   path: Path, title: str = "") -> None:
    """Top-1 against mean FLOPs, one point per τ, with the original model as a reference."""
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r.mean_flops / 1e6 for r in rows]
    y = [100 * r.top1 for r in rows]
    ax.plot(x, y, "o-", color="tab:blue", label="CP-CNN (τ sweep)")
    # One label per distinct point: several τ often give the same routing (e.g. τ=0…0.8).
    labels: dict[tuple[float, float], list[float]] = {}
    for r, xi, yi in zip(rows, x, y, strict=True):
        labels.setdefault((round(xi, 6), round(yi, 6)), []).append(r.tau)
    for k, ((xi, yi), taus) in enumerate(labels.items()):
        text = f"τ={taus[0]:g}" if len(taus) == 1 else f"τ={taus[0]:g}…{taus[-1]:g}"
        ax.annotate(text, (xi, yi), textcoords="offset points", fontsize=8,
                    xytext=(4, 6 if k % 2 else -12))
    ax.plot([original_flops / 1e6], [100 * original_top1], "s", color="tab:red",
            label="original model")
    ax.axhline(100 * original_top1, color="tab:red", lw=0.8, ls="--")
    ax.set_xlabel("mean MFLOPs per image")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "accuracy against compute")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
