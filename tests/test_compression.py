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
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from kdpipe.cli import CONFIG_PATH
from kdpipe.compress import (
    AGPSchedule,
    IterativeSchedule,
    MagnitudePruner,
    OneShotSchedule,
    PrunePoint,
    StructuredPruner,
    prune_model,
)
from kdpipe.compress.importance import Taylor
from kdpipe.compress.prune import magnitude_prune, make_permanent
from kdpipe.compress.quantize import CompressionWarning, quantize_static_int8
from kdpipe.compress.schedules import agp_sparsity
from kdpipe.compress.sparse_format import pack_state_dict
from kdpipe.compress.structured import export_plain_module
from kdpipe.config import validate
from kdpipe.errors import ConfigError
from kdpipe.export import export_onnx
from kdpipe.metrics.measure import flops_per_sample, onnx_logits
from kdpipe.models import cnn, count_params, resnet
from kdpipe.models.io import load_model, save_model
from kdpipe.overrides import check
from kdpipe.pipeline import run_pipeline
from tests.conftest import make_cfg, use_store

# The module-scoped fixtures are built once: all of this module's tests run in one worker.
pytestmark = pytest.mark.xdist_group("compression")

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
    sparse_file = save_model(model, CNN_ARCH | {"width": 32}, tmp_path / "sparse.pt", state_dict=d,
                             sparse=packed)
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
    StructuredPruner(model, x).step(0.5)
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


def test_the_three_schedules_yield_their_documented_points():
    one = OneShotSchedule(0.6, epochs=2)
    assert one.epochs == 2 and one.points(10) == [PrunePoint(0, 0.6)]

    iterative = IterativeSchedule(1 - 0.8**5, steps=5, epochs_per_step=2)  # 5 cuts of 20 % of what is left
    points = iterative.points(10)
    assert iterative.epochs == 10, "steps x epochs_per_step of fine-tuning in all"
    assert [p.step for p in points] == [0, 20, 40, 60, 80], "one cut at the start of each block"
    assert [p.target for p in points] == pytest.approx([1 - 0.8**k for k in range(1, 6)])

    # Zhu & Gupta (2017) eq. 1: fast early, slow late, exact at both ends
    assert agp_sparsity(0, 0.0, 0.8, 0, 100) == 0.0
    assert agp_sparsity(100, 0.0, 0.8, 0, 100) == 0.8
    assert agp_sparsity(50, 0.0, 0.8, 0, 100) == pytest.approx(0.8 * (1 - 0.5**3))
    agp = AGPSchedule(0.8, epochs=3, start_epoch=0.5, end_epoch=2, frequency=4)
    # t0 = 5, end = 20: every 4 steps from t0 (t0 itself prunes nothing), then the end
    points = agp.points(10)
    assert [p.step for p in points] == [9, 13, 17, 20]
    assert [p.target for p in points] == pytest.approx([agp_sparsity(t, 0.0, 0.8, 5, 20)
                                                        for t in (9, 13, 17, 20)])
    assert points[-1].target == 0.8


@pytest.mark.parametrize("make_pruner, tolerance", [
    (lambda model, x: MagnitudePruner(model, x), 1e-3),
    (lambda model, x: StructuredPruner(model, x), 0.07),  # whole channels of 8-32-wide layers
], ids=["magnitude", "structured"])
def test_magnitude_and_structured_pruners_reach_each_scheduled_target_through_the_same_step(
        make_pruner, tolerance):
    torch.manual_seed(0)
    model = cnn((1, 8, 8), 4, width=8, depth=3)
    pruner = make_pruner(model, torch.randn(2, 1, 8, 8))
    params = [count_params(model)[0]]
    for point in IterativeSchedule(0.75, steps=3, epochs_per_step=1).points(10):
        pruner.step(point.target)
        assert pruner.sparsity() == pytest.approx(point.target, abs=tolerance)
        params.append(count_params(model)[0])
    reached = pruner.sparsity()
    pruner.step(0.2)  # a lower target never revives what was removed
    assert pruner.sparsity() == reached
    if pruner.structural:
        assert params == sorted(params, reverse=True) and len(set(params)) == 4, "each cut removes parameters"
    else:
        assert len(set(params)) == 1, "masks: the tensors keep their shapes"
    pruner.finalize()
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 4)


