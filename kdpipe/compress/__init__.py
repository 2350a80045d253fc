"""Compression: pruning (importance + pruner + schedule, driven by `PruningCallback`) and int8
quantization (`quantize.py`).

Pruning is three separate objects, each a `_target_` in `conf/prune/`: an importance criterion
(`kdpipe.compress.importance`), a pruner (`MagnitudePruner`, `StructuredPruner`: `step(target)`)
and a schedule (`OneShotSchedule`, `IterativeSchedule`, `AGPSchedule`: `points`). `prune_model`
runs any pruner on any schedule in one fine-tuning fit.
"""

from kdpipe.compress.callback import PruningCallback, prune_model
from kdpipe.compress.prune import MagnitudePruner
from kdpipe.compress.schedules import AGPSchedule, IterativeSchedule, OneShotSchedule, PrunePoint
from kdpipe.compress.structured import StructuredPruner

__all__ = ["AGPSchedule", "IterativeSchedule", "MagnitudePruner", "OneShotSchedule", "PrunePoint",
           "PruningCallback", "StructuredPruner", "prune_model"]
