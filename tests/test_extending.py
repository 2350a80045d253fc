"""A user extends kdpipe from their own module, without editing it: a loss term, a model, a
training regime and a callback, each named by its import path on the command line."""

from __future__ import annotations

import json
import textwrap

import mlflow
from mlflow.tracking import MlflowClient

from tests.conftest import FAST, run_cli

USER_MODULE = textwrap.dedent('''
    """What a user writes in their own package: nothing here imports kdpipe's internals but
    the term's input type."""
    import json
    import os

    import torch
    from pytorch_lightning.callbacks import Callback
    from torch import nn


    class LogitMatch(nn.Module):
        """A loss term: mean squared error between student and teacher logits (Ba & Caruana 2014),
        with a hook on one student layer to show that user terms get features too."""

        teacher_layers = ()

        def __init__(self, scale: float = 1.0, layer: str = "features.0"):
            super().__init__()
            self.scale, self.student_layers = scale, (layer,)

        def forward(self, out):
            assert self.student_layers[0] in out.student_features
            return self.scale * (out.student_logits - out.teacher_logits).pow(2).mean()


    def tiny_mlp(in_shape, num_classes, hidden=16):
        """A model factory: f(in_shape, num_classes, **kwargs) -> nn.Module."""
        n = 1
        for d in in_shape:
            n *= int(d)
        return nn.Sequential(nn.Flatten(), nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


    class CountEpochs(Callback):
        """A callback on every Trainer: appends one line per finished fit to a file."""

        def __init__(self, path):
            self.path = path

        def on_train_end(self, trainer, pl_module):
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"epochs": trainer.current_epoch, "pid": os.getpid()}) + "\\n")


    class TwoStudents:
        """A training regime: trains two students on labels and keeps the better on validation."""

        needs_teacher = False

        def train(self, job):
            best, best_acc = None, -1.0
            for i in range(2):
                student = job.build_student()
                trainer = job.fitter.fit(job.classifier(student), f"candidate{i}", job.max_epochs)
                acc = float(trainer.callback_metrics["val/acc"])
                if acc > best_acc:
                    best, best_acc = student, acc
            return best
''')


def _runs():
    return mlflow.search_runs(experiment_names=["kdpipe"], output_format="list")


def test_a_users_term_model_and_callback_run_through_the_cli(tmp_path):
    (tmp_path / "my_ext.py").write_text(USER_MODULE)
    fits = tmp_path / "fits.jsonl"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*FAST, "prune=none", "quantize=none", "distill=kd",
            "+distill.terms.match={_target_:my_ext.LogitMatch,weight:0.5,scale:2.0,layer:'2'}",
            "~student.model",
            "+student.model={_target_:my_ext.tiny_mlp,in_shape:[1,8,8],num_classes:4,hidden:12}",
            f"+callbacks.count={{_target_:my_ext.CountEpochs,path:'{fits}'}}"]
    args = [a for a in args if not a.startswith("student.model.width")]
    proc = run_cli(args, cwd=tmp_path, env_extra={"PYTHONPATH": str(tmp_path), "MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    distill = next(r for r in _runs() if r.data.tags.get("kdpipe.stage") == "distill")
    client = MlflowClient()
    assert client.get_metric_history(distill.info.run_id, "train/loss_match")
    parent = client.get_run(distill.data.tags["mlflow.parentRunId"])
    assert parent.data.params["student.model._target_"] == "my_ext.tiny_mlp"
    assert distill.data.metrics["model/params"] == 8 * 8 * 12 + 12 + 12 * 4 + 4
    lines = [json.loads(line) for line in fits.read_text().splitlines()]
    assert len(lines) == 2  # the callback ran on the teacher's fit and on the student's


STUDENT_OPTION = textwrap.dedent('''
    # a user's own option of the student group, in a config folder of their own
    defaults:
      - /base/student@_here_
      - _self_
    model:
      _target_: my_ext.tiny_mlp
      in_shape: ['${data.channels}', '${data.height}', '${data.width}']
      num_classes: ${data.num_classes}
      hidden: 12
''')


def test_a_users_training_regime_and_config_folder_run_by_name(tmp_path):
    (tmp_path / "my_ext.py").write_text(USER_MODULE)
    (tmp_path / "my_conf" / "student").mkdir(parents=True)
    (tmp_path / "my_conf" / "student" / "tiny.yaml").write_text(STUDENT_OPTION)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*FAST, "prune=none", "quantize=none", "teacher=none", "distill=none",
            "distill.scheme._target_=my_ext.TwoStudents", "distill.name=two",
            f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "student=tiny"]
    args = [a for a in args if not a.startswith(("teacher.model.width", "student.model.width"))]
    proc = run_cli(args, cwd=tmp_path, env_extra={"PYTHONPATH": str(tmp_path), "MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    runs = _runs()
    distill = next(r for r in runs if r.data.tags.get("kdpipe.stage") == "distill")
    assert distill.data.metrics["test/acc"] > 0.25
    assert distill.data.metrics["model/params"] == 8 * 8 * 12 + 12 + 12 * 4 + 4  # the user's option
    # two candidates fitted
    assert len(MlflowClient().get_metric_history(distill.info.run_id, "val/acc")) == 2
    parent = next(r for r in runs if r.data.tags.get("kdpipe.run_type") == "pipeline")
    assert parent.info.run_name.startswith("two")
