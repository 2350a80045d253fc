"""The teacher's outputs on the training set, computed once and stored with the teacher's run.

Why: in offline distillation without augmentation the teacher sees the same images every
epoch, so its forward pass is the same work repeated; with its outputs precomputed, a
distillation epoch costs about what a scratch epoch costs. The files are artefacts of the
teacher stage's run (`teacher_outputs/train_logits.pt`, and `train_features_<layers>.pt` for the
teacher layers a loss reads, when they fit `distill.scheme.cache_features_gb`), so they are keyed
like that run (its cache key covers the teacher config, the data config and the seed, i.e. the
training set) and every later student of that teacher reuses them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdpipe.errors import ConfigError
from kdpipe.losses.token import TopK, topk_logits
from kdpipe.modules.distill import FeatureHooks
from kdpipe.tracking.store import stage_lock

log = logging.getLogger("kdpipe")

CACHE_TAG = "kdpipe.teacher_cache"  # on the distill run: computed | reused | off
ARTIFACT_DIR = "teacher_outputs"


def cache_blockers(augment: bool, chain: bool, features: str | None = None) -> list[str]:
    """Why the teacher's outputs cannot be precomputed (empty when they can); `features` says why
    the teacher features the loss reads cannot be (`feature_blocker`)."""
    reasons = []
    if augment:
        reasons.append("data.augment is set, so the teacher must see each new augmented view")
    if features:
        reasons.append(features)
    if chain:
        reasons.append("distill.scheme.chain is set, so each assistant is the next link's teacher")
    return reasons


def use_cache(mode, blockers: list[str]) -> bool:
    """`distill.scheme.cache_teacher`: auto (when nothing blocks it), true (error if
    something does), false."""
    mode = str(mode).lower()
    if mode not in ("auto", "true", "false"):
        raise ConfigError(f"distill.scheme.cache_teacher={mode} must be auto, true or false")
    if mode == "true" and blockers:
        raise ConfigError(f"distill.scheme.cache_teacher=true is impossible here: {'; '.join(blockers)}. "
                          f"Use distill.scheme.cache_teacher=auto or false")
    return mode != "false" and not blockers


def feature_blocker(teacher: nn.Module, layers: tuple[str, ...], example: torch.Tensor, n: int | None,
                    limit_gb: float) -> str | None:
    """Why the outputs of the teacher's `layers` over `n` training samples cannot be cached: an
    output that is not one tensor, or more than `limit_gb` GiB of float32 in all (the early
    feature maps attention transfer reads); None when they can (CRD's pooled features). `n` None:
    the size is not known yet (the config check, before the data is loaded)."""
    if not layers:
        return None
    outputs: dict[str, object] = {}
    with FeatureHooks(teacher, layers, "teacher") as hooks, torch.no_grad():
        teacher.eval()(example)
        outputs = hooks.pop()
    odd = [p for p, o in outputs.items() if not isinstance(o, torch.Tensor)]
    if odd:
        return f"the teacher layers the loss reads ({', '.join(odd)}) do not output one tensor"
    gb = (n or 0) * sum(o[0].numel() for o in outputs.values()) * 4 / 2**30
    if gb > limit_gb:
        return (f"the teacher features the loss reads ({', '.join(layers)}) would take {gb:.3g} GiB over "
                f"the {n:,} training samples, above distill.scheme.cache_features_gb={limit_gb:g}")
    return None


@torch.no_grad()
def compute_logits(teacher: nn.Module, train_set: TensorDataset, batch_size: int = 512,
                   topk: int | None = None, layers: tuple[str, ...] = ()):
    """The teacher's outputs on every training sample, in order. A language model's `(N, L, V)`
    logits are kept in top-k form (`{"values", "indices"}`, kdpipe.losses.token.TopK) when `topk`
    is set: a vocabulary's worth of floats per token would not fit on disk. With `layers`, the
    outputs of those teacher modules instead, `{path: (N, ...)}`."""
    teacher.eval()
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=False)
    outs, feats = [], {p: [] for p in layers}
    with FeatureHooks(teacher, layers, "teacher") as hooks:
        for batch in loader:  # each batch cut to top-k at once: a batch of dense LM logits is what is held
            out = teacher(batch[0])
            for p, f in hooks.pop().items():
                feats[p].append(f)
            outs.append(topk_logits(out, int(topk)) if topk and out.dim() == 3 else out)
    if layers:
        return {p: torch.cat(f) for p, f in feats.items()}
    if outs and isinstance(outs[0], TopK):
        return {"values": torch.cat([o.values for o in outs]),
                "indices": torch.cat([o.indices for o in outs])}
    return torch.cat(outs)


def stored_with_run(source: str, lock_key: str, folder: str, name: str, local_dir: Path,
                    compute: Callable[[], Any],
                    valid: Callable[[Any], bool] = lambda _: True) -> tuple[Any, bool]:
    """(value, reused): `folder/name` from the artefacts of run `source` when an earlier job stored
    it there and it loads and is `valid`, else `compute()`d, saved and stored there. Under a lock, so
    two jobs at once compute it once."""
    client = MlflowClient()
    with stage_lock(lock_key):
        if name in {Path(f.path).name for f in client.list_artifacts(source, folder)}:
            local = mlflow.artifacts.download_artifacts(run_id=source, artifact_path=f"{folder}/{name}",
                                                        dst_path=str(local_dir))
            try:
                value = torch.load(local, map_location="cpu", weights_only=True)
            except Exception:  # a truncated or corrupt file: recompute below
                value = None
            if value is not None and valid(value):
                return value, True
            log.warning("%s/%s of run %s is unreadable or does not match; recomputing", folder, name, source)
        value = compute()
        local_dir.mkdir(parents=True, exist_ok=True)
        path = local_dir / name
        torch.save(value, path)
        client.log_artifact(source, str(path), folder)
        return value, False


def teacher_train_logits(datamodule, workdir: Path, source: str, teacher_key: str, teacher: nn.Module,
                         suffix: str = "", topk: int | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """The teacher's logits for every training sample, in dataset order: fetched from the artefacts
    of the teacher's run `source` when an earlier student stored them, else computed and stored there.
    A language model's are stored as its top `topk` logits per token (`train_logits_top<k>.pt`)."""
    sequences = getattr(datamodule, "kind", "") == "lm"
    topk = int(topk) if sequences and topk else None
    name = f"train_logits{suffix}{f'_top{topk}' if topk else ''}.pt"
    n = len(datamodule.train_set)

    def compute():
        return compute_logits(teacher, datamodule.train_set, topk=topk)

    def valid(v) -> bool:
        if isinstance(v, dict):
            return set(v) == {"values", "indices"} and len(v["values"]) == n
        return isinstance(v, torch.Tensor) and len(v) == n

    logits, reused = stored_with_run(source, f"{teacher_key}/{name}", ARTIFACT_DIR, name,
                                     workdir / ARTIFACT_DIR, compute, valid)
    mlflow.set_tag(CACHE_TAG, "reused" if reused else "computed")
    if reused:
        log.info("distill: teacher logits reused from run %s", source)
    return logits


def teacher_train_features(datamodule, workdir: Path, source: str, teacher_key: str, teacher: nn.Module,
                           layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The outputs of the teacher's `layers` for every training sample, in dataset order, stored
    with the teacher's run `source` like its logits (`train_features_<layers>.pt`)."""
    name = f"train_features_{'+'.join(layers)}.pt"
    n = len(datamodule.train_set)

    def valid(v) -> bool:
        return isinstance(v, dict) and set(v) == set(layers) and all(len(t) == n for t in v.values())

    def compute():
        return compute_logits(teacher, datamodule.train_set, layers=layers)

    feats, reused = stored_with_run(source, f"{teacher_key}/{name}", ARTIFACT_DIR, name,
                                    workdir / ARTIFACT_DIR, compute, valid)
    if reused:
        log.info("distill: teacher features %s reused from run %s", ", ".join(layers), source)
    else:
        mlflow.set_tag(CACHE_TAG, "computed")
    return feats


def cached_train_loader(datamodule, logits: torch.Tensor | dict[str, torch.Tensor],
                        features: dict[str, torch.Tensor] | None = None) -> DataLoader:
    """The training loader with the teacher's logits as a third column (top-k values and indices as
    third and fourth), then the cached teacher features, one column per layer in `features`' order:
    shuffled together with the inputs (same seeded order as the plain loader), so they always stay
    aligned."""
    x, y = datamodule.train_set.tensors
    columns = (logits["values"], logits["indices"]) if isinstance(logits, dict) else (logits,)
    return datamodule._loader(TensorDataset(x, y, *columns, *(features or {}).values()), shuffle=True)
