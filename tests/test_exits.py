"""Early exits: heads trained by the distill stage, thresholds calibrated on validation data for a
budget, and the shipped runtime that stops at the first confident exit. Real training, real ONNX
Runtime sessions, a real MLflow store."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from kdpipe.compress.structured import StructuredPruner
from kdpipe.config import validate
from kdpipe.errors import ConfigError
from kdpipe.exits import ExitRuntime, calibrate, exit_terms, with_exits
from kdpipe.exits.policy import NEVER, confidence, evaluate_policy
from kdpipe.exits.runtime import export_segments
from kdpipe.losses.response import soft_kl
from kdpipe.models import cnn
from kdpipe.models.io import load_model, save_model

from .conftest import FAST, make_cfg, run_cli, run_job, stage_runs

EXITS = "student.exits=[features.0,features.1]"


def net(seed: int = 0):
    torch.manual_seed(seed)
    arch = {"_target_": "kdpipe.models.cnn", "in_shape": [1, 8, 8], "num_classes": 4, "width": 4, "depth": 3}
    return with_exits(arch, ["features.0", "features.1"], 4, [1, 8, 8])


def test_the_exit_net_keeps_the_backbone_paths_and_computes_the_same_final_logits():
    torch.manual_seed(0)
    backbone = cnn([1, 8, 8], 4, width=4, depth=3).eval()
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = with_exits(backbone, ["features.0", "features.1"], 4, [1, 8, 8]).eval()
    assert set(state) <= set(model.state_dict())  # the backbone's keys, unchanged, plus exits.*
    x = torch.randn(5, 1, 8, 8)
    ref = cnn([1, 8, 8], 4, width=4, depth=3).eval()
    ref.load_state_dict(state)
    outs = model.forward_all(x)
    assert len(outs) == 3 and all(o.shape == (5, 4) for o in outs)
    torch.testing.assert_close(model(x), ref(x))
    torch.testing.assert_close(outs[-1], ref(x))


def test_exit_terms_are_labels_final_head_and_teacher_with_their_weights():
    model = net()
    model.loss = {"ce": 0.5, "self": 2.0, "teacher": 3.0, "temperature": 2.0}
    model.train()
    x, y, teacher = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1]), torch.randn(6, 4)
    final = model(x)
    exits = [z.detach().clone() for z in model.pending[0]]
    terms = exit_terms(model, y, teacher)
    assert model.pending is None  # taken once
    ce = sum(torch.nn.functional.cross_entropy(z, y) for z in exits)
    self_kd = sum(soft_kl(z, final.detach(), 2.0) for z in exits)
    kd = sum(soft_kl(z, teacher, 2.0) for z in exits)
    torch.testing.assert_close(terms["exit_ce"].detach(), 0.5 * ce)
    torch.testing.assert_close(terms["exit_self"].detach(), 2.0 * self_kd)
    torch.testing.assert_close(terms["exit_teacher"].detach(), 3.0 * kd)
    model.eval()
    model(x)
    assert exit_terms(model, y, None) == {}  # nothing in eval mode: inference runs no heads


def test_an_input_that_exits_early_does_not_run_the_later_segments(tmp_path):
    model = net().eval()
    x = torch.randn(4, 1, 8, 8)
    files = export_segments(model, x, tmp_path)
    assert [f.name for f in files] == ["segment_0.onnx", "segment_1.onnx", "segment_2.onnx"]
    expected = [z.detach().numpy() for z in model.forward_all(x)]

    first = ExitRuntime(files, [0.0, 0.0])  # every confidence reaches 0: all leave at exit 0
    logits, where = first(x[:1].numpy())
    assert first.segments_run == 1 and where.tolist() == [0]
    np.testing.assert_allclose(logits, expected[0][:1], rtol=1e-4, atol=1e-5)

    second = ExitRuntime(files, [NEVER, 0.0])
    logits, where = second(x[:1].numpy())
    assert second.segments_run == 2 and where.tolist() == [1]
    np.testing.assert_allclose(logits, expected[1][:1], rtol=1e-4, atol=1e-5)

    none = ExitRuntime(files, [NEVER, NEVER])
    logits, where = none(x.numpy())
    assert none.segments_run == 3 and where.tolist() == [2] * 4
    np.testing.assert_allclose(logits, expected[2], rtol=1e-4, atol=1e-5)

    # a batch: each sample leaves at its own exit and gets that exit's logits
    conf0 = confidence(expected[0], "max_prob")
    t = float(np.median(conf0))
    mixed = ExitRuntime(files, [t, NEVER])
    logits, where = mixed(x.numpy())
    leaves = conf0 >= t
    assert where.tolist() == [0 if lv else 2 for lv in leaves]
    np.testing.assert_allclose(logits[leaves], expected[0][leaves], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits[~leaves], expected[2][~leaves], rtol=1e-4, atol=1e-5)


def synthetic_exits(seed: int, n: int = 2000):
    """Three heads on a 5-class task: each deeper head right more often, and each head's
    confidence higher when it is right, as trained exits are."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=g)
    logits = []
    for p_right in (0.6, 0.8, 0.92):
        right = torch.rand(n, generator=g) < p_right
        pred = torch.where(right, y, (y + torch.randint(1, 5, (n,), generator=g)) % 5)
        margin = torch.where(right, 1.5, 0.5) + torch.rand(n, generator=g) * 2
        z = torch.randn(n, 5, generator=g) * 0.3
        z[torch.arange(n), pred] += margin
        logits.append(z)
    return logits, y


