"""The evaluate stage's measurement of an early-exit model, as it ships: segments exported (and
quantized like the model itself), thresholds calibrated on the validation split for
`exits.max_acc_drop`, then accuracy, the share leaving at each exit and the mean latency per sample
at batch 1 measured on the test split against the same model run to the end, on one runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from kdpipe.compress.quantize import quantize_dynamic_int8  # noqa: E402
from kdpipe.exits.model import EarlyExitNet  # noqa: E402
from kdpipe.exits.policy import Policy, calibrate, evaluate_policy, tradeoff_curve  # noqa: E402
from kdpipe.exits.runtime import (  # noqa: E402
    ExitRuntime,
    all_logits,
    batch1_latency,
    export_segments,
    quantize_segments,
    save_package,
    segment_costs,
)
from kdpipe.report.tables import fmt, markdown_table  # noqa: E402


def build_segments(net: EarlyExitNet, example: torch.Tensor, folder: Path, quantize: dict[str, Any] | None,
                   train_loader) -> list[Path]:
    """The segment files: fp32, or quantized the way `quantize` (the quantize section) made the model."""
    files = export_segments(net, example, folder)
    mode = (quantize or {}).get("mode", "none")
    if mode in ("static", "qat"):  # QAT's int8 model: its segments calibrated the static way
        cal = quantize.get("calibration") or {}
        num = int(cal.get("num_batches", 8))
        if cal.get("source") == "synthetic":  # as the model itself was calibrated: no data read
            from kdpipe.datafree.deepinversion import synthesize

            batch = int(train_loader.batch_size)
            classes = int(net.exits[0][-1].out_features)
            fake, _ = synthesize(net, num * batch, tuple(example.shape[1:]), classes, batch,
                                 **dict(cal.get("synthetic") or {}))
            images = list(fake.split(batch))
        else:
            images = [b[0] for _, b in zip(range(num), train_loader, strict=False)]
        int8 = quantize_segments(net, files, images, folder, cal.get("method", "minmax"),
                                 bool(quantize.get("per_channel", True)))
    elif mode == "dynamic":
        int8 = [quantize_dynamic_int8(f, folder / f"segment_{i}.int8.onnx", bool(quantize.get("per_channel")),
                                      quantize.get("op_types")) for i, f in enumerate(files)]
    else:
        return files
    for f in files:
        f.unlink()
    return int8


def tradeoff_plot(curve: list[tuple[float, float, float]], policy: Policy, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([c[1] / 1e6 for c in curve], [100 * c[2] for c in curve], marker=".", color="0.4",
            label="one threshold for every exit")
    ax.scatter([policy.avg_cost / 1e6], [100 * policy.acc], color="C3", zorder=3,
               label=f"chosen (budget: {100 * (policy.full_acc - policy.acc):.2f} pt used)")
    ax.scatter([policy.full_cost / 1e6], [100 * policy.full_acc], color="C0", zorder=3, label="full depth")
    ax.set_xlabel("average MFLOPs per sample")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("early exits: accuracy against computation")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def measure_exits(net: EarlyExitNet, full_onnx: Path, datamodule, example: torch.Tensor, folder: Path,
                  exits_cfg: dict[str, Any], quantize: dict[str, Any] | None) -> dict[str, float]:
    """The `exits/*` metrics of one early-exit model; the package (`segment_*.onnx`, `policy.json`),
    the trade-off plot and table are written to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    net = net.eval()
    files = build_segments(net, example, folder, quantize, datamodule.train_dataloader())
    costs = segment_costs(net, example)
    rt = ExitRuntime(files, criterion=str(exits_cfg.get("criterion", "max_prob")))
    val_logits, yv = all_logits(rt, datamodule.val_dataloader())
    policy = calibrate(val_logits, yv, costs, float(exits_cfg.get("max_acc_drop", 0.5)), rt.criterion)
    save_package(folder, files, policy)
    curve = tradeoff_curve(val_logits, yv, costs, rt.criterion)
    tradeoff_plot(curve, policy, folder / "tradeoff.png")
    (folder / "tradeoff.md").write_text(markdown_table(
        ["threshold (every exit)", "avg MFLOPs", "val acc %"],
        [[fmt(t), f"{k / 1e6:.3f}", f"{100 * a:.2f}"] for t, k, a in curve]))

    rt.thresholds = policy.thresholds
    preds, where, ys, samples = [], [], [], []
    for x, y in datamodule.test_dataloader():
        logits, w = rt(x.numpy())
        preds.append(logits.argmax(-1))
        where.append(w)
        ys.append(y.numpy())
        samples.append(x.numpy())
    preds, where, ys = np.concatenate(preds), np.concatenate(where), np.concatenate(ys)
    test_logits, yt = all_logits(ExitRuntime(files), datamodule.test_dataloader())
    full_acc = float((test_logits[-1].argmax(-1) == yt).float().mean())
    _, test_cost, _ = evaluate_policy(test_logits, yt, costs, policy.thresholds, policy.criterion)
    n = int(exits_cfg.get("latency_samples", 300))
    full_ms, exit_ms = batch1_latency(full_onnx, rt, np.concatenate(samples)[:n])
    fractions = np.bincount(where, minlength=len(files)) / len(where)
    metrics = {
        "exits/test_acc": float((preds == ys).mean()),
        "exits/full_test_acc": full_acc,
        "exits/val_acc": policy.acc,
        "exits/full_val_acc": policy.full_acc,
        "exits/flops": test_cost,
        "exits/full_flops": costs[-1],
        "exits/latency_ms": exit_ms,
        "exits/full_latency_ms": full_ms,
        "exits/speedup": full_ms / exit_ms,
    }
    for i, share in enumerate(fractions):
        metrics[f"exits/share_{i if i < len(files) - 1 else 'final'}"] = float(share)
    for i, t in enumerate(policy.thresholds):
        metrics[f"exits/threshold_{i}"] = t if np.isfinite(t) else 2.0  # 2: never taken
    (folder / "measured.json").write_text(json.dumps(metrics, indent=2))
    return metrics
