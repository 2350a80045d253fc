"""Pruning schedules and quantization modes: each on real models, real ONNX Runtime int8
kernels and, for the pipeline-level checks, a real MLflow store shared by this module (so the
teacher and the student are trained once and reused by every pipeline here)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import mlflow
import numpy as np
import onnx
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader, TensorDataset

from kdpipe.compress.prune import magnitude_prune, make_permanent
from kdpipe.compress.quantize import CompressionWarning, quantize_static_int8
from kdpipe.compress.schedules import agp_sparsity, step_targets
from kdpipe.compress.sparse_format import pack_state_dict
from kdpipe.compress.structured import StructuredPruner, export_plain_module
from kdpipe.config import validate
from kdpipe.errors import ConfigError
from kdpipe.export import export_onnx
from kdpipe.metrics.measure import flops_per_sample, onnx_logits
from kdpipe.models import cnn, count_params, resnet
from kdpipe.models.io import load_model, save_model
from kdpipe.pipeline import run_pipeline
from tests.conftest import make_cfg, use_store

CNN_ARCH = {"_target_": "kdpipe.models.cnn", "in_shape": [1, 8, 8], "num_classes": 4, "width": 8, "depth": 2}


# --- magnitude pruning -------------------------------------------------------------------------

@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_hits_its_sparsity_exactly_and_steps_only_add_zeros(scope):
    torch.manual_seed(0)
    model = cnn((1, 8, 8), 4, width=8, depth=2)
    magnitude_prune(model, 0.3, scope=scope)
    first = {n: b.clone() for n, b in model.named_buffers() if n.endswith("weight_mask")}
    magnitude_prune(model, 0.7, scope=scope)
    for name, mask in first.items():  # a later step never revives a pruned weight
        assert bool(((mask == 0) <= (dict(model.named_buffers())[name] == 0)).all())
    make_permanent(model)
    prunable = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    total = sum(w.numel() for w in prunable)
    zeros = sum(int((w == 0).sum()) for w in prunable)
    if scope == "global":
        assert zeros == round(0.7 * total)
    else:
        assert all(int((w == 0).sum()) == round(0.7 * w.numel()) for w in prunable)
    assert not any("mask" in n for n, _ in model.named_buffers()), "masks are made permanent"


def test_sparse_storage_shrinks_the_file_and_loads_back_the_same_weights(tmp_path):
    torch.manual_seed(0)
    model = cnn((1, 8, 8), 4, width=32, depth=2)
    magnitude_prune(model, 0.8)
    make_permanent(model)
    dense_file = save_model(model, CNN_ARCH | {"width": 32}, tmp_path / "dense.pt")
    d, packed = pack_state_dict(model.state_dict())
    sparse_file = save_model(model, CNN_ARCH | {"width": 32}, tmp_path / "sparse.pt", state_dict=d, sparse=packed)
    assert sparse_file.stat().st_size < 0.45 * dense_file.stat().st_size
    back = load_model(sparse_file)
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


# --- structured pruning ------------------------------------------------------------------------

def test_structured_pruning_of_a_resnet_lowers_params_and_flops_and_saves_a_plain_module(tmp_path):
    torch.manual_seed(0)
    arch = {"_target_": "kdpipe.models.resnet", "in_shape": [1, 8, 8], "num_classes": 4, "width": 8,
            "blocks": [1, 1, 1]}
    model = resnet((1, 8, 8), 4, width=8).eval()
    x = torch.randn(3, 1, 8, 8)
    params0, flops0 = count_params(model)[0], flops_per_sample(model, x)
    StructuredPruner(model, x, [0.5]).step()
    params1, flops1 = count_params(model)[0], flops_per_sample(model, x)
    assert params1 < 0.4 * params0 and flops1 < 0.4 * flops0
    assert model.fc.out_features == 4, "the classifier is ignored by default"
    assert model.layer1[0].conv1.out_channels == 4  # channels really removed, residuals consistent
    expected = model(x)

    reloaded = load_model(save_model(model, arch, tmp_path / "model.pt", structured=True))
    torch.testing.assert_close(reloaded(x), expected)

    export_plain_module(model, x, tmp_path / "model.pt2")
    np.save(tmp_path / "x.npy", x.numpy())
    code = ("import sys, numpy as np, torch; m = torch.export.load('model.pt2').module(); "
            "y = m(torch.from_numpy(np.load('x.npy'))); np.save('y.npy', y.detach().numpy()); "
            "assert not any(k.startswith('kdpipe') for k in sys.modules), 'kdpipe was imported'")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_schedules_declare_their_targets():
    assert step_targets("one_shot", 0.5) == [0.5]
    iterative = step_targets("iterative", 1 - 0.8**5, 5)  # 5 steps of 20 % of what is left
    assert iterative == pytest.approx([1 - 0.8**k for k in range(1, 6)])
    # Zhu & Gupta (2017) eq. 1: fast early, slow late, exact at both ends
    assert agp_sparsity(0, 0.0, 0.8, 0, 100) == 0.0
    assert agp_sparsity(100, 0.0, 0.8, 0, 100) == 0.8
    assert agp_sparsity(50, 0.0, 0.8, 0, 100) == pytest.approx(0.8 * (1 - 0.5**3))


# --- static quantization -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_cnn(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("quant")
    model = cnn((1, 8, 8), 4, width=8, depth=2).eval()
    data = TensorDataset(torch.randn(256, 1, 8, 8), torch.randint(0, 4, (256,)))
    return model, export_onnx(model, torch.zeros(2, 1, 8, 8), folder / "fp32.onnx"), DataLoader(data, batch_size=32), folder


def test_static_quantization_calibrates_and_runs_int8_kernels(fp32_cnn):
    model, fp32, loader, folder = fp32_cnn
    out, samples = quantize_static_int8(fp32, folder / "int8.onnx", loader, num_batches=4, min_samples=64)
    assert samples == 128
    graph = onnx.load(str(out)).graph
    ops = {n.op_type for n in graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops
    conv_weights = [i for i in graph.initializer if i.name.startswith("features.0.0.weight_quantized")]
    assert conv_weights and conv_weights[0].data_type == onnx.TensorProto.INT8
    scales = [i for i in graph.initializer if i.name == "features.0.0.weight_scale"]
    assert scales and onnx.numpy_helper.to_array(scales[0]).size == 8, "per-channel weight scales"
    int8_logits, _ = onnx_logits(out, loader)
    fp32_logits, _ = onnx_logits(fp32, loader)
    agree = (int8_logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean()
    assert agree > 0.9


def test_static_quantization_refuses_without_calibration_data_and_warns_on_too_little(fp32_cnn):
    _, fp32, loader, folder = fp32_cnn
    with pytest.raises(ValueError, match="no calibration samples"):
        quantize_static_int8(fp32, folder / "none.onnx", loader, num_batches=0)
    assert not (folder / "none.onnx").exists()
    with pytest.warns(CompressionWarning, match="only 32 samples"):
        quantize_static_int8(fp32, folder / "few.onnx", loader, num_batches=1, min_samples=256)


# --- config guards -----------------------------------------------------------------------------

def test_one_shot_cut_above_half_warns_and_suggests_iterative():
    with pytest.warns(CompressionWarning, match="iterative"):
        validate(make_cfg(["prune.sparsity=0.7"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressionWarning)
        validate(make_cfg(["prune=iterative", "prune.sparsity=0.7"]))
        validate(make_cfg(["prune.sparsity=0.5"]))


@pytest.mark.parametrize("overrides, message", [
    (["quantize=static", "quantize.calibration.num_batches=0"], "needs calibration data"),
    (["quantize=static", "quantize.calibration.method=median"], "minmax, entropy, percentile"),
    (["prune=structured", "prune.schedule.name=agp"], "use prune.schedule.name=iterative"),
    (["prune=structured", "prune.importance=random"], "prune.importance=random is not known"),
    (["prune.schedule.name=cyclic"], "one_shot, iterative, agp"),
])
def test_nonsense_compression_settings_are_refused_before_any_training(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(overrides))


# --- whole pipelines against one MLflow store ----------------------------------------------------

@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("compression_store")
    mp = pytest.MonkeyPatch()
    use_store(mp, root)
    yield root
    while mlflow.active_run():
        mlflow.end_run()
    mp.undo()


def _pipeline(root, name, overrides):
    cfg = make_cfg(overrides)
    validate(cfg)
    run_pipeline(cfg, root / name)
    parent = mlflow.last_active_run()
    runs = mlflow.search_runs(experiment_names=["kdpipe"], output_format="list",
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, {r.data.tags["kdpipe.stage"]: r for r in runs}


def test_structured_iterative_pruning_then_qat_int8_in_one_pipeline(shared_store):
    parent, stages = _pipeline(shared_store, "structured", [
        "prune=structured", "prune.schedule.name=iterative", "prune.schedule.steps=2", "prune.finetune.epochs=1",
        "quantize=qat", "quantize.epochs=1", "quantize.calibration.num_batches=2",
        "quantize.calibration.min_samples=64"])
    client = MlflowClient()
    prune, distill = stages["prune"].data.metrics, stages["distill"].data.metrics
    assert prune["model/params"] < 0.6 * distill["model/params"]
    assert prune["model/flops"] < 0.6 * distill["model/flops"]
    curve = client.get_metric_history(stages["prune"].info.run_id, "prune/step_val_acc")
    assert [m.step for m in curve] == [1, 2], "the accuracy-vs-sparsity curve has one point per step"
    targets = [m.value for m in client.get_metric_history(stages["prune"].info.run_id, "prune/step_target")]
    assert targets == pytest.approx([1 - 0.5**0.5, 0.5])
    assert [a.path for a in client.list_artifacts(stages["prune"].info.run_id, "model_plain")] == ["model_plain/model.pt2"]
    # QAT: trained with fake quantization (still distilling), then converted to real int8 kernels
    quant = stages["quantize"]
    assert client.get_metric_history(quant.info.run_id, "train/loss"), "QAT trained"
    assert client.get_metric_history(quant.info.run_id, "train/loss_kd"), "QAT kept distilling from the teacher"
    int8 = mlflow.onnx.load_model(f"runs:/{parent.info.run_id}/model")
    assert "QLinearConv" in {n.op_type for n in int8.graph.node}
    q = quant.data.metrics
    assert q["quantize/calibration_samples"] == 128
    assert q["model/size_bytes"] < q["quantize/fp32_onnx_bytes"]
    assert q["test/acc"] > 0.25  # a real classifier on 4 classes, evaluated on int8 kernels
    assert "plots/accuracy_vs_size.png" in [a.path for a in client.list_artifacts(parent.info.run_id, "plots")]


def test_gradual_magnitude_pruning_reaches_its_target_and_shrinks_the_file(shared_store):
    parent, stages = _pipeline(shared_store, "agp", [
        "prune=agp", "prune.sparsity=0.8", "prune.finetune.epochs=2", "prune.schedule.end_epoch=1",
        "prune.schedule.frequency=2", "quantize=none", "export.onnx=true"])
    prune = stages["prune"]
    assert prune.data.metrics["prune/sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert prune.data.metrics["model/size_bytes"] < stages["distill"].data.metrics["model/size_bytes"]
    history = MlflowClient().get_metric_history(prune.info.run_id, "prune/schedule_sparsity")
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(values) >= 3 and values == sorted(values) and values[-1] == pytest.approx(0.8)
    client = MlflowClient()
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "model_onnx")] == ["model_onnx/model.onnx"]
    table = mlflow.artifacts.load_text(f"runs:/{prune.info.run_id}/tables/layer_sparsity.csv").splitlines()
    assert table[0] == "layer,shape,weights,zeros,sparsity" and len(table) == 1 + 4  # three convs + classifier