@pytest.mark.parametrize("criterion", ["max_prob", "entropy"])
@pytest.mark.parametrize("budget", [0.0, 0.5, 2.0])
def test_the_threshold_search_respects_the_budget_on_the_data_it_calibrates_on(criterion, budget):
    costs = [1.0, 2.0, 4.0]
    for seed in range(3):
        logits, y = synthetic_exits(seed)
        policy = calibrate(logits, y, costs, budget, criterion)
        assert policy.acc >= policy.full_acc - budget / 100 - 1e-9
        acc, cost, fractions = evaluate_policy(logits, y, costs, policy.thresholds, criterion)
        assert (acc, cost) == pytest.approx((policy.acc, policy.avg_cost))
        assert sum(fractions) == pytest.approx(1.0)
        assert policy.avg_cost < costs[-1]  # confident, right early heads: some samples leave
        if budget > 0:  # a looser budget never costs more
            tighter = calibrate(logits, y, costs, budget / 4, criterion)
            assert policy.avg_cost <= tighter.avg_cost + 1e-9


def test_bad_exit_settings_are_refused_before_training():
    with pytest.raises(ConfigError, match="not a block of the student's chain"):
        validate(make_cfg(["student.exits=[features.9]"]))
    with pytest.raises(ConfigError, match="ends at the network's output"):
        validate(make_cfg(["student.exits=[classifier]"]))
    with pytest.raises(ConfigError, match="shallowest first"):
        validate(make_cfg(["student.exits=[features.1,features.0]"]))
    with pytest.raises(ConfigError, match="nn.Sequential"):
        validate(make_cfg(["student=resnet", "student.exits=[layer1]"]))
    with pytest.raises(ConfigError, match="exits.criterion"):
        validate(make_cfg([EXITS, "exits.criterion=margin"]))
    validate(make_cfg([EXITS]))


def test_a_bad_exit_path_ends_the_command_in_one_line_before_training(tmp_path):
    res = run_cli([*FAST, "student.exits=[features.9]"], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "kdpipe: error: student.exits: 'features.9' is not a block of the student's chain; valid paths: "
        "features.0.0, features.0.1, features.0.2, features.0.3, features.1.0, features.1.1, features.1.2, "
        "features.1.3, features.2.0, features.2.1, features.2.2, pool.0, pool.1, classifier"]
    assert not (tmp_path / "mlflow.db").exists()  # nothing trained, no run in the store


