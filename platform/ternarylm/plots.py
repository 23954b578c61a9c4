"""Figures logged as MLflow artifacts (PNG, drawn headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_curves(series: dict[str, list[tuple[int, float]]], path: Path, title: str) -> Path:
    """One line per named series of (step, value)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        if points:
            ax.plot(*zip(*points), label=name, marker="." if len(points) < 30 else None)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def block_sparsity_bars(sparsity: dict[int, float], path: Path, title: str) -> Path:
    """Fraction of zero codes per transformer block."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    blocks = sorted(sparsity)
    ax.bar([str(b) for b in blocks], [100 * sparsity[b] for b in blocks])
    ax.set(xlabel="block", ylabel="zero codes (%)", title=title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