def test_a_schedule_without_fine_tuning_applies_its_points_at_once():
    model = cnn((1, 8, 8), 4, width=8, depth=2)

    def finetune(callbacks, epochs):
        raise AssertionError("no fine-tuning fit for epochs=0")

    metrics = prune_model(MagnitudePruner(model), IterativeSchedule(0.5, steps=2, epochs_per_step=0),
                          finetune)
    assert metrics["prune/sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert not any("mask" in n for n, _ in model.named_buffers()), "finalized"


class LabelClassifier(pl.LightningModule):
    """A plain classifier on hard labels, with a per-epoch cosine learning rate."""

    def __init__(self, model: torch.nn.Module, epochs: int) -> None:
        super().__init__()
        self.model, self.epochs = model, epochs

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self.model(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=0.01)
        return {"optimizer": opt,
                "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)}


class OptimizerWatch(Callback):
    """After every training batch: the parameter count, whether the optimizer holds exactly the
    module's current parameters, and the learning rate."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, bool, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        groups = trainer.optimizers[0].param_groups
        held = {id(p) for g in groups for p in g["params"]}
        self.seen.append((trainer.current_epoch, count_params(pl_module)[0],
                          held == {id(p) for p in pl_module.parameters()}, groups[0]["lr"]))


def test_structured_pruning_on_agp_removes_channels_while_training_and_rebuilds_the_optimizer():
    torch.manual_seed(0)
    digits = instantiate(make_cfg(["data=digits"]).data)
    digits.setup("fit")
    model = cnn((1, 8, 8), 10, width=8, depth=3)
    params0 = count_params(model)[0]
    pruner = StructuredPruner(model, digits.example_input(2), importance=Taylor())  # reads gradients
    watch = OptimizerWatch()
    fits = []

    def finetune(callbacks, epochs):
        trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=8, callbacks=[*callbacks, watch],
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(LabelClassifier(model.train(), epochs), datamodule=digits)
        fits.append(callbacks[0])

    metrics = prune_model(pruner, AGPSchedule(0.5, epochs=2, end_epoch=1, frequency=2), finetune)
    assert len(fits) == 1, "one fit for the whole schedule"
    assert [p.step for p in fits[0].applied] == [2, 4, 6, 8]
    params = [n for _, n, _, _ in watch.seen]
    assert params == sorted(params, reverse=True) and len(set(params)) == 4, "params fall at each point"
    assert all(ok for _, _, ok, _ in watch.seen), "the optimizer always holds the current parameters"
    rebuilt_at_epoch_1 = [lr for epoch, _, _, lr in watch.seen if epoch == 1][0]
    assert rebuilt_at_epoch_1 == pytest.approx(0.005), (
        "a rebuilt cosine schedule goes on where it was (lr / 2)")
    assert metrics["prune/sparsity"] == pytest.approx(0.5, abs=0.07)
    assert metrics["prune/params_removed"] == pytest.approx(1 - count_params(model)[0] / params0)
    assert metrics["prune/params_removed"] > 0.6
    curve = fits[0].curve
    assert [c["prune/step_target"] for c in curve] == pytest.approx([agp_sparsity(6, 0.0, 0.5, 0, 8), 0.5])
    assert all(0.0 <= c["prune/step_val_acc"] <= 1.0 for c in curve)


# --- static quantization -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_cnn(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("quant")
    model = cnn((1, 8, 8), 4, width=8, depth=2).eval()
    data = TensorDataset(torch.randn(256, 1, 8, 8), torch.randint(0, 4, (256,)))
    return (model, export_onnx(model, torch.zeros(2, 1, 8, 8), folder / "fp32.onnx"),
            DataLoader(data, batch_size=32), folder)


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
    with pytest.warns(CompressionWarning, match="prune/schedule=iterative"):
        validate(make_cfg(["prune.sparsity=0.7"]))
    with pytest.warns(CompressionWarning, match="one-shot"):
        validate(make_cfg(["prune=structured", "prune.sparsity=0.7"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressionWarning)
        validate(make_cfg(["prune=iterative", "prune.sparsity=0.7"]))
        validate(make_cfg(["prune=structured", "prune/schedule=agp", "prune.sparsity=0.7"]))
        validate(make_cfg(["prune.sparsity=0.5"]))


@pytest.mark.parametrize("overrides, message", [
    (["quantize=static", "quantize.calibration.num_batches=0"], "needs calibration data"),
    (["quantize=static", "quantize.calibration.method=median"], "minmax, entropy, percentile"),
    (["prune.sparsity=1.5"], r"prune.sparsity=1.5 must lie in \[0, 1\)"),
    (["prune=agp", "prune.schedule.end_epoch=5"],
     r"agp needs start_epoch < end_epoch <= prune.finetune.epochs"),
    (["prune=agp", "prune.schedule.initial_sparsity=0.9"],
     r"initial_sparsity=0.9 must lie in \[0, prune.sparsity"),
    (["prune=iterative", "prune.schedule.steps=0"], "prune.schedule.steps=0 must be >= 1"),
    (["prune.pruner.scope=row"], "prune.pruner.scope=row must be global"),
    (["prune=structured", "prune.pruner.ignore=[head]"], r"prune.pruner.ignore names no layer \['head'\]"),
    (["prune=structured", "prune.importance._target_=kdpipe.compress.importance.Random"],
     "No module named 'kdpipe.compress.importance.Random'"),
    (["prune=structured", "trainer=ddp"], "a distributed run cannot follow; prune on one device"),
    (["prune.finetune.distill_from=student"], "prune.finetune.distill_from=student is not known"),
    (["quantize=qat", "quantize.distill_from=x"], "quantize.distill_from=x is not known"),
    (["compress.target_latency_ms=0.1"], "is met by removing channels: use prune=structured"),
    (["prune=structured", "compress.target_size_bytes=-5"], "compress.target_size_bytes=-5"),
    (["prune=structured", "compress.target_size_bytes=5000", "compress.target_margin=1"],
     "compress.target_margin=1.0 must be below 1"),
    (["compress.max_acc_drop=-1"], r"compress.max_acc_drop=-1: give the points .* a number >= 0"),
    (["compress.max_acc_drop=one"], r"compress.max_acc_drop=one: give the points"),
    (["compress.reference=best"], "compress.reference=best is not known; use input"),
    (["compress.max_acc_drop=1", "quantize=none", "prune=none"], "this pipeline has neither"),
    (["compress.sensitivity=true", "quantize=none", "prune=none"], "this pipeline has neither"),
    (["compress.sensitivity=true", "compress.sensitivity_sparsities=[0.5,1.5]"],
     r"compress.sensitivity_sparsities=1.5 must lie in \[0, 1\)"),
])
def test_nonsense_compression_settings_are_refused_before_any_training(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(overrides))


def test_an_unknown_importance_or_schedule_name_is_refused_with_the_options_in_one_line():
    for group, name in (("importance", "random"), ("schedule", "cyclic")):
        with pytest.raises(ConfigError, match=f"Could not find 'prune/{group}/{name}'") as info:
            check(["prune=structured", f"prune/{group}={name}"], CONFIG_PATH)
        assert "\n" not in str(info.value)


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
        "prune=structured", "prune/schedule=iterative", "prune.schedule.steps=2", "prune.finetune.epochs=1",
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
    assert ([a.path for a in client.list_artifacts(stages["prune"].info.run_id, "model_plain")]
            == ["model_plain/model.pt2"])
    # QAT: trained with fake quantization (still distilling), then converted to real int8 kernels
    quant = stages["quantize"]
    assert client.get_metric_history(quant.info.run_id, "train/loss"), "QAT trained"
    assert client.get_metric_history(quant.info.run_id, "train/loss_kd"), (
        "QAT kept distilling from the teacher")
    int8 = mlflow.onnx.load_model(f"runs:/{parent.info.run_id}/model")
    assert "QLinearConv" in {n.op_type for n in int8.graph.node}
    q = quant.data.metrics
    assert q["quantize/calibration_samples"] == 128
    assert q["model/size_bytes"] < q["quantize/fp32_onnx_bytes"]
    assert q["test/acc"] > 0.25  # a real classifier on 4 classes, evaluated on int8 kernels
    assert "plots/accuracy_vs_size.png" in [
        a.path for a in client.list_artifacts(parent.info.run_id, "plots")]


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
    assert ([a.path for a in client.list_artifacts(parent.info.run_id, "model_onnx")]
            == ["model_onnx/model.onnx"])
    table = mlflow.artifacts.load_text(f"runs:/{prune.info.run_id}/tables/layer_sparsity.csv").splitlines()
    # three convs + classifier
    assert table[0] == "layer,shape,weights,zeros,sparsity" and len(table) == 1 + 4


def test_structured_agp_pruning_keeps_distilling_through_a_fitnet_adapter_rebuilt_for_the_pruned_student(
        shared_store):
    _, stages = _pipeline(shared_store, "fitnet_agp", [
        "distill=fitnet", "prune=structured", "prune/schedule=agp", "prune.schedule.frequency=2",
        "quantize=none"])
    prune = stages["prune"]
    client = MlflowClient()
    assert prune.data.metrics["model/params"] < 0.6 * stages["distill"].data.metrics["model/params"]
    assert prune.data.metrics["prune/sparsity"] == pytest.approx(0.5, abs=0.07)
    history = sorted(client.get_metric_history(prune.info.run_id, "prune/schedule_sparsity"),
                     key=lambda m: m.step)
    values = [m.value for m in history]
    assert len(values) >= 3 and values == sorted(values) and values[-1] == pytest.approx(0.5)
    # the hint term kept training: its adapter was rebuilt from the pruned student's widths
    assert client.get_metric_history(prune.info.run_id, "train/loss_hint")


USER_PRUNING = '''
import torch

from kdpipe.compress import PrunePoint

CALLS = []


class LastChannelsFirst:
    """Scores the channels of a group by their index: the last ones are removed first."""

    def __call__(self, group):
        CALLS.append(len(group[0][1]))
        return -torch.arange(len(group[0][1]), dtype=torch.float)


class TwoCuts:
    """Half the target before training, the rest at the start of the last epoch."""

    def __init__(self, sparsity, epochs):
        self.sparsity, self.epochs = sparsity, epochs

    def points(self, steps_per_epoch):
        return [PrunePoint(0, self.sparsity / 2),
                PrunePoint((self.epochs - 1) * steps_per_epoch, self.sparsity)]
'''


def test_a_users_own_importance_and_schedule_join_by_import_path(shared_store, tmp_path, monkeypatch):
    (tmp_path / "user_pruning.py").write_text(USER_PRUNING)
    monkeypatch.syspath_prepend(str(tmp_path))
    _, stages = _pipeline(shared_store, "user_classes", [
        "prune=structured", "prune/importance=fpgm",
        "prune.importance._target_=user_pruning.LastChannelsFirst",
        "prune.schedule._target_=user_pruning.TwoCuts", "quantize=none"])
    import user_pruning

    assert user_pruning.CALLS, "the user's importance scored the channels"
    prune = stages["prune"]
    history = sorted(MlflowClient().get_metric_history(prune.info.run_id, "prune/schedule_sparsity"),
                     key=lambda m: m.step)
    assert [m.value for m in history] == pytest.approx([0.25, 0.5])
    assert history[0].step == 0 and history[1].step > 0, "the second cut at the start of the last epoch"
    assert prune.data.metrics["prune/params_removed"] > 0.5
