"""Compression to an accuracy budget: per-layer int8 sensitivity, the back-off that keeps the most
sensitive layers fp32, and shipped ONNX files that hold only the model. Real ONNX Runtime
quantization of a real trained model throughout."""

from __future__ import annotations

import copy

import mlflow
import onnx
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdpipe.compress import target
from kdpipe.compress.budget import (
    back_off,
    int8_sensitivity,
    layer_labels,
    log_backoff,
    prune_sensitivity,
    quantizable_nodes,
)
from kdpipe.compress.prune import MagnitudePruner
from kdpipe.compress.quantize import CompressionWarning, quantize_static_int8, read_calibration
from kdpipe.compress.slim import slim_onnx
from kdpipe.config import validate
from kdpipe.errors import ConfigError
from kdpipe.export import export_onnx
from kdpipe.metrics.measure import onnx_logits

from .conftest import make_cfg, run_job, stage_runs


def accuracy(path, loader) -> float:
    logits, target = onnx_logits(path, loader)
    return float((logits.argmax(-1) == target).float().mean())


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    """A 3-layer MLP trained to ~100 % on three Gaussian blobs, then made fragile to int8 in its
    last layer only: hidden units 0 and 1 of the middle layer are made identical, and the last
    layer reads them with weights +1e4 and -1e4, which cancel. In fp32 (and with int8 inputs, which
    stay identical) nothing changes; with per-channel int8 weights those two weights set every
    output channel's scale, and all the others round to zero. (The last layer, because ONNX
    Runtime's graph optimiser fuses an fp32 layer between two int8 ones back into int8 kernels.)"""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("fragile")
    centres = torch.randn(3, 8) * 3
    y = torch.arange(600) % 3
    x = centres[y] + torch.randn(600, 8)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        model[2].weight[1] = model[2].weight[0]
        model[2].bias[1] = model[2].bias[0]
        model[4].weight[:, 0], model[4].weight[:, 1] = 1e4, -1e4
    loader = DataLoader(TensorDataset(x, y), batch_size=100)
    fp32 = export_onnx(model.eval(), x[:2], folder / "fp32.onnx")
    batches, _ = read_calibration(loader, fp32, num_batches=4, min_samples=64)

    def quantize(out, exclude):
        return quantize_static_int8(fp32, out, None, 0, exclude=exclude, batches=batches)[0]

    return model, fp32, loader, quantize, folder


def test_sensitivity_names_the_fragile_layer_and_back_off_keeps_it_fp32_then_stops(fragile, store):
    model, fp32, loader, quantize, folder = fragile
    base = accuracy(fp32, loader)
    assert base > 0.95
    nodes = quantizable_nodes(fp32)
    labels = layer_labels(fp32, model)
    assert [labels[n] for n in nodes] == ["0", "2", "4"], "each Gemm is named by its PyTorch module"
    rows = int8_sensitivity(nodes, quantize, lambda p: accuracy(p, loader), base, labels, folder)
    drops = {r["layer"]: r["drop_points"] for r in rows}
    assert drops["4"] > 30 and drops["0"] < 3 and drops["2"] < 3, drops

    order = [r["node"] for r in sorted(rows, key=lambda r: -r["drop_points"])]
    built = []

    def evaluate(kept, step):
        built.append(kept)
        return accuracy(quantize(folder / f"candidate-{step}.onnx", kept), loader)

    with mlflow.start_run():
        result = back_off(order, evaluate, base, max_drop=3.0, labels=labels)
    assert result.met and result.chosen == 1
    assert built == [[], [order[0]]], "stops at the first candidate within budget"
    assert result.kept_fp32 == [order[0]] and labels[order[0]] == "4"
    assert result.decisions[0]["drop_points"] > 3.0 >= result.decisions[1]["drop_points"]
    shipped = onnx.load(str(folder / "candidate-1.onnx")).graph
    assert sum(n.op_type == "Gemm" for n in shipped.node) == 1, "the fragile layer alone stays fp32"


def test_a_budget_no_candidate_meets_ships_the_most_accurate_and_says_so(fragile, store):
    model, fp32, loader, quantize, folder = fragile
    nodes = quantizable_nodes(fp32)
    with mlflow.start_run() as run:
        # against a reference of 101 % no candidate can be within 0.5 points
        result = back_off(nodes, lambda kept, step: accuracy(quantize(folder / f"all-{step}.onnx", kept),
                                                             loader), 1.01, 0.5, layer_labels(fp32, model))
        log_backoff(result, "teacher", 1.01, 0.5)
    assert not result.met and len(result.decisions) == len(nodes) + 1
    best = max(d["val_acc"] for d in result.decisions)
    assert result.decisions[result.chosen]["val_acc"] == best
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags["kdpipe.budget_met"] == "false"
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/budget/decisions.md")
    assert "budget NOT met" in text and "below the teacher (101.00 %)" in text


