"""Compression to an accuracy budget: how much each layer's compression costs on its own
(sensitivity), and a back-off that keeps the most sensitive layers uncompressed, one at a time,
until the accuracy drop fits `compress.max_acc_drop` (AIMET's QuantAnalyzer and NNCF's accuracy
control do the same for int8). Accuracies are measured on the validation split, so the test split
still reports an unbiased number for what was shipped.
"""

from __future__ import annotations

import ast
import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import onnx
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from kdpipe.compress.prune import PRUNABLE
from kdpipe.compress.structured import accumulate_gradients
from kdpipe.errors import build
from kdpipe.report.tables import markdown_table

log = logging.getLogger("kdpipe")

# The op types whose weights int8 quantization stores (the rest quantize activations only).
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


def quantizable_nodes(fp32_onnx: str | Path, op_types: Sequence[str] | None = None) -> list[str]:
    """The names of the ONNX nodes that hold a layer's weights, in graph order."""
    types = set(WEIGHTED_OPS) & set(op_types or WEIGHTED_OPS)
    return [n.name for n in onnx.load(str(fp32_onnx)).graph.node if n.op_type in types]


def layer_labels(fp32_onnx: str | Path, model: nn.Module) -> dict[str, str]:
    """ONNX node name -> the PyTorch module it came from (`features.0`), read from the scopes the
    exporter records. A convolution whose batch norm was folded into it names its block."""
    modules = dict(model.named_modules())
    labels = {}
    for node in onnx.load(str(fp32_onnx)).graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "[]")
        try:
            paths = [s for s in ast.literal_eval(scopes) if s and s in modules]
        except (ValueError, SyntaxError):
            paths = []
        weighted = [p for p in paths if isinstance(modules[p], (nn.Conv1d, nn.Conv2d, nn.Linear))]
        if weighted:
            labels[node.name] = weighted[-1]
        elif paths:
            last = paths[-1]
            folded = isinstance(modules[last], nn.modules.batchnorm._BatchNorm)
            labels[node.name] = last.rsplit(".", 1)[0] if folded else last
        else:
            labels[node.name] = node.name
    return labels


def int8_sensitivity(nodes: Sequence[str], quantize: Callable[[Path, list[str]], Path],
                     val_acc: Callable[[Path], float], base: float, labels: dict[str, str],
                     folder: Path) -> list[dict]:
    """One row per node: the validation accuracy when only that node is int8 (`quantize(path,
    exclude)` builds a candidate; every other node stays fp32) and its drop in points from `base`."""
    rows = []
    for i, node in enumerate(nodes):
        acc = val_acc(quantize(folder / f"only-{i}.onnx", [n for n in nodes if n != node]))
        rows.append({"layer": labels.get(node, node), "node": node, "setting": "int8", "val_acc": acc,
                     "drop_points": 100.0 * (base - acc)})
        log.info("sensitivity: only %s int8: val acc %.2f %% (%+.2f points)", rows[-1]["layer"], 100 * acc,
                 -rows[-1]["drop_points"])
    return rows


def prune_sensitivity(model: nn.Module, pruner_cfg, example: torch.Tensor,
                      val_acc: Callable[[nn.Module], float], sparsities: Sequence[float],
                      train_batches: Iterable | None = None,
                      measure: Callable[[nn.Module], dict[str, float]] | None = None) -> list[dict]:
    """One row per (layer, sparsity): the validation accuracy when only that layer is pruned, with no
    fine-tuning. A structural pruner (channels) is built on a copy with every other layer ignored, so
    it removes that layer's output channels (and the inputs that read them); a magnitude pruner
    masks that layer's smallest |w|. `measure(model)` adds its values to each row, and its values for
    the unpruned model as `base_<key>`."""
    base = val_acc(model)
    base_extra = {f"base_{k}": v for k, v in measure(model).items()} if measure else {}
    rows = []
    probe = build(pruner_cfg, "prune.pruner", model=copy.deepcopy(model), example_inputs=example)
    structural = getattr(probe, "structural", False)
    always = list(getattr(probe, "ignored", ()))  # what the configured pruner never prunes
    layers = [p for p, m in model.named_modules()
              if isinstance(m, PRUNABLE) and not any(p == a or p.startswith(a + ".") for a in always)]
    for layer in layers:
        for s in sparsities:
            trial = copy.deepcopy(model)
            if structural:  # the pruner itself, told to leave every other layer alone
                others = [p for p in layers if p != layer]
                pruner = build(pruner_cfg, "prune.pruner", model=trial, example_inputs=example,
                               ignore=[*always, *others])
                needs = getattr(pruner, "gradient_batches", 0)  # a gradient criterion (taylor) reads .grad
                if needs and train_batches is not None:
                    accumulate_gradients(trial, train_batches, needs)
                pruner.step(float(s))
            else:
                torch_prune.l1_unstructured(trial.get_submodule(layer), "weight", amount=float(s))
            acc = val_acc(trial.eval())
            rows.append({"layer": layer, "setting": f"sparsity {s:g}", "val_acc": acc,
                         "drop_points": 100.0 * (base - acc),
                         **({**measure(trial), **base_extra} if measure else {})})
            log.info("sensitivity: only %s pruned to %g: val acc %.2f %% (%+.2f points)", layer, s, 100 * acc,
                     -rows[-1]["drop_points"])
    return rows


