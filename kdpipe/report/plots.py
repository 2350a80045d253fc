"""Plots logged as artefacts on the pipeline run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def accuracy_vs_size(rows: list[dict], path: str | Path) -> Path:
    """One point per model of the pipeline (teacher included): test accuracy against the bytes
    of its saved artefact, on a log scale, so the compression trade-off reads at a glance."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    sizes = [r["model/size_bytes"] / 1024 for r in rows]
    accs = [100 * r["test/acc"] for r in rows]
    ax.plot(sizes, accs, color="0.7", zorder=1)
    ax.scatter(sizes, accs, zorder=2)
    for r, x, y in zip(rows, sizes, accs, strict=True):
        label = r["stage"] + (" (int8)" if r.get("kind") == "onnx" else "")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("model size (KiB, saved artefact)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy against size")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
