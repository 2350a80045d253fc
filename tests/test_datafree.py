"""Data-free distillation: DeepInversion's synthesis on a real trained teacher, the transfer set
stored with the teacher's run and reused by the next job, and the clear error for a teacher it
cannot invert."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from kdpipe.config import validate
from kdpipe.datafree.deepinversion import BatchNormStatistics, synthesize_batch
from kdpipe.errors import ConfigError
from kdpipe.models import cnn, mlp

from .conftest import make_cfg, run_job, stage_runs


def trained_teacher():
    """A small CNN fitted to four Gaussian prototypes: its batch-norm layers hold real statistics."""
    torch.manual_seed(0)
    protos = torch.randn(4, 1, 8, 8)
    model = cnn([1, 8, 8], 4, width=8, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        y = torch.randint(0, 4, (64,))
        x = protos[y] + 0.5 * torch.randn(64, 1, 8, 8)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), protos


def test_synthesis_lowers_the_batch_norm_loss_and_reaches_its_targets():
    teacher, _ = trained_teacher()
    losses = []
    targets = torch.arange(32) % 4
    x = synthesize_batch(teacher, targets, (1, 8, 8), steps=80, lr=0.1, tv=0.0,
                         generator=torch.Generator().manual_seed(0),
                         on_step=lambda step, terms: losses.append(terms))
    bn = [t["bn"] for t in losses]
    assert sum(bn[-10:]) / 10 < 0.5 * bn[0]
    assert losses[-1]["ce"] < losses[0]["ce"]
    with torch.no_grad():
        assert (teacher(x).argmax(-1) == targets).float().mean() > 0.9
    # the hooks are gone afterwards: the teacher runs as before
    stats = BatchNormStatistics(teacher)
    teacher(x)
    assert len(stats.terms) == 2
    stats.remove()


def test_the_first_batch_norm_layer_counts_first_bn_times():
    teacher, protos = trained_teacher()
    stats = BatchNormStatistics(teacher)
    x = protos.repeat(4, 1, 1, 1) + 0.3
    with torch.no_grad():
        teacher(x)
        first, second = (float(t) for t in stats.terms)
        # by hand: the relative term of the first layer, on the raw input of its BatchNorm
        bn = teacher.features[0][1]
        h = teacher.features[0][0](x)
        mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
        scale = bn.running_var + bn.eps
        by_hand = float(((mean - bn.running_mean) ** 2 / scale).mean().sqrt()
                        + ((var / scale - 1) ** 2).mean().sqrt())
        assert first == pytest.approx(by_hand, rel=1e-5)
        assert float(stats.loss(first=10.0)) == pytest.approx(10 * first + second, rel=1e-5)
        teacher(x)
        assert float(stats.loss()) == pytest.approx(first + second, rel=1e-5)
    stats.remove()


def test_a_bad_augmentation_of_the_synthesised_set_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match=r"distill.scheme.augment: unknown augmentation 'blur'"):
        validate(make_cfg(["distill=deepinversion", "distill.scheme.augment=[crop,blur]"]))


def test_a_teacher_without_batch_norm_gets_the_clear_error():
    with pytest.raises(ConfigError, match="no BatchNorm layer.*distill=data_free"):
        BatchNormStatistics(mlp([1, 8, 8], 4))
    with pytest.raises(ConfigError, match="no BatchNorm layer"):
        validate(make_cfg(["teacher.model._target_=kdpipe.models.mlp", "~teacher.model.width",
                           "~teacher.model.depth", "distill=deepinversion"]))


def test_the_transfer_set_is_synthesised_once_and_reused_by_the_next_job(store, tmp_path):
    small = ["distill=deepinversion", "distill.scheme.num_images=64", "distill.scheme.batch_size=32",
             "distill.scheme.steps=5", "prune=none", "quantize=none"]
    for i, extra in enumerate(([], ["distill.alpha=1.0"])):
        run_job([*small, *extra], tmp_path / f"job{i}")
    runs = stage_runs()
    teacher = next(r for r in runs if r.data.tags.get("kdpipe.stage") == "teacher"
                   and "kdpipe.reused_from" not in r.data.tags)
    first, second = sorted((r for r in runs if r.data.tags.get("kdpipe.stage") == "distill"),
                           key=lambda r: r.info.start_time)
    assert first.data.tags["kdpipe.synthetic"] == "computed"
    assert second.data.tags["kdpipe.synthetic"] == f"reused:{teacher.info.run_id}"
    client = MlflowClient()
    assert len(client.list_artifacts(teacher.info.run_id, "synthetic")) == 1
    assert "synthesis/loss_bn" in first.data.metrics
    assert [a.path for a in client.list_artifacts(second.info.run_id, "synthetic")] == ["synthetic/grid.png"]


def test_with_data_augment_the_teacher_scores_each_augmented_view_live(store, tmp_path):
    """data.augment replaces the scheme's augment; the teacher's logits are then never taken from a cache
    (DistillationModule refuses an augmented batch that carries them)."""
    run_job(["distill=deepinversion", "distill.scheme.num_images=64",
             "distill.scheme.batch_size=32", "distill.scheme.steps=5", "distill.scheme.augment=[]",
             "data.augment=[flip]", "prune=none", "quantize=none"], tmp_path / "job")


def test_an_augmented_batch_with_cached_teacher_outputs_is_refused():
    from types import SimpleNamespace

    from kdpipe.data.augment import build_augmentation
    from kdpipe.losses import WeightedSum
    from kdpipe.modules.distill import DistillationModule

    teacher, _ = trained_teacher()
    loss = WeightedSum.from_config({"kd": {"_target_": "kdpipe.losses.SoftTargetKL", "weight": 1.0}})
    module = DistillationModule(cnn([1, 8, 8], 4, width=4, depth=1), teacher, loss, 4,
                                torch.zeros(2, 1, 8, 8), augment=build_augmentation(["flip"], (1, 8, 8), 4))
    module._trainer = SimpleNamespace(training=True)
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    assert len(module.on_after_batch_transfer((x, y), 0)) == 2
    with pytest.raises(RuntimeError, match="cached teacher outputs and is augmented"):
        module.on_after_batch_transfer((x, y, teacher(x)), 0)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 7, 9)])
def test_the_generator_makes_standardised_inputs_of_the_data_shape(shape):
    from kdpipe.datafree.adversarial import Generator

    g = Generator(shape, nz=16, width=8)
    x = g(torch.randn(32, 16))
    assert x.shape == (32, *shape)
    assert x.mean().abs() < 0.1 and (x.std() - 1).abs() < 0.1  # per-channel standardised, like the data


def test_adversarial_data_free_kd_trains_a_student_from_no_image_and_logs_both_losses(store, tmp_path):
    run_job(["distill=data_free", "distill.scheme.steps_per_epoch=10", "distill.scheme.batch_size=64",
             "trainer.max_epochs=4", "prune=none", "quantize=none"], tmp_path / "job")
    runs = stage_runs()
    distill = next(r for r in runs if r.data.tags.get("kdpipe.stage") == "distill")
    m = distill.data.metrics
    logged = {"train/loss_student", "train/loss_generator", "train/generator_bn", "train/generator_balance"}
    assert logged <= set(m)
    assert m["test/acc"] > 0.5  # 4 classes: chance is 0.25; no training image was read by the student
    client = MlflowClient()
    assert [a.path for a in client.list_artifacts(distill.info.run_id, "synthetic")] == ["synthetic/grid.png"]


def test_int8_calibrated_on_synthesised_inputs_reads_no_data_and_stays_accurate(store, tmp_path):
    base = ["trainer.max_epochs=3", "prune=none", "quantize=static",
            "quantize.calibration.num_batches=2", "quantize.calibration.min_samples=0"]
    for i, extra in enumerate(([], ["quantize.calibration.source=synthetic",
                                    "quantize.calibration.synthetic.steps=30"])):
        run_job([*base, *extra], tmp_path / f"job{i}")
    real, synthetic = sorted((r for r in stage_runs() if r.data.tags.get("kdpipe.stage") == "quantize"),
                             key=lambda r: r.info.start_time)
    assert synthetic.data.tags["kdpipe.calibration_source"] == "synthetic"
    assert "kdpipe.calibration_source" not in real.data.tags
    assert synthetic.data.metrics["quantize/calibration_samples"] == 2 * 64
    assert synthetic.data.metrics["test/acc"] >= real.data.metrics["test/acc"] - 0.05
    with pytest.raises(ConfigError, match="calibrate on the training split"):
        validate(make_cfg(["student.model._target_=kdpipe.models.mlp", "~student.model.width",
                           "~student.model.depth", "quantize.calibration.source=synthetic"]))
