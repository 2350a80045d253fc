"""A picture of a synthetic transfer set: a row of inputs per class, each scaled to its own range."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def class_grid(images: torch.Tensor, targets: torch.Tensor, num_classes: int, path: str | Path,
               per_class: int = 8) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(num_classes, per_class, figsize=(per_class * 0.9, num_classes * 0.9), dpi=100,
                             squeeze=False)
    for c in range(num_classes):
        picked = images[targets == c][:per_class]
        for j, ax in enumerate(axes[c]):
            ax.axis("off")
            if j < len(picked):
                img = picked[j].float()
                img = (img - img.min()) / (img.max() - img.min() + 1e-8)
                cmap = "gray" if img.shape[0] == 1 else None
                ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap=cmap)
        axes[c][0].set_title(f"class {c}", fontsize=7, loc="left")
    fig.suptitle("synthesised from the teacher (DeepInversion), one row per target class", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
