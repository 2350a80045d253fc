"""The shortcuts that make the default run faster compute exactly what the long way computes."""

from __future__ import annotations

import re
import sqlite3

import mlflow
import torch
from torch.utils.data import DataLoader, TensorDataset

from kdpipe import export
from kdpipe.data import SyntheticDataModule
from kdpipe.models import cnn, mlp
from kdpipe.tracking.store import seed_sqlite_store, setup_tracking
from tests.conftest import use_store


def test_a_model_exported_again_is_the_same_file_and_another_model_is_exported_afresh(tmp_path, monkeypatch):
    from torch.onnx._internal.exporter import _registration

    before = _registration.ONNXRegistry.__dict__["from_torchlib"]
    torch.manual_seed(0)
    model, example = mlp((1, 4, 4), 3, hidden=(8,)), torch.zeros(2, 1, 4, 4)
    first = export.export_onnx(model, example, tmp_path / "a.onnx")
    assert _registration.ONNXRegistry.__dict__["from_torchlib"] is before  # torch is left as it was
    twin = mlp((1, 4, 4), 3, hidden=(8,))
    twin.load_state_dict(model.state_dict())
    with monkeypatch.context() as m:  # the twin is copied from the first export, not exported
        m.setattr(torch.onnx, "export", None)
        again = export.export_onnx(twin, example, tmp_path / "b.onnx")
    assert again.read_bytes() == first.read_bytes()

    other = mlp((1, 4, 4), 3, hidden=(8,))  # other weights: a real export, not a copy
    assert export.fingerprint(other, example) != export.fingerprint(model, example)
    fresh = export.export_onnx(other, example, tmp_path / "c.onnx")
    assert fresh.read_bytes() != first.read_bytes()
    export._EXPORTED.clear()  # the same export with nothing remembered gives the same bytes
    assert export.export_onnx(other, example, tmp_path / "d.onnx").read_bytes() == fresh.read_bytes()


def test_the_export_fingerprint_covers_attributes_and_refuses_hooks():
    example = torch.zeros(2, 1, 8, 8)
    torch.manual_seed(0)
    a = cnn((1, 8, 8), 10, width=4, depth=2).eval()
    b = cnn((1, 8, 8), 10, width=4, depth=2).eval()
    b.load_state_dict(a.state_dict())
    assert export.fingerprint(a, example) == export.fingerprint(b, example)
    b.features[0][0].padding = (2, 2)  # same weights, another forward
    assert export.fingerprint(a, example) != export.fingerprint(b, example)
    assert export.fingerprint(a, example) != export.fingerprint(a, torch.ones(2, 1, 8, 8))
    handle = a.classifier.register_forward_hook(lambda *_: None)
    assert export.fingerprint(a, example) is None
    handle.remove()
    a.scale = torch.ones(1)  # a tensor outside the parameters and buffers
    assert export.fingerprint(a, example) is None


def _schema(db) -> list[str]:
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
        ).fetchall()
        rows += [("alembic", v, "") for (v,) in con.execute("SELECT version_num FROM alembic_version")]
    # Alembic's batch migrations recreate tables with their constraints in set order, which
    # changes with the interpreter's hash seed: compare each table's clauses as a set.
    return sorted(str((kind, name, sorted(re.split(r",\s*\n", sql or "")))) for kind, name, sql in rows)


def test_a_seeded_sqlite_store_has_the_schema_mlflow_migrates_to(tmp_path, monkeypatch):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(tmp_path / "cache"))
    migrated = tmp_path / "migrated.db"
    SqlAlchemyStore(f"sqlite:///{migrated}", str(tmp_path / "art"))  # MLflow's own creation
    (tmp_path / "run").mkdir()
    uri = use_store(monkeypatch, tmp_path / "run")
    setup_tracking(uri, "kdpipe")
    assert list((tmp_path / "cache" / "mlflow-schema").glob("*.db"))  # the template is kept
    assert _schema(tmp_path / "run" / "mlflow.db") == _schema(migrated)
    assert sorted(e.name for e in mlflow.search_experiments()) == ["Default", "kdpipe"]
    assert seed_sqlite_store(uri) is False  # an existing store is never touched
    assert seed_sqlite_store("http://localhost:5000") is False
    assert seed_sqlite_store("sqlite://") is False  # in memory


def test_the_batched_loaders_give_the_batches_of_a_plain_dataloader():
    dm = SyntheticDataModule(num_samples=300, batch_size=32, seed=3)
    dm.setup("fit")

    def plain(ds, shuffle, batch_size):
        gen = torch.Generator().manual_seed(dm.seed) if shuffle else None
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)

    triple = TensorDataset(*dm.train_set.tensors, torch.randn(len(dm.train_set), 4))
    pairs = [(plain(dm.train_set, True, 32), dm.train_dataloader()),
             (plain(dm.val_set, False, 512), dm.val_dataloader()),
             (plain(triple, True, 32), dm._loader(triple, shuffle=True))]
    for expected, got in pairs:
        for _epoch in range(2):  # the second epoch's order too
            a, b = list(expected), list(got)
            assert len(a) == len(b) > 0
            for x, y in zip(a, b, strict=True):
                assert type(x) is type(y) and all(torch.equal(u, v) for u, v in zip(x, y, strict=True))


def test_channels_last_training_trains_the_same_model_in_the_faster_layout():
    """`trainer.channels_last` (on by default) changes where the numbers sit in memory, not what is
    learnt: two fits from one seed end at the same weights, and the saved weights load into a
    model built the default way."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback

    from kdpipe.modules.classifier import ClassifierModule
    from kdpipe.training import ChannelsLast

    class Layout(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            conv = pl_module.model.features[1][0].weight  # 8 in-channels: the layouts differ
            self.seen = conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()

    def fit(channels_last: bool) -> tuple[dict[str, torch.Tensor], bool]:
        pl.seed_everything(0, verbose=False)
        dm = SyntheticDataModule(num_samples=256, batch_size=32, seed=0)
        module = ClassifierModule(cnn((1, 8, 8), 4, width=8, depth=2), 4)
        layout = Layout()
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[layout, *([ChannelsLast()] if channels_last else [])])
        trainer.fit(module, datamodule=dm)
        return module.model.state_dict(), layout.seen

    default, seen_default = fit(False)
    fast, seen_fast = fit(True)
    assert seen_fast and not seen_default
    assert default.keys() == fast.keys()
    for name in default:
        assert torch.allclose(default[name].float(), fast[name].float(), atol=1e-4), name
    plain = cnn((1, 8, 8), 4, width=8, depth=2)
    plain.load_state_dict(fast)
    assert plain.features[1][0].weight.is_contiguous()
