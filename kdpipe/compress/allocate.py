"""How structured pruning spreads its sparsity over the layers (`compress.allocation`).

`uniform` removes the same share of every layer's channels. `sensitivity` measures each layer alone
pruned to `compress.allocation_probe` of its channels (no fine-tuning): the validation accuracy it
costs and the latency it saves on the runtime that ships. A layer's share of the sparsity is then in
proportion to latency saved per point of accuracy lost (with a floor of `ACC_FLOOR` points, so a
free layer does not take everything), kept within [`MIN_SCALE`, `MAX_SCALE`] and normalised so that
the channels removed in all are the sparsity asked for (a mean of 1 weighted by the layers'
channels): the plan is a `layer_scale` for `StructuredPruner`, and a target search
or `prune.sparsity` scales the whole plan (AMC and NetAdapt choose per-layer widths the same way,
by measured latency against accuracy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ACC_FLOOR = 0.25  # points
MIN_SCALE, MAX_SCALE = 0.25, 2.5


def layer_plan(rows: Sequence[dict], channels: Mapping[str, int]) -> dict[str, float]:
    """{layer: scale} from `prune_sensitivity` rows that carry `latency_ms` and `base_latency_ms`;
    `channels`: each layer's output channels."""
    benefit = {}
    for r in rows:
        saved = max(r["base_latency_ms"] - r["latency_ms"], 0.0)
        benefit[r["layer"]] = saved / (max(r["drop_points"], 0.0) + ACC_FLOOR)
    if not benefit or max(benefit.values()) <= 0:  # no layer saves measurable time: every layer alike
        return {layer: 1.0 for layer in benefit}
    total = sum(channels[layer] for layer in benefit)

    def plan_at(c: float) -> dict[str, float]:
        return {layer: min(max(c * b, MIN_SCALE), MAX_SCALE) for layer, b in benefit.items()}

    def mean(c: float) -> float:
        return sum(channels[layer] * s for layer, s in plan_at(c).items()) / total

    lo, hi = 0.0, 1.0
    while mean(hi) < 1.0 and hi < 1e12:  # the weighted mean grows with c: bracket 1, then bisect
        hi *= 2
    for _ in range(60):
        lo, hi = (lo, (lo + hi) / 2) if mean((lo + hi) / 2) >= 1.0 else ((lo + hi) / 2, hi)
    return plan_at(hi)
