"""Plots a person would rather look at than read: the clusters' sizes (stage 3)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: training runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_cluster_sizes(sizes: Sequence[int], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(sizes) + 2), 3))
    ax.bar(range(len(sizes)), sizes, color="tab:blue")
    ax.set_xlabel("cluster (hyper-class)")
    ax.set_ylabel("classes")
    ax.set_title(f"{len(sizes)} clusters, {sum(sizes)} class memberships")
    ax.set_xticks(range(len(sizes)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
