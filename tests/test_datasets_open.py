"""The data-set registry beyond upstream's four: cifar10, mnist, fashion_mnist, folder and a user's own, on
generated files in the real formats (and on Debian's real Fashion-MNIST files where installed) (data/README.md)."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from generated_data import write_cifar10, write_idx, write_image_folder

from mdistiller.dataset import DatasetError, dataset_dict, get_dataset, get_val_loader, idx
from mdistiller.engine.config import load_cfg

FASHION = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[1]


def cfg_for(kind: str, root, *opts):
    return load_cfg(None, ["DATASET.TYPE", kind, "DATASET.ROOT", str(root), "DATASET.NUM_WORKERS", 0,
                           "SOLVER.BATCH_SIZE", 8, "DATASET.TEST.BATCH_SIZE", 8, "DISTILLER.TYPE", "NONE", *opts])


def first_batch(loader):
    return next(iter(loader))


@pytest.fixture(autouse=True)
def fresh_idx_cache():
    idx.read_split.cache_clear()
    yield
    idx.read_split.cache_clear()


def test_every_type_is_registered():
    assert {"cifar100", "imagenet", "tiny_imagenet", "digits", "cifar10", "mnist", "fashion_mnist", "folder"} <= \
        set(dataset_dict)


@pytest.mark.parametrize("layout", ["flat_gz", "torchvision_raw"])
@pytest.mark.parametrize("kind,name", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_files_are_served_as_padded_rgb_32x32(tmp_path, kind, name, layout):
    folder = tmp_path if layout == "flat_gz" else tmp_path / name / "raw"
    write_idx(folder, num_train=40, num_test=20, gz=layout == "flat_gz")
    train, val, num_data, num_classes = get_dataset(cfg_for(kind, tmp_path))
    assert (num_data, num_classes, len(val.dataset)) == (40, 10, 20)
    images, labels = first_batch(val)[:2]
    assert images.shape == (8, 3, 32, 32) and torch.equal(images[:, 0], images[:, 1])
    spec = dataset_dict[kind](cfg_for(kind, tmp_path).DATASET)
    mean, std = spec.mean, spec.std
    torch.testing.assert_close(images[:, 0, :2, :], torch.full((8, 2, 32), -mean[0] / std[0]))  # the zero padding
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz") if layout == "flat_gz" else \
            open(folder / "t10k-labels-idx1-ubyte", "rb") as f:
        expected = np.frombuffer(f.read(), np.uint8, offset=8)[:8]
    assert labels.tolist() == expected.tolist()
    assert first_batch(train)[0].shape == (8, 3, 32, 32)


def _corrupt(folder: Path, problem: str) -> Path:
    path = folder / "train-images-idx3-ubyte"
    data = path.read_bytes()
    if problem == "truncated":
        path.write_bytes(data[:-100])
    elif problem == "magic":
        path.write_bytes(struct.pack(">I", 2049) + data[4:])
    elif problem == "label":
        path = folder / "train-labels-idx1-ubyte"
        labels = bytearray(path.read_bytes())
        labels[8] = 12
        path.write_bytes(bytes(labels))
    else:
        path.unlink()
    return path


@pytest.mark.parametrize("problem,message", [
    ("truncated", r"train-images-idx3-ubyte: its header announces \[40, 28, 28\] = 31360 bytes but it holds 31260"),
    ("magic", r"train-images-idx3-ubyte: not an IDX file of unsigned bytes with magic 2051 \(found 2049\)"),
    ("label", r"train-labels-idx1-ubyte: label 12 is out of range \[0, 10\)"),
    ("missing", r"train-images-idx3-ubyte\[.gz\] is missing: looked in .*FashionMNIST/raw and"),
])
def test_bad_idx_files_are_one_line_errors_naming_the_file(tmp_path, problem, message):
    write_idx(tmp_path, num_train=40, gz=False)
    _corrupt(tmp_path, problem)
    with pytest.raises(DatasetError, match=message) as error:
        get_dataset(cfg_for("fashion_mnist", tmp_path))
    assert "\n" not in str(error.value)


def test_cifar10_pickles(tmp_path):
    write_cifar10(tmp_path, num_train=50, num_test=20)
    train, val, num_data, num_classes = get_dataset(cfg_for("cifar10", tmp_path))
    assert (num_data, num_classes, len(val.dataset)) == (50, 10, 20)
    assert sorted(train.dataset.base.targets) == sorted([i % 10 for i in range(10)] * 5)
    assert first_batch(val)[0].shape == (8, 3, 32, 32)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"CIFAR-10 file .*data_batch_3 is missing: download .*cifar-10"):
        get_dataset(cfg_for("cifar10", tmp_path))


@pytest.mark.parametrize("size,train_ops,test_ops", [
    (32, ["Resize", "RandomCrop", "RandomHorizontalFlip"], ["Resize"]),
    (96, ["RandomResizedCrop", "RandomHorizontalFlip"], ["Resize", "CenterCrop"]),
])
def test_folder_type_infers_classes_and_augments_by_size(tmp_path, size, train_ops, test_ops):
    classes = ["cat", "dog", "emu"]
    write_image_folder(tmp_path / "train", classes, 4, size=40)
    write_image_folder(tmp_path / "val", classes, 2, size=40)
    cfg = cfg_for("folder", tmp_path, "DATASET.IMAGE_SIZE", size, "DATASET.MEAN", "[0.5, 0.5, 0.5]",
                  "DATASET.STD", "[0.25, 0.25, 0.25]")
    train, val, num_data, num_classes = get_dataset(cfg)
    assert (num_data, num_classes, len(val.dataset)) == (12, 3, 6)
    names = [type(t).__name__ for t in train.dataset.base.transform.transforms]
    assert names == train_ops + ["ToTensor", "Normalize"]
    assert [type(t).__name__ for t in val.dataset.transform.transforms] == test_ops + ["ToTensor", "Normalize"]
    assert val.dataset.transform.transforms[-1].mean == (0.5, 0.5, 0.5)
    images, labels = first_batch(val)
    assert images.shape == (6, 3, size, size) and labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_folder_type_bad_trees_are_one_line_errors(tmp_path):
    write_image_folder(tmp_path / "train", ["a", "b"], 4)
    write_image_folder(tmp_path / "val", ["a", "c"], 2)
    with pytest.raises(DatasetError, match=r"val has class folders .* that differ from the train split's"):
        get_dataset(cfg_for("folder", tmp_path))
    with pytest.raises(DatasetError, match=r"DATASET.DOWNLOAD is True but DATASET.TYPE='folder' cannot be downloaded"):
        get_dataset(cfg_for("folder", tmp_path, "DATASET.DOWNLOAD", True))
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"train is not a usable ImageFolder .*empty"):
        get_dataset(cfg_for("folder", tmp_path))
    with pytest.raises(DatasetError, match=r"DATASET.MEAN = \[0.5\]; expected 3 numbers"):
        get_dataset(cfg_for("folder", tmp_path, "DATASET.MEAN", "[0.5]"))


def test_a_users_dataset_registers_through_experiment_imports(tmp_path):
    plugin = tmp_path / "my_data.py"
    plugin.write_text('''
import torch
from torch.utils.data import TensorDataset

from mdistiller.dataset import DatasetSpec, register_dataset


class Noise(TensorDataset):
    def __init__(self, n):
        super().__init__(torch.randn(n, 3, 32, 32), torch.arange(n) % 4)
        self.targets = (torch.arange(n) % 4).tolist()


@register_dataset("my_noise")
def my_noise(data_cfg):
    return DatasetSpec(split=lambda train, transform: Noise(16 if train else 8), num_classes=4,
                       mean=(0.0,) * 3, std=(1.0,) * 3, train_transform=lambda: None, test_transform=lambda: None)
''')
    try:
        cfg = cfg_for("my_noise", tmp_path, "EXPERIMENT.IMPORTS", f"['{plugin}']")
        _, val, num_data, num_classes = get_dataset(cfg)
        assert (num_data, num_classes, len(val.dataset)) == (16, 4, 8)
    finally:
        dataset_dict.pop("my_noise", None)


def test_val_loader_of_tools_reads_the_new_types(tmp_path):
    write_idx(tmp_path, num_train=20, num_test=10)
    loader, num_classes = get_val_loader("fashion_mnist", str(tmp_path), batch_size=5)
    assert num_classes == 10 and len(loader.dataset) == 10


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_the_debian_package():
    spec = dataset_dict["fashion_mnist"](cfg_for("fashion_mnist", FASHION).DATASET)
    train, test = spec.split(True, None), spec.split(False, None)
    assert (len(train), len(test)) == (60000, 10000)
    assert np.bincount(train.targets).tolist() == [6000] * 10 and np.bincount(test.targets).tolist() == [1000] * 10
    pixels = train.images.astype(np.float64) / 255
    assert pixels.mean() == pytest.approx(spec.mean[0], abs=1e-4)
    assert pixels.std() == pytest.approx(spec.std[0], abs=1e-4)
