"""Readers of the real on-disk formats, on small files the tests write in those formats."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from kdpipe.data import CIFARDataModule, IDXDataModule, ImageFolderDataModule, SyntheticDataModule
from kdpipe.data.checks import check_idx
from kdpipe.data.cifar import read_batch, write_batch
from kdpipe.data.idx import write_idx
from kdpipe.errors import ConfigError
from tests.conftest import make_cfg


@pytest.fixture(autouse=True)
def stats_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    return tmp_path.parent / f"{tmp_path.name}-cache" / "stats"


def write_cifar(folder, variant="cifar10", n_train=10, n_test=8, classes=10):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    if variant == "cifar10":
        names, key = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"
    else:
        names, key = ["train", "test"], "fine_labels"
    for name in names:
        n = n_test if "test" in name else n_train
        write_batch(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, classes, n),
                    folder / name, label_key=key)
    return folder


def test_cifar10_reads_the_five_training_batches_and_the_official_test_batch(tmp_path):
    folder = write_cifar(tmp_path / "cifar-10-batches-py")
    dm = CIFARDataModule(root=str(tmp_path), val_fraction=0.2)  # the parent of the archive folder works too
    dm.setup()
    assert len(dm.test_set) == 8 and len(dm.train_set) + len(dm.val_set) == 50
    assert dm.train_set.tensors[0].shape[1:] == (3, 32, 32)
    raw = read_batch(folder / "test_batch")
    first = torch.from_numpy(raw["data"][0].reshape(3, 32, 32).astype(np.float32) / 255.0)
    # channel-major layout kept: the first test image comes back as it was written (after normalisation)
    assert torch.allclose(dm.test_set.tensors[0][0], (first - dm.mean[0]) / dm.std[0], atol=1e-5)
    assert dm.test_set.tensors[1][0].item() == raw["labels"][0]


def test_cifar100_uses_the_fine_labels(tmp_path):
    write_cifar(tmp_path, "cifar100", n_train=30, n_test=6, classes=100)
    dm = CIFARDataModule(root=str(tmp_path), variant="cifar100", num_classes=100)
    dm.setup()
    assert len(dm.test_set) == 6 and dm.num_classes == 100


def test_cifar_reader_refuses_a_batch_file_that_would_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_batch(tmp_path / "test_batch")
    assert not (tmp_path / "pwned").exists()


def test_missing_cifar_files_fail_with_the_command_that_gets_them(tmp_path):
    dm = CIFARDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"curl -L https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"):
        dm.setup()


def write_images(folder, classes=("cat", "dog", "eel"), per_class=6, size=(20, 14)):
    rng = np.random.default_rng(1)
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 60 * c, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_resizes_to_the_declared_size_and_splits_with_the_seed(tmp_path):
    write_images(tmp_path)
    dm = ImageFolderDataModule(root=str(tmp_path), height=16, width=12, num_classes=3, seed=5,
                               val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    assert dm.classes == ["cat", "dog", "eel"]
    assert dm.train_set.tensors[0].shape[1:] == (3, 16, 12)
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 18
    again = ImageFolderDataModule(root=str(tmp_path), height=16, width=12, num_classes=3, seed=5,
                                  val_fraction=0.2, test_fraction=0.2)
    again.setup()
    assert torch.equal(dm.val_set.tensors[1], again.val_set.tensors[1])
    grey = ImageFolderDataModule(root=str(tmp_path), channels=1, height=8, width=8, num_classes=3)
    grey.setup()
    assert grey.train_set.tensors[0].shape[1:] == (1, 8, 8)


def test_image_folder_keeps_given_splits_and_draws_val_from_train_when_absent(tmp_path):
    write_images(tmp_path / "train", per_class=8)
    write_images(tmp_path / "test", per_class=2)
    dm = ImageFolderDataModule(root=str(tmp_path), height=8, width=8, num_classes=3, val_fraction=0.25)
    dm.setup()
    assert len(dm.test_set) == 6 and len(dm.val_set) == 6 and len(dm.train_set) == 18


def test_image_folder_names_the_class_count_to_set(tmp_path):
    write_images(tmp_path)
    with pytest.raises(ConfigError, match="data.num_classes=3"):
        ImageFolderDataModule(root=str(tmp_path), num_classes=10).setup()


def test_normalisation_statistics_come_from_the_train_split_and_are_cached(tmp_path, stats_cache):
    write_cifar(tmp_path)
    dm = CIFARDataModule(root=str(tmp_path), val_fraction=0.2)
    dm.setup()
    assert not dm.stats_cached and len(list(stats_cache.glob("*.json"))) == 1
    x = dm.train_set.tensors[0]
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)  # standardised on train
    again = CIFARDataModule(root=str(tmp_path), val_fraction=0.2)
    again.setup()
    assert again.stats_cached and torch.allclose(again.mean, dm.mean) and torch.allclose(again.std, dm.std)
    other_split = CIFARDataModule(root=str(tmp_path), val_fraction=0.4)
    other_split.setup()  # another train split: other statistics, computed not read
    assert not other_split.stats_cached and not torch.allclose(other_split.mean, dm.mean)


@pytest.mark.parametrize("option", ["cifar10", "cifar100", "image_folder"])
def test_each_data_option_composes_and_builds_its_module(option, tmp_path):
    if option.startswith("cifar"):
        write_cifar(tmp_path, option, classes=10)
    else:
        write_images(tmp_path)
    cfg = make_cfg([f"data={option}", f"data.root={tmp_path}"]
                   + (["data.num_classes=3"] if option == "image_folder" else []))
    dm = instantiate(cfg.data)
    dm.setup()
    assert dm.train_set.tensors[0].shape[1:] == (cfg.data.channels, cfg.data.height, cfg.data.width)


# The same checks as the command line's preflight, for Python users: the modules raise them on setup.

def write_idx_set(folder, n_train=40, n_test=10, gz=False, labels=None):
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(images, folder / f"{split}-images-idx3-ubyte{ext}")
        y = rng.integers(0, 10, n, dtype=np.uint8) if labels is None or split != "train" else labels
        write_idx(y, folder / f"{split}-labels-idx1-ubyte{ext}")
    return folder


def test_idx_module_refuses_truncated_files_mismatched_counts_and_labels_out_of_range(tmp_path):
    write_idx_set(tmp_path / "ok")
    IDXDataModule(root=str(tmp_path / "ok"), val_fraction=0.25).setup()
    trunc = write_idx_set(tmp_path / "trunc")
    with open(trunc / "t10k-images-idx3-ubyte", "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(ConfigError, match=r"t10k-images-idx3-ubyte is truncated or corrupt "
                                          r"\(expected 7856 bytes, found 1000\); reinstall with: get it"):
        IDXDataModule(root=str(trunc), install_hint="get it").setup()
    count = write_idx_set(tmp_path / "count", labels=np.zeros(7, dtype=np.uint8))
    with pytest.raises(ConfigError, match="holds 40 images but train-labels-idx1-ubyte holds 7 labels"):
        IDXDataModule(root=str(count)).setup()
    wide = write_idx_set(tmp_path / "wide", labels=np.full(40, 12, dtype=np.uint8))
    with pytest.raises(ConfigError, match=r"holds label 12, outside \[0, data.num_classes=10\)"):
        IDXDataModule(root=str(wide)).setup()
    IDXDataModule(root=str(wide), num_classes=13).setup()


def test_a_gzip_file_corrupt_inside_with_an_intact_trailer_is_named_when_it_is_read(tmp_path):
    """The preflight trusts a gzip trailer that records the right length (reading 47 MB of
    Fashion-MNIST through would cost 0.3 s per command); the module names the file on load."""
    folder = write_idx_set(tmp_path, gz=True)
    path = folder / "train-images-idx3-ubyte.gz"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2: len(blob) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(blob))
    check_idx(folder)  # the trailer still records 31376 bytes
    with pytest.raises(ConfigError, match="train-images-idx3-ubyte.gz is truncated or corrupt"):
        IDXDataModule(root=str(folder)).setup()


def test_image_folder_module_refuses_one_class_and_an_unreadable_image(tmp_path):
    write_images(tmp_path / "one", classes=("cat",))
    with pytest.raises(ConfigError, match=r"one class found under .*one \(cat\); "
                                          r"classification needs at least two class folders"):
        ImageFolderDataModule(root=str(tmp_path / "one"), num_classes=2).setup()
    write_images(tmp_path / "bad", classes=("cat", "dog"))
    (tmp_path / "bad" / "dog" / "0.png").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"cannot read image .*dog/0.png: .*; remove or replace it"):
        ImageFolderDataModule(root=str(tmp_path / "bad"), num_classes=2).setup()


def test_cifar_module_refuses_an_empty_batch_file_and_quotes_the_folder_in_its_hint(tmp_path):
    folder = write_cifar(tmp_path / "my cifar")
    (folder / "data_batch_3").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"data_batch_3 is empty \(0 bytes\).*mkdir -p '.*/my cifar' &&"):
        CIFARDataModule(root=str(folder)).setup()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_classes": 1}, "data.num_classes=1 must be >= 2"),
    ({"val_fraction": 0.0}, r"data.val_fraction=0.0 must lie in \(0, 1\)"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "leaves no training split"),
])
def test_a_data_module_holds_its_values_to_the_command_line_ranges(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SyntheticDataModule(**kwargs)
