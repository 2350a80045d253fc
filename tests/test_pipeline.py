"""The whole pipeline in-process on tiny real data, against a real MLflow store."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import onnx
import pytest
import torch
from mlflow.tracking import MlflowClient

from kdpipe.config import validate
from kdpipe.models.io import load_model
from kdpipe.pipeline import run_pipeline
from tests.conftest import make_cfg

MODEL_METRICS = ["test/acc", "model/params", "model/nonzero_params", "model/size_bytes", "model/flops",
                 "latency/p50_ms"]


def _runs():
    return mlflow.search_runs(experiment_names=["kdpipe"], output_format="list")


def _by_stage(runs, parent_id):
    return {r.data.tags["kdpipe.stage"]: r for r in runs
            if r.data.tags.get("mlflow.parentRunId") == parent_id}


def test_full_pipeline_logs_every_stage_with_tags_metrics_and_a_loadable_model(store, tmp_path):
    cfg = make_cfg([])
    validate(cfg)
    metrics = run_pipeline(cfg, tmp_path / "out")
    runs = _runs()
    parents = [r for r in runs if r.data.tags.get("kdpipe.run_type") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    stages = _by_stage(runs, parent.info.run_id)
    assert set(stages) == {"teacher", "distill", "prune", "quantize", "evaluate"}
    for name in ("teacher", "distill", "prune", "quantize"):
        run = stages[name]
        assert run.info.status == "FINISHED"
        assert run.data.tags["kdpipe.cache_key"]
        for m in MODEL_METRICS:
            assert m in run.data.metrics, (name, m)
    # per-epoch curves and the loss terms of the scheme on the distill run
    client = MlflowClient()
    for m in ("train/loss", "val/loss", "val/acc", "train/loss_kd", "train/loss_ce"):
        assert client.get_metric_history(stages["distill"].info.run_id, m), m
    # params are the flattened resolved config
    assert float(parent.data.params["distill.temperature"]) == 2.0  # conf/distill/kd.yaml
    assert parent.data.params["student.model._target_"] == "kdpipe.models.cnn"
    # pipeline-level summary
    for m in ("compression/ratio", "compression/acc_drop", "compression/speedup", *MODEL_METRICS):
        assert m in parent.data.metrics, m
    assert metrics["test/acc"] == parent.data.metrics["test/acc"]
    # the validation split's accuracy of the shipped model, what a search steers on, and of the int8
    # model on its run (a training stage's run keeps its per-epoch val/acc curve as it was)
    assert 0 < parent.data.metrics["val/acc"] <= 1 and "val/acc" in stages["quantize"].data.metrics
    assert min(m.step for m in client.get_metric_history(stages["distill"].info.run_id, "val/acc")) > 0
    t, q = stages["teacher"].data.metrics, stages["quantize"].data.metrics
    assert parent.data.metrics["compression/ratio"] == pytest.approx(t["model/size_bytes"]
                                                                     / q["model/size_bytes"])
    # prune hit its sparsity and the int8 model is smaller than its fp32 source on disk
    p = stages["prune"].data.metrics
    assert stages["prune"].data.metrics["prune/sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert p["model/nonzero_params"] < p["model/params"]
    # the shipped model (int8 ONNX) and its fp32 torch source load back through MLflow
    uri = f"runs:/{parent.info.run_id}/model"
    onnx_model = mlflow.onnx.load_model(uri)
    int8_inits = [i for i in onnx_model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert int8_inits, "the quantized model stores int8 weights"
    fp32 = mlflow.pytorch.load_model(f"runs:/{parent.info.run_id}/model_fp32")
    assert fp32(torch.zeros(1, 1, 8, 8)).shape == (1, 4)
    pred = mlflow.pyfunc.load_model(uri).predict(np.zeros((2, 1, 8, 8), dtype=np.float32))
    assert np.asarray(list(pred.values())[0] if isinstance(pred, dict) else pred).shape[-1] == 4
    # the resolved config is an artefact
    assert any(f.path == "config.yaml" for f in client.list_artifacts(parent.info.run_id))


def test_second_pipeline_with_another_temperature_reuses_the_teacher(store, tmp_path, monkeypatch):
    from kdpipe.stages import evaluate

    forwarded = []  # the models evaluate runs over a split (the real function runs)
    real = evaluate.torch_logits
    monkeypatch.setattr(evaluate, "torch_logits",
                        lambda model, loader: forwarded.append(model) or real(model, loader))
    first = make_cfg(["prune=none", "quantize=none", "distill.temperature=2"])
    run_pipeline(first, tmp_path / "a")
    assert len(forwarded) == 4  # teacher and student, test and val
    second = make_cfg(["prune=none", "quantize=none", "distill.temperature=8"])
    run_pipeline(second, tmp_path / "b")
    assert len(forwarded) == 6  # the new student only: the reused teacher's metrics are read back
    runs = _runs()
    teachers = [r for r in runs if r.data.tags.get("kdpipe.stage") == "teacher"]
    assert len(teachers) == 2
    trained = [r for r in teachers if "kdpipe.reused_from" not in r.data.tags]
    reused = [r for r in teachers if "kdpipe.reused_from" in r.data.tags]
    assert len(trained) == 1 and len(reused) == 1
    assert reused[0].data.tags["kdpipe.reused_from"] == trained[0].info.run_id
    assert reused[0].data.tags["kdpipe.cache_key"] == trained[0].data.tags["kdpipe.cache_key"]
    students = [r for r in runs if r.data.tags.get("kdpipe.stage") == "distill"]
    assert all("kdpipe.reused_from" not in r.data.tags for r in students)
    # the reused teacher is measured like a trained one; its accuracy is read from the run that trained it
    saved = json.loads(trained[0].data.tags["kdpipe.eval_accuracy"])
    for key in ("test/acc", "test/ece", "val/acc"):
        assert reused[0].data.metrics[key] == saved[key], key
    assert saved["test/acc"] == trained[0].data.metrics["test/acc"]
    assert "latency/p50_ms" in reused[0].data.metrics  # latency is measured again


def test_reuse_false_trains_again(store, tmp_path):
    run_pipeline(make_cfg(["prune=none", "quantize=none", "distill=none"]), tmp_path / "a")
    run_pipeline(make_cfg(["prune=none", "quantize=none", "distill=none", "reuse=false"]), tmp_path / "b")
    teachers = [r for r in _runs() if r.data.tags.get("kdpipe.stage") == "teacher"]
    assert len(teachers) == 2 and all("kdpipe.reused_from" not in r.data.tags for r in teachers)


def test_skipped_stages_hand_the_last_model_on(store, tmp_path):
    run_pipeline(make_cfg(["prune=none", "distill=none"]), tmp_path / "out")
    runs = _runs()
    stages = {r.data.tags.get("kdpipe.stage") for r in runs}
    assert stages == {"teacher", "distill", "quantize", "evaluate", None}
    quant = next(r for r in runs if r.data.tags.get("kdpipe.stage") == "quantize")
    distill = next(r for r in runs if r.data.tags.get("kdpipe.stage") == "distill")
    assert quant.data.metrics["model/params"] == distill.data.metrics["model/params"]


def test_teacher_loads_from_a_checkpoint_path_and_from_an_mlflow_uri(store, tmp_path):
    run_pipeline(make_cfg(["prune=none", "quantize=none", "distill=none"]), tmp_path / "a")
    trained = next(r for r in _runs() if r.data.tags.get("kdpipe.stage") == "teacher")
    uri = f"runs:/{trained.info.run_id}/model/model.pt"
    local = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl"))
    for ref in (local, uri):
        cfg = make_cfg(["prune=none", "quantize=none", "distill=none", f"teacher.checkpoint={ref}"])
        validate(cfg)
        run_pipeline(cfg, tmp_path / "b")
    loaded = [r for r in _runs() if r.data.tags.get("kdpipe.teacher_source")]
    assert [r.data.tags["kdpipe.teacher_source"] for r in loaded] == [local]
    assert loaded[0].data.metrics["test/acc"] == pytest.approx(trained.data.metrics["test/acc"])
    # the URI names the same file (same content): the loaded teacher is reused, not loaded again
    by_uri = mlflow.search_runs(experiment_names=["kdpipe"], output_format="list",
                                filter_string="tags.`kdpipe.stage` = 'teacher'",
                                order_by=["attributes.start_time DESC"])[0]
    assert by_uri.data.tags["kdpipe.reused_from"] == loaded[0].info.run_id
    assert isinstance(load_model(local), torch.nn.Module)


def test_summary_explains_an_int8_model_slower_or_larger_than_its_source():
    from kdpipe.report.summary import pitfall_notes

    fp32 = {"stage": "prune", "kind": "torch", "latency/p50_ms": 0.01, "model/size_bytes": 100.0,
            "model/flops": 8e4}
    int8 = {"stage": "quantize", "kind": "onnx", "latency/p50_ms": 0.03, "model/size_bytes": 200.0,
            "model/flops": 8e4}
    notes = pitfall_notes([fp32, int8])
    assert len(notes) == 2 and "slower" in notes[0] and "larger" in notes[1]
    fast = {**int8, "latency/p50_ms": 0.005, "model/size_bytes": 50.0}
    assert pitfall_notes([fp32, fast]) == []
