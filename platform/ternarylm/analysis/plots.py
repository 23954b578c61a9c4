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


def _save(fig, ax, path: Path) -> Path:
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _by_size(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    points = sorted(points)
    return [p[0] for p in points], [p[1] for p in points]


def loss_vs_size(groups: dict[tuple[str, str], list[dict]], fits: dict[str, dict],
                 path: Path) -> Path:
    """Final validation loss against non-embedding parameters, with each group's L(N) fit."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (scheme, plan), rows in sorted(groups.items()):
        label = f"{scheme}/{plan}"
        n, loss = _by_size([(r["N"], r["val_loss"]) for r in rows if r["val_loss"] is not None])
        line = ax.plot(n, loss, "o", label=label)[0]
        fit = fits.get(label, {}).get("fit")
        if fit and fit["form"] == "L(N)" and n:
            grid = np.geomspace(min(n) / 1.5, max(n) * 2, 50)
            ax.plot(grid, fit["E"] + fit["A"] * grid ** -fit["alpha"], "-",
                    color=line.get_color(), alpha=0.6)
    ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="validation loss",
           title="loss vs size (lines: E + A N^-alpha)")
    ax.legend(fontsize=8)
    return _save(fig, ax, path)


def metric_vs_size(groups: dict[tuple[str, str], list[dict]], key: str, ylabel: str,
                   path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (scheme, plan), rows in sorted(groups.items()):
        n, v = _by_size([(r["N"], r[key]) for r in rows if r[key] is not None])
        ax.plot(n, v, "o-", label=f"{scheme}/{plan}")
    ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel=ylabel)
    ax.legend(fontsize=8)
    return _save(fig, ax, path)


def memory_vs_size(rows: list[dict], path: Path) -> Path:
    """Latent FP32 bytes against packed (deployable) bytes per plan."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_plan: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        if r["packed_bytes"] is not None and r["latent_fp32_bytes"] is not None:
            by_plan.setdefault(r["plan"], []).append((r["N"], r["latent_fp32_bytes"],
                                                      r["packed_bytes"]))
    for plan, points in sorted(by_plan.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[2] / 2**20 for p in points], "o-",
                label=f"{plan} packed")
    fp32 = sorted({(p[0], p[1]) for pts in by_plan.values() for p in pts})
    if fp32:
        ax.plot([p[0] for p in fp32], [p[1] / 2**20 for p in fp32], "k--", label="FP32 latent")
    ax.set(xscale="log", yscale="log", xlabel="non-embedding parameters N", ylabel="MiB")
    ax.legend(fontsize=8)
    return _save(fig, ax, path)


def sparsity_heatmap(rows: list[dict], path: Path) -> Path:
    """Zero-code fraction per block (columns) for every trial with ternary layers (rows)."""
    import numpy as np

    rows = [r for r in rows if r["blocks"]]
    fig, ax = plt.subplots(figsize=(7, 1 + 0.35 * max(1, len(rows))))
    if rows:
        width = max(max(r["blocks"]) for r in rows) + 1
        grid = np.full((len(rows), width), np.nan)
        for i, r in enumerate(rows):
            for b, v in r["blocks"].items():
                grid[i, b] = 100 * v
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        fig.colorbar(image, ax=ax, label="zero codes (%)")
        ax.set_yticks(range(len(rows)),
                      [f"{r['size']}/{r['scheme']}/{r['plan']}/s{r['seed']}" for r in rows],
                      fontsize=7)
    ax.set(xlabel="block", title="per-block sparsity")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def best_lr_vs_size(choices: dict[str, dict], path: Path) -> Path:
    """Each cell's chosen peak learning rate against its size (in the study's order), one line
    per scheme/plan: how the best rate moves with size and precision."""
    sizes = list(dict.fromkeys(cell.split("/")[0] for cell in choices))
    lines: dict[str, list[tuple[int, float]]] = {}
    for cell, choice in choices.items():
        size, group = cell.split("/", 1)
        lines.setdefault(group, []).append((sizes.index(size), choice["lr"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group, points in sorted(lines.items()):
        x, lr = _by_size(points)
        ax.plot(x, lr, "o-", label=group)
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set(yscale="log", xlabel="size", ylabel="chosen peak learning rate",
           title="best learning rate per cell")
    ax.legend(fontsize=8)
    return _save(fig, ax, path)
