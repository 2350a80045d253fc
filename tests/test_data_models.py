import numpy as np
import pytest
import torch

from kdpipe.data import DigitsDataModule, SyntheticDataModule
from kdpipe.errors import ConfigError
from kdpipe.models import cnn, mlp, resnet
from kdpipe.models.io import load_model, save_model


def test_digits_splits_are_seeded_disjoint_and_normalised_on_train():
    a, b = DigitsDataModule(seed=3), DigitsDataModule(seed=3)
    a.setup(), b.setup()
    sizes = [len(a.train_set), len(a.val_set), len(a.test_set)]
    assert sum(sizes) == 1797 and sizes[2] == round(1797 * 0.2)
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    x_train = a.train_set.tensors[0]
    assert abs(x_train.mean().item()) < 1e-4  # standardised with the training split's statistics
    assert abs(a.test_set.tensors[0].mean().item()) > 1e-4  # ...not with the test split's
    c = DigitsDataModule(seed=4)
    c.setup()
    assert not torch.equal(a.test_set.tensors[1], c.test_set.tensors[1])


def test_data_module_rejects_a_shape_that_contradicts_the_config():
    dm = DigitsDataModule(channels=3)
    with pytest.raises(ConfigError, match="data.channels"):
        dm.setup()


def test_synthetic_data_is_learnable_by_its_prototypes():
    dm = SyntheticDataModule(num_classes=3, noise=0.1, num_samples=90)
    dm.setup()
    x, y = dm.train_set.tensors
    assert x.shape[1:] == (1, 8, 8) and set(y.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("factory", [mlp, cnn, resnet])
def test_models_map_images_to_class_logits_and_round_trip_on_disk(factory, tmp_path):
    model = factory(in_shape=(3, 16, 16), num_classes=7)
    x = torch.randn(2, 3, 16, 16)
    assert model.eval()(x).shape == (2, 7)
    arch = {"_target_": f"kdpipe.models.{factory.__name__}", "in_shape": [3, 16, 16], "num_classes": 7}
    path = save_model(model, arch, tmp_path / "m.pt")
    assert torch.allclose(load_model(path)(x), model(x))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_round_trips_files_it_wrote_in_the_real_format(tmp_path, gz):
    from kdpipe.data.idx import IDXDataModule, write_idx

    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for split, n in (("train", 60), ("t10k", 20)):
        write_idx(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  tmp_path / f"{split}-images-idx3-ubyte{ext}")
        write_idx(rng.integers(0, 10, n, dtype=np.uint8), tmp_path / f"{split}-labels-idx1-ubyte{ext}")
    dm = IDXDataModule(root=str(tmp_path), val_fraction=0.25)
    dm.setup()
    assert len(dm.test_set) == 20 and len(dm.train_set) + len(dm.val_set) == 60
    assert dm.train_set.tensors[0].shape[1:] == (1, 28, 28)


def test_idx_data_module_names_the_command_that_gets_missing_files(tmp_path):
    from kdpipe.data.idx import IDXDataModule

    dm = IDXDataModule(root=str(tmp_path), install_hint="apt-get install -y dataset-fashion-mnist")
    with pytest.raises(ConfigError, match="apt-get install -y dataset-fashion-mnist"):
        dm.setup()