def test_a_slim_onnx_file_computes_the_same_and_carries_no_metadata(fragile, tmp_path):
    _, fp32, loader, quantize, _ = fragile
    for path in (fp32, quantize(tmp_path / "int8.onnx", [])):
        slim = tmp_path / f"slim-{path.name}"
        slim.write_bytes(path.read_bytes())
        slim_onnx(slim)
        model = onnx.load(str(slim))
        assert not model.metadata_props and not model.graph.value_info
        assert not any(n.metadata_props or n.doc_string for n in model.graph.node)
        assert [i.name for i in model.graph.input] == ["input"] and model.graph.output[0].name == "logits"
        assert slim.stat().st_size < path.stat().st_size
        assert torch.equal(onnx_logits(slim, loader)[0], onnx_logits(path, loader)[0])


def test_the_quantize_stage_meets_a_budget_and_logs_sensitivity_and_decisions(store, tmp_path):
    """Also: pruning's fine-tuning recovers by distilling from the uncompressed model it started from."""
    run_job(["prune.finetune.epochs=1", "prune.finetune.distill_from=input",
             "compress.max_acc_drop=100", "compress.sensitivity=true"], tmp_path / "job")
    prune = next(r for r in stage_runs() if r.data.tags.get("kdpipe.stage") == "prune")
    assert prune.data.tags["kdpipe.finetune_from"] == "input"
    assert prune.data.tags["kdpipe.budget_met"] == "true", "the budget holds for the prune stage too"
    quant = next(r for r in stage_runs() if r.data.tags.get("kdpipe.stage") == "quantize")
    assert quant.data.tags["kdpipe.budget_met"] == "true" and quant.data.tags["kdpipe.budget_kept"] == "-"
    client = MlflowClient()
    assert {a.path for a in client.list_artifacts(quant.info.run_id, "sensitivity")} == {
        "sensitivity/quantize.json", "sensitivity/quantize.md", "sensitivity/quantize.png"}
    table = mlflow.artifacts.load_text(f"runs:/{quant.info.run_id}/sensitivity/quantize.md")
    assert "| features.0 | int8 |" in table and "| classifier | int8 |" in table
    prune_table = mlflow.artifacts.load_text(f"runs:/{prune.info.run_id}/sensitivity/prune.md")
    assert "| features.0.0 | sparsity 0.25 |" in prune_table
    assert "| classifier | sparsity 0.75 |" in prune_table
    shipped = next(r for r in stage_runs() if r.data.tags.get("kdpipe.stage") == "quantize")
    model = onnx.load(client.download_artifacts(shipped.info.run_id, "model", str(tmp_path / "dl"))
                      + "/model.int8.onnx")
    assert not any(n.metadata_props for n in model.graph.node), "the shipped file is slim"


def test_a_budget_against_the_teacher_needs_a_teacher():
    cfg = make_cfg(["teacher=none", "distill=none", "compress.max_acc_drop=1", "compress.reference=teacher"],
                   fast=False)
    with pytest.raises(ConfigError, match="compress.reference=teacher, but this pipeline has no teacher"):
        validate(cfg)


def test_structured_prune_sensitivity_prunes_one_layer_at_a_time_on_a_copy(fragile):
    model, _, loader, _, _ = fragile
    widths = [m.out_features for m in model if isinstance(m, nn.Linear)]
    cfg = OmegaConf.create({"_target_": "kdpipe.compress.StructuredPruner", "importance": None})

    def val_acc(m) -> float:
        with torch.no_grad():
            return float(torch.cat([(m(x).argmax(-1) == y).float() for x, y in loader]).mean())

    rows = prune_sensitivity(model, cfg, torch.zeros(2, 8), val_acc, [0.25, 0.95])
    # the classifier (the layer producing the logits) is never pruned, so the two hidden layers
    assert [(r["layer"], r["setting"]) for r in rows] == [
        ("0", "sparsity 0.25"), ("0", "sparsity 0.95"), ("2", "sparsity 0.25"), ("2", "sparsity 0.95")]
    for layer in ("0", "2"):
        light, heavy = (r["drop_points"] for r in rows if r["layer"] == layer)
        assert heavy >= light and heavy > 5, rows
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == widths, "the model is untouched"


def test_the_sparsity_search_finds_the_lowest_sparsity_that_meets_the_target(store):
    """Bisection on a candidate whose latency falls with the sparsity (measured values stand in
    for ORT timings here; the pipeline test below measures real files)."""
    def measure(s: float) -> target.Candidate:
        return target.Candidate(s, latency_ms=1.0 - s, size_bytes=int(1000 * (1 - s) ** 2), flops=100)

    with mlflow.start_run():
        chosen, tried = target.search_sparsity(measure, lambda c: c.latency_ms <= 0.6, max_sparsity=0.9,
                                               steps=6)
        assert 0.4 <= chosen.sparsity <= 0.4 + 0.9 / 2 ** 6 and len(tried) == 8
        low, tried = target.search_sparsity(measure, lambda c: c.size_bytes <= 1000)
        assert low.sparsity == 0 and len(tried) == 1, "an unpruned model that meets it stays unpruned"
        with pytest.raises(target.TargetNotReachable, match="even at sparsity 0.9"):
            target.search_sparsity(measure, lambda c: c.latency_ms <= 0.05)
    base = target.Candidate(0, 1.0, 1000, 100)
    with pytest.warns(CompressionWarning, match="cut FLOPs to 50% .* latency only to 95%"):
        target.warn_if_flops_fall_but_latency_does_not(base, target.Candidate(0.5, 0.95, 500, 50))


