"""How a pruned model is written: the model file, the plain program and the per-layer table.

A structurally pruned model is saved at its new widths (and as a `torch.export` program that
loads with torch alone); a masked one is saved dense, or as bitmask + non-zero values
(`storage=sparse`), so the file shrinks with the sparsity.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdpipe.compress.prune import layer_table
from kdpipe.compress.sparse_format import pack_state_dict
from kdpipe.compress.structured import export_plain_module
from kdpipe.models.io import save_model

STORAGES = ("sparse", "dense")


@dataclass
class PrunedFiles:
    model: Path              # the kdpipe model file (`load_model` reads it back)
    table: Path              # layer_sparsity.csv: shape, weights, zeros and sparsity of every layer
    plain: Path | None = None  # model.pt2, a torch.export program (structural pruning only)


def save_pruned(model: nn.Module, arch: dict, folder: Path, structural: bool, storage: str,
                example: torch.Tensor) -> PrunedFiles:
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "layer_sparsity.csv"
    rows = layer_table(model)
    with table.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if structural:
        path = save_model(model, arch, folder / "model.pt", structured=True)
        plain = folder / "model.pt2"
        export_plain_module(model, example, plain)
        return PrunedFiles(path, table, plain)
    if storage == "sparse":
        dense, packed = pack_state_dict(model.state_dict())
        return PrunedFiles(save_model(model, arch, folder / "model.pt", state_dict=dense, sparse=packed),
                           table)
    return PrunedFiles(save_model(model, arch, folder / "model.pt"), table)