@dataclass
class BackOff:
    """What a back-off tried: one row per candidate, and what it kept."""

    kept_fp32: list[str] = field(default_factory=list)
    decisions: list[dict] = field(default_factory=list)
    met: bool = False
    chosen: int = -1  # index into decisions of the shipped candidate


def back_off(order: Sequence[str], evaluate: Callable[[list[str], int], float], reference: float,
             max_drop: float, labels: dict[str, str] | None = None) -> BackOff:
    """Compress everything, then keep the layers of `order` (most sensitive first) uncompressed one
    at a time until the accuracy drop against `reference` (both fractions; `max_drop` in points) is
    within budget. `evaluate(kept, step)` builds candidate `step` with the layers `kept` left alone and
    returns its validation accuracy. Stops at the first candidate that meets the budget; when none
    does, the most accurate candidate is chosen."""
    labels = labels or {}
    result = BackOff()
    kept: list[str] = []
    for step in range(len(order) + 1):
        acc = evaluate(list(kept), step)
        drop = 100.0 * (reference - acc)
        met = drop <= max_drop
        result.decisions.append({"step": step, "kept": [labels.get(k, k) for k in kept], "val_acc": acc,
                                 "drop_points": drop, "met": met})
        reason = "" if step == 0 else f" (kept {labels.get(kept[-1], kept[-1])}: the most sensitive left)"
        log.info("budget: candidate %d%s: val acc %.2f %%, drop %.2f points, budget %.2f: %s", step, reason,
                 100 * acc, drop, max_drop, "met" if met else "missed")
        mlflow.log_metrics({"budget/val_acc": acc, "budget/drop_points": drop}, step=step)
        if met:
            result.kept_fp32, result.met, result.chosen = list(kept), True, step
            return result
        if step < len(order):
            kept.append(order[step])
    result.chosen = max(range(len(result.decisions)), key=lambda i: result.decisions[i]["val_acc"])
    result.kept_fp32 = list(order[:result.chosen])
    return result


def log_backoff(result: BackOff, reference_name: str, reference: float, max_drop: float,
                what: str = "int8") -> None:
    """The decisions as a table artifact (`budget/decisions.md`), tags saying what shipped, and a
    warning that names the closest candidate when no candidate met the budget."""
    rows = [[str(d["step"]), ", ".join(d["kept"]) or "-", f"{100 * d['val_acc']:.2f}",
             f"{d['drop_points']:.2f}", "yes" if d["met"] else "no"] for d in result.decisions]
    chosen = result.decisions[result.chosen]
    header = ["candidate", f"layers kept out of {what}", "val acc %", "drop (points)", "met"]
    shipped = f"{', '.join(chosen['kept'])} kept out of {what}" if chosen["kept"] else f"every layer {what}"
    text = (f"Budget: at most {max_drop:g} points of validation accuracy below the {reference_name} "
            f"({100 * reference:.2f} %).\n\n" + markdown_table(header, rows)
            + f"\nShipped candidate {result.chosen}: {shipped}; "
            f"budget {'met' if result.met else 'NOT met'}.\n")
    mlflow.log_text(text, "budget/decisions.md")
    mlflow.set_tags({"kdpipe.budget_met": str(result.met).lower(),
                     "kdpipe.budget_kept": ", ".join(chosen["kept"]) or "-"})
    mlflow.log_metrics({"budget/kept_layers": float(len(chosen["kept"])),
                        "budget/shipped_drop_points": chosen["drop_points"]})
    if not result.met:
        log.warning("budget: no %s candidate is within %g points of the %s (%.2f %%); shipped candidate %d "
                    "(drop %.2f points). Raise compress.max_acc_drop, or recover accuracy with QAT "
                    "(quantize=qat).", what, max_drop, reference_name, 100 * reference, result.chosen,
                    chosen["drop_points"])


def log_sensitivity(rows: list[dict], name: str) -> None:
    """A per-layer sensitivity table (rows of layer, setting, val_acc, drop_points) as an MLflow
    table, a markdown artifact and a bar plot under `sensitivity/`."""
    if not rows:
        return
    mlflow.log_table({k: [r[k] for r in rows] for k in ("layer", "setting", "val_acc", "drop_points")},
                     f"sensitivity/{name}.json")
    mlflow.log_text(markdown_table(["layer", "setting", "val acc %", "drop (points)"],
                                   [[r["layer"], r["setting"], f"{100 * r['val_acc']:.2f}",
                                     f"{r['drop_points']:.2f}"] for r in rows]), f"sensitivity/{name}.md")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(layers) * len(settings) ** 0.5 + 2), 3.5))
    width = 0.8 / len(settings)
    for i, setting in enumerate(settings):
        drops = {r["layer"]: r["drop_points"] for r in rows if r["setting"] == setting}
        ax.bar([j + i * width for j in range(len(layers))], [drops.get(layer, 0.0) for layer in layers],
               width, label=setting)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, rotation=30, ha="right")
    ax.set(ylabel="val accuracy drop (points)", title=f"{name}: one layer compressed at a time")
    ax.legend()
    fig.tight_layout()
    mlflow.log_figure(fig, f"sensitivity/{name}.png")
    plt.close(fig)