def test_a_size_target_prunes_channels_until_the_shipped_int8_file_fits(store, tmp_path):
    args = ["prune=structured", "prune.finetune.epochs=1", "student.model.width=16"]
    run_job([*args, "compress.target_size_bytes=9000", "compress.target_margin=0"], tmp_path / "job0")
    runs = stage_runs()
    prune = next(r for r in runs if r.data.tags.get("kdpipe.stage") == "prune")
    quant = next(r for r in runs if r.data.tags.get("kdpipe.stage") == "quantize")
    chosen = prune.data.metrics["target/chosen_sparsity"]
    assert 0 < chosen < 0.9 and prune.data.tags["kdpipe.target"].startswith(f"sparsity {chosen:.3f}")
    assert quant.data.metrics["model/size_bytes"] <= 9000, "the shipped int8 file meets the target"
    with pytest.raises(ConfigError, match="compress.target_size_bytes=10 cannot be met by pruning"):
        run_job([*args, "compress.target_size_bytes=10"], tmp_path / "job1")


def test_a_pruner_told_to_ignore_a_layer_leaves_it_whole(fragile):
    model = copy.deepcopy(fragile[0])
    pruner = MagnitudePruner(model, scope="global", ignore=["2"])
    pruner.step(0.5)
    pruner.finalize()
    assert float((model[2].weight == 0).float().mean()) == 0
    assert float((model[0].weight == 0).float().mean()) > 0.3
    with pytest.raises(ConfigError, match=r"prune.pruner.ignore names no layer \['9'\]"):
        MagnitudePruner(model, ignore=["9"])


def test_a_layer_plan_gives_each_layer_its_share_of_the_channels_removed():
    from kdpipe.compress.structured import StructuredPruner
    from kdpipe.models import cnn

    torch.manual_seed(0)
    model = cnn([1, 16, 16], 4, width=16, depth=3)
    scales = {"features.0.0": 0.5, "features.1.0": 2.0, "features.2.0": 1.0}
    StructuredPruner(model, torch.randn(2, 1, 16, 16), layer_scale=scales).step(0.3)
    widths = {p: model.get_submodule(p).out_channels for p in scales}
    assert widths == {"features.0.0": 13, "features.1.0": 12, "features.2.0": 44}  # 15 %, 60 %, 30 % removed


def test_the_allocation_favours_layers_that_save_time_cheaply_and_keeps_the_total():
    from kdpipe.compress.allocate import MAX_SCALE, MIN_SCALE, layer_plan

    rows = [  # measured alone at the probe sparsity: accuracy cost and latency saved
        {"layer": "cheap_and_slow", "drop_points": 0.0, "latency_ms": 0.6, "base_latency_ms": 1.0},
        {"layer": "fragile", "drop_points": 30.0, "latency_ms": 0.7, "base_latency_ms": 1.0},
        {"layer": "saves_nothing", "drop_points": 0.5, "latency_ms": 1.0, "base_latency_ms": 1.0},
    ]
    channels = {"cheap_and_slow": 32, "fragile": 32, "saves_nothing": 64}
    plan = layer_plan(rows, channels)
    assert plan["cheap_and_slow"] > 1 > plan["fragile"]
    assert MIN_SCALE <= plan["saves_nothing"] <= plan["fragile"] <= plan["cheap_and_slow"] <= MAX_SCALE
    weighted = sum(channels[k] * v for k, v in plan.items()) / sum(channels.values())
    assert weighted == pytest.approx(1.0, abs=0.02)  # prune.sparsity still the share of channels removed
    same = [{**r, "latency_ms": 1.0} for r in rows]
    assert layer_plan(same, channels) == {k: 1.0 for k in channels}  # nothing measurable: uniform


def test_the_prune_stage_plans_widths_by_sensitivity_and_logs_the_plan(store, tmp_path):
    run_job(["prune=structured", "prune.sparsity=0.4", "compress.allocation=sensitivity",
             "quantize=none"], tmp_path / "job")
    prune = next(r for r in stage_runs() if r.data.tags.get("kdpipe.stage") == "prune")
    client = MlflowClient()
    assert {a.path for a in client.list_artifacts(prune.info.run_id, "allocation")} == {
        "allocation/plan.md", "allocation/plan.json"}
    local = mlflow.artifacts.download_artifacts(run_id=prune.info.run_id, dst_path=str(tmp_path / "dl"),
                                                artifact_path="allocation/plan.json")
    import json

    plan = json.loads(open(local).read())
    assert {row["layer"] for row in plan} == {"features.0.0", "features.1.0", "features.2.0"}
    with pytest.raises(ConfigError, match="needs prune=structured"):
        validate(make_cfg(["prune=magnitude", "compress.allocation=sensitivity"]))