def test_structured_pruning_keeps_every_head_attached_to_its_block(tmp_path):
    model = net()
    example = torch.randn(2, 1, 8, 8)
    pruner = StructuredPruner(model, example)
    pruner.step(0.5)
    assert pruner.sparsity() > 0.3
    outs = model.eval().forward_all(example)
    assert [tuple(o.shape) for o in outs] == [(2, 4)] * 3  # heads follow their blocks; classes intact
    path = save_model(model, {"_target_": "kdpipe.exits.with_exits", "model": {
        "_target_": "kdpipe.models.cnn", "in_shape": [1, 8, 8], "num_classes": 4, "width": 4, "depth": 3},
        "exits": ["features.0", "features.1"], "num_classes": 4, "in_shape": [1, 8, 8]}, tmp_path / "m.pt",
        structured=True)
    again = load_model(path)
    for a, b in zip(again.forward_all(example), outs, strict=True):
        torch.testing.assert_close(a, b)


def test_a_pipeline_with_exits_and_static_int8_ships_a_runtime_that_stops_early(store, tmp_path):
    run_job([EXITS, "trainer.max_epochs=3", "prune=none", "quantize=static",
             "exits.max_acc_drop=2", "exits.latency_samples=50"], tmp_path / "job")
    runs = stage_runs()
    distill = next(r for r in runs if r.data.tags.get("kdpipe.stage") == "distill")
    quant = next(r for r in runs if r.data.tags.get("kdpipe.stage") == "quantize")
    parent = next(r for r in runs if r.data.tags.get("kdpipe.run_type") == "pipeline")
    # the heads trained with the student: their terms are curves of the distill run
    terms = {"train/loss_exit_ce", "train/loss_exit_self", "train/loss_exit_teacher"}
    assert terms <= set(distill.data.metrics)
    m = quant.data.metrics
    shares = [m["exits/share_0"], m["exits/share_1"], m["exits/share_final"]]
    assert sum(shares) == pytest.approx(1.0)
    assert m["exits/val_acc"] >= m["exits/full_val_acc"] - 0.02 - 1e-6  # the budget, on validation
    assert m["exits/flops"] <= m["exits/full_flops"]
    assert m["exits/latency_ms"] > 0 and m["exits/full_latency_ms"] > 0
    assert parent.data.metrics["exits/test_acc"] == m["exits/test_acc"]  # the shipped model's
    client = MlflowClient()
    logged = {a.path for a in client.list_artifacts(quant.info.run_id, "exits")}
    assert {"exits/tradeoff.png", "exits/policy.json"} <= logged
    # the shipped package runs on its own and reproduces what was measured
    folder = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="model_exits",
                                                 dst_path=str(tmp_path / "dl"))
    spec = json.loads((tmp_path / "dl" / "model_exits" / "policy.json").read_text())
    assert all(s.endswith(".int8.onnx") for s in spec["segments"])
    rt = ExitRuntime.load(folder)
    cfg = make_cfg([EXITS])
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup("fit")
    correct, total = 0, 0
    for x, y in dm.test_dataloader():
        logits, _ = rt(x.numpy())
        correct += int((logits.argmax(-1) == y.numpy()).sum())
        total += len(y)
    assert correct / total == pytest.approx(m["exits/test_acc"], abs=1e-9)


@pytest.mark.timeout(600)  # three pipelines
def test_a_new_budget_recalibrates_without_retraining_and_new_head_weights_retrain(store, tmp_path):
    base = [EXITS, "prune=none", "quantize=none", "exits.latency_samples=20"]
    jobs = ([], ["exits.max_acc_drop=5", "exits.criterion=entropy"], ["exits.loss.self=0.5"])
    for i, extra in enumerate(jobs):
        run_job([*base, *extra], tmp_path / f"job{i}")
    distills = sorted((r for r in stage_runs() if r.data.tags.get("kdpipe.stage") == "distill"),
                      key=lambda r: r.info.start_time)
    assert "kdpipe.reused_from" not in distills[0].data.tags
    assert distills[1].data.tags["kdpipe.reused_from"] == distills[0].info.run_id  # evaluate's keys only
    assert "kdpipe.reused_from" not in distills[2].data.tags  # the heads train differently
