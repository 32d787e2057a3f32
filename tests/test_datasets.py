"""Datasets: the CIFAR-100 reader on generated standard pickles (and its refusal of crafted ones), ImageFolder data
sets on generated images, the digits split, subsets and hold-outs, CRD samples, loaders and every error message."""
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from generated_data import write_image_folder
from torch.utils.data import RandomSampler, SequentialSampler

from mdistiller.dataset import DatasetError, cifar100, digits, get_dataset, get_val_loader, tiny_imagenet
from mdistiller.dataset import __main__ as dataset_cli
from mdistiller.dataset._common import InstanceSample, split_train
from mdistiller.dataset.cifar100 import CIFAR100, CIFAR100Instance, CIFAR100InstanceSample, read_split
from mdistiller.dataset.folder import Folder
from mdistiller.engine.cfg import CFG


def make_cfg(root, dataset_type="cifar100", distiller="NONE", **data):
    cfg = CFG.clone()
    cfg.DATASET.TYPE = dataset_type
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.NUM_WORKERS = 0
    cfg.DISTILLER.TYPE = distiller
    cfg.SOLVER.BATCH_SIZE = 8
    cfg.DATASET.TEST.BATCH_SIZE = 16
    cfg.CRD.NCE.K = 16
    for key, value in data.items():
        setattr(cfg.DATASET, key, value)
    return cfg


def plain_load(path: Path) -> dict:
    """The trusted decode (files we generated ourselves), as torchvision reads CIFAR."""
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


@pytest.fixture
def cifar_copy(cifar100_root, tmp_path) -> Path:
    """A private, writable copy of the shared CIFAR fixture, for tests that break files."""
    shutil.copytree(cifar100_root / "cifar-100-python", tmp_path / "cifar-100-python")
    return tmp_path


# ----------------------------------------------------------------------------------------------- CIFAR-100 reader
def test_writer_produces_the_official_python2_layout(cifar100_root):
    folder = cifar100_root / "cifar-100-python"
    raw = (folder / "train").read_bytes()
    assert raw[:2] == b"\x80\x02"  # protocol 2, as the official cPickle files
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"U\x04data" in raw  # py2 str keys
    train, test, meta = (plain_load(folder / name) for name in ("train", "test", "meta"))
    assert set(train) == {"filenames", "batch_label", "fine_labels", "coarse_labels", "data"}
    assert train["data"].dtype == np.uint8 and train["data"].shape == (200, 3072)
    assert test["data"].shape == (100, 3072) and sorted(test["fine_labels"]) == list(range(100))
    assert len(meta["fine_label_names"]) == 100 and len(meta["coarse_label_names"]) == 20


def test_reader_matches_the_plain_decode_pixel_for_pixel(cifar100_root):
    entry = plain_load(cifar100_root / "cifar-100-python" / "train")
    images, labels = read_split(cifar100_root, train=True)
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8
    assert labels == entry["fine_labels"]
    row = entry["data"][7]  # R plane, G plane, B plane; each 32x32 row-major
    for y, x, c in ((0, 0, 0), (5, 17, 1), (31, 30, 2)):
        assert images[7, y, x, c] == row[c * 1024 + y * 32 + x]


def test_reader_accepts_a_python3_repickled_copy(cifar100_root, tmp_path):
    for name in ("train", "test", "meta"):
        obj = plain_load(cifar100_root / "cifar-100-python" / name)
        (tmp_path / "cifar-100-python").mkdir(exist_ok=True)
        (tmp_path / "cifar-100-python" / name).write_bytes(pickle.dumps(obj, protocol=4))
    np.testing.assert_array_equal(read_split(tmp_path, False)[0], read_split(cifar100_root, False)[0])


def test_transforms_and_normalisation(cifar100_root):
    test_set = CIFAR100(cifar100_root, train=False, transform=cifar100.test_transform())
    img, target = test_set[3]
    raw = torch.from_numpy(read_split(cifar100_root, False)[0][3]).permute(2, 0, 1).float() / 255
    expected = (raw - torch.tensor(cifar100.MEAN)[:, None, None]) / torch.tensor(cifar100.STD)[:, None, None]
    assert torch.allclose(img, expected, atol=1e-6) and target == test_set.targets[3]
    train_img, _, index = CIFAR100Instance(cifar100_root, transform=cifar100.train_transform())[5]
    assert train_img.shape == (3, 32, 32) and index == 5
    assert not torch.allclose(train_img, CIFAR100(cifar100_root, True, cifar100.test_transform())[5][0])


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("where", ["top", "labels", "meta"])
def test_crafted_pickle_is_refused_without_running_it(cifar_copy, tmp_path, where):
    marker = tmp_path / "marker"
    folder = cifar_copy / "cifar-100-python"
    name = "meta" if where == "meta" else "train"
    entry = plain_load(folder / name)
    if where == "top":
        obj = _Payload(marker)
    elif where == "labels":
        obj = dict(entry, fine_labels=[_Payload(marker)] + entry["fine_labels"][1:])
    else:
        obj = dict(entry, fine_label_names=_Payload(marker))
    (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    refused = r"not a valid CIFAR-100 pickle .*refers to __builtin__\.exec.*refused, nothing was run"
    with pytest.raises(DatasetError, match=refused):
        read_split(cifar_copy, train=True)
    assert not marker.exists()


def test_object_array_smuggled_as_data_is_refused(cifar_copy):
    path = cifar_copy / "cifar-100-python" / "train"
    entry = plain_load(path)
    entry["data"] = np.array([[1, "x"]] * 200, dtype=object)
    path.write_bytes(pickle.dumps(entry, protocol=4))
    with pytest.raises(DatasetError, match=r"'data' should be a uint8 array \[N, 3072\], found object \(200, 2\)"):
        read_split(cifar_copy, train=True)


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no_folder", r"CIFAR-100 folder .*cifar-100-python does not exist: download https://.*DATASET.DOWNLOAD True"),
        ("no_test", r"CIFAR-100 file .*cifar-100-python/test is missing: download .*untar it into"),
        ("truncated", r".*cifar-100-python/test is not a valid CIFAR-100 pickle \(.*\); download"),
        ("not_a_dict", r".*/test holds a list, expected the CIFAR-100 dict"),
        ("no_data_key", r".*/test has no 'data' entry \(found \[.*\]\), so it is not a CIFAR-100 file"),
        ("wrong_shape", r".*/test: 'data' should be a uint8 array \[N, 3072\], found uint8 \(100, 1024\)"),
        ("short_labels", r".*/test: 'fine_labels' should be a list of 100 labels"),
        ("bad_label", r".*/test: 'fine_labels' should hold integers in \[0, 100\)"),
        ("bad_meta", r".*/meta: 'fine_label_names' should list 100 names"),
    ],
)
def test_cifar_error_messages(cifar_copy, breakage, message):
    folder = cifar_copy / "cifar-100-python"
    test = plain_load(folder / "test")
    if breakage == "no_folder":
        shutil.rmtree(folder)
    elif breakage == "no_test":
        (folder / "test").unlink()
    elif breakage == "truncated":
        (folder / "test").write_bytes((folder / "test").read_bytes()[:5000])
    elif breakage == "not_a_dict":
        (folder / "test").write_bytes(pickle.dumps([1, 2], protocol=2))
    else:
        if breakage == "no_data_key":
            del test["data"]
        elif breakage == "wrong_shape":
            test["data"] = test["data"][:, :1024].copy()
        elif breakage == "short_labels":
            test["fine_labels"] = test["fine_labels"][:-1]
        elif breakage == "bad_label":
            test["fine_labels"][0] = 100
        elif breakage == "bad_meta":
            (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["a"]}, protocol=2))
        (folder / "test").write_bytes(pickle.dumps(test, protocol=4))
    with pytest.raises(DatasetError, match=message):
        get_dataset(make_cfg(cifar_copy))


def test_download_is_skipped_when_present_and_its_failure_is_explained(cifar_copy, tmp_path, monkeypatch):
    from torchvision.datasets import utils

    calls = []
    monkeypatch.setattr(utils, "download_and_extract_archive", lambda *a, **k: calls.append(a) or 1 / 0)
    get_dataset(make_cfg(cifar_copy, DOWNLOAD=True))
    assert calls == []
    with pytest.raises(DatasetError, match=r"downloading CIFAR-100 from https://.* into .*empty failed \(Zero"):
        get_dataset(make_cfg(tmp_path / "empty", DOWNLOAD=True))
    assert len(calls) == 1 and calls[0][0] == cifar100.URL


# ------------------------------------------------------------------------------------------------ get_dataset
def test_get_dataset_cifar_loaders(cifar100_root):
    train_loader, val_loader, num_data, num_classes = get_dataset(make_cfg(cifar100_root))
    assert (num_data, num_classes) == (200, 100)
    assert isinstance(train_loader.sampler, RandomSampler) and not train_loader.drop_last
    assert isinstance(val_loader.sampler, SequentialSampler) and val_loader.batch_size == 16
    assert train_loader.pin_memory == torch.cuda.is_available()
    image, target, index = next(iter(train_loader))
    assert image.shape == (8, 3, 32, 32) and target.dtype == index.dtype == torch.int64
    assert sorted(i for batch in train_loader for i in batch[2].tolist()) == list(range(200))
    val_batch = next(iter(val_loader))
    assert len(val_batch) == 2 and val_batch[0].shape == (16, 3, 32, 32)
    assert sum(len(b[1]) for b in val_loader) == 100


def test_loader_with_a_worker_process(cifar100_root):
    train_loader, _, _, _ = get_dataset(make_cfg(cifar100_root, NUM_WORKERS=1))
    assert sum(len(b[0]) for b in train_loader) == 200


def test_train_subset_and_holdout(cifar100_root):
    cfg = make_cfg(cifar100_root, TRAIN_SUBSET=50, VALIDATION_FROM_TRAIN=30)
    train_loader, val_loader, num_data, _ = get_dataset(cfg)
    train_set, val_set = train_loader.dataset, val_loader.dataset
    assert num_data == len(train_set) == 50 and len(val_set) == 30
    assert not set(train_set.indices) & set(val_set.indices)
    held_out_alone = get_dataset(make_cfg(cifar100_root, VALIDATION_FROM_TRAIN=30))[1].dataset
    assert set(val_set.indices) == set(held_out_alone.indices)  # independent of TRAIN_SUBSET
    assert list(get_dataset(cfg)[0].dataset.indices) == list(train_set.indices)  # fixed, seeded choice
    images, labels = read_split(cifar100_root, True)
    raw = torch.from_numpy(images[val_set.indices[4]]).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(cifar100.MEAN)[:, None, None], torch.tensor(cifar100.STD)[:, None, None]
    assert torch.allclose(val_set[4][0], (raw - mean) / std, atol=1e-6)  # held-out images: test transform
    assert val_set[4][1] == labels[val_set.indices[4]]
    _, target, index = train_set[10]  # index = position in the used set; target follows the original image
    assert index == 10 and target == labels[train_set.indices[10]]


def test_split_train_rules():
    assert split_train(10, 0, 0)[1] is None and list(split_train(10, 0, 0)[0]) == list(range(10))
    train, held = split_train(10, 0, 3)
    assert len(train) == 7 and len(held) == 3 and not set(train) & set(held)
    for args, message in [
        ((10, -1, 0), r"DATASET.TRAIN_SUBSET=-1: expected 0 \(off\) or a positive"),
        ((10, 0, 10), r"DATASET.VALIDATION_FROM_TRAIN=10: the train set has only 10 images"),
        ((10, 8, 3), r"DATASET.TRAIN_SUBSET=8: only 7 train images are available"),
    ]:
        with pytest.raises(DatasetError, match=message):
            split_train(*args)


def test_config_errors(cifar100_root):
    with pytest.raises(DatasetError, match=r"DATASET.TYPE='cifar1000' is unknown; expected one of \['cifar10', "):
        get_dataset(make_cfg(cifar100_root, TYPE="cifar1000"))
    cfg = make_cfg(cifar100_root, TRAIN_SUBSET=4)
    with pytest.raises(DatasetError, match=r"SOLVER.BATCH_SIZE=8 is larger than the 4 training images"):
        get_dataset(cfg)
    cfg = make_cfg(cifar100_root, distiller="CRD")
    cfg.CRD.MODE = "loose"
    with pytest.raises(DatasetError, match=r"CRD.MODE='loose': expected 'exact' or 'relax'"):
        get_dataset(cfg)


# ---------------------------------------------------------------------------------------------------- CRD samples
def test_crd_batches_and_sample_rules(cifar100_root):
    cfg = make_cfg(cifar100_root, distiller="CRD", TRAIN_SUBSET=120)
    train_loader, _, num_data, _ = get_dataset(cfg)
    image, target, index, sample_idx = next(iter(train_loader))
    assert sample_idx.shape == (8, 17) and sample_idx.dtype == torch.int64
    assert torch.equal(sample_idx[:, 0], index)  # exact mode: the positive is the item itself
    targets = torch.tensor(train_loader.dataset.targets)
    assert sample_idx.max() < num_data == 120
    assert (targets[sample_idx[:, 1:]] != target[:, None]).all()  # negatives: other classes only


def test_crd_relax_mode_replacement_and_reproducibility(cifar100_root):
    torch.manual_seed(0)
    relax = CIFAR100InstanceSample(cifar100_root, k=50, mode="relax")
    targets = torch.tensor(relax.targets)
    positives = {int(relax[i][3][0]) for i in range(0, 200, 100) for _ in range(20)}
    assert len(positives) > 2 and all(targets[p] in (targets[0], targets[100]) for p in positives)
    assert len(set(relax[3][3][1:].tolist())) == 50  # no replacement: k <= 198 negatives
    few = InstanceSample(CIFAR100(cifar100_root), k=250, indices=range(200))
    assert len(set(few[3][3][1:].tolist())) < 250  # k > negatives: drawn with replacement
    torch.manual_seed(1)
    first = relax[7][3]
    torch.manual_seed(1)
    assert torch.equal(first, relax[7][3])


def test_crd_negatives_are_uniform_over_other_classes():
    torch.manual_seed(0)
    base = type("Labels", (), {"targets": [0] * 5 + [1] * 3 + [2] * 2, "__len__": lambda self: 10})()
    sampler = InstanceSample(base, k=4000, replace=True)
    counts = torch.bincount(sampler.sample(1, 1)[1:], minlength=10)
    assert counts[5:8].sum() == 0 and (counts[[0, 1, 2, 3, 4, 8, 9]] > 450).all()


# ------------------------------------------------------------------------------------------------- ImageFolder
def test_imagenet_and_tiny_imagenet_on_generated_images(imagenet_root):
    for dataset_type, size, num_classes in (("imagenet", 224, 1000), ("tiny_imagenet", 64, 200)):
        train_loader, val_loader, num_data, classes = get_dataset(make_cfg(imagenet_root, dataset_type, "CRD"))
        assert (num_data, classes) == (12, num_classes)
        image, target, index, sample_idx = next(iter(train_loader))
        assert image.shape == (8, 3, size, size) and sample_idx.shape == (8, 17)
        folder = train_loader.dataset.base
        assert folder.classes == ["n01440764", "n01443537", "n01484850"]
        assert [folder.targets[i] for i in index.tolist()] == target.tolist()
        assert all(Path(folder.samples[i][0]).parent.name == folder.classes[t] for i, t in zip(index, target))
        image, target = next(iter(val_loader))
        assert image.shape == (6, 3, size, size) and target.tolist() == [0, 0, 1, 1, 2, 2]
    loader, num_classes = get_val_loader("tiny_imagenet", str(imagenet_root), batch_size=4)
    assert num_classes == 200 and len(loader.dataset) == 6 and loader.batch_size == 4


def _flat_tiny_val(root: Path) -> None:
    """The official archive's flat val split, made from an ImageFolder val split."""
    val = root / "tiny-imagenet-200" / "val"
    lines = []
    (val / "images").mkdir()
    for wnid_dir in sorted(p for p in val.iterdir() if p.name != "images"):
        for image in sorted(wnid_dir.iterdir()):
            lines.append(f"{image.name}\t{wnid_dir.name}\t0\t0\t63\t63")
            image.rename(val / "images" / image.name)
        wnid_dir.rmdir()
    (val / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_tiny_imagenet_flat_val_is_explained_then_rearranged(imagenet_root, tmp_path, monkeypatch, capsys):
    shutil.copytree(imagenet_root / "tiny-imagenet-200", tmp_path / "tiny-imagenet-200")
    _flat_tiny_val(tmp_path)
    flat = r"val is still in the archive's flat layout.*python -m mdistiller\.dataset tiny-imagenet-val"
    with pytest.raises(DatasetError, match=flat):
        get_dataset(make_cfg(tmp_path, "tiny_imagenet"))
    monkeypatch.setattr(sys, "argv", ["python -m mdistiller.dataset", "tiny-imagenet-val", str(tmp_path)])
    assert dataset_cli.main() == 0 and "moved 6 images" in capsys.readouterr().out
    assert dataset_cli.main() == 1 and "val_annotations.txt not found" in capsys.readouterr().err
    assert not (tmp_path / "tiny-imagenet-200" / "val" / "images").exists()
    _, val_loader, _, _ = get_dataset(make_cfg(tmp_path, "tiny_imagenet"))
    assert next(iter(val_loader))[1].tolist() == [0, 0, 1, 1, 2, 2]


def test_image_folder_error_messages(imagenet_root, tmp_path):
    with pytest.raises(DatasetError, match=r"imagenet/train does not exist; expected one sub-folder .*image-net.org"):
        get_dataset(make_cfg(tmp_path, "imagenet"))
    (tmp_path / "tiny-imagenet-200" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"train is not a usable ImageFolder \(.*\); download http://cs231n"):
        get_dataset(make_cfg(tmp_path, "tiny_imagenet"))
    write_image_folder(tmp_path / "tiny-imagenet-200" / "train", ["a", "b"], 1, 8)
    write_image_folder(tmp_path / "tiny-imagenet-200" / "val", ["a", "c"], 1, 8)
    with pytest.raises(DatasetError, match=r"val has class folders \['a', 'c'\]... that differ .*\['b', 'c'\]"):
        tiny_imagenet.TinyImageNet(tmp_path, train=False)
    with pytest.raises(DatasetError, match=r"has 2 class folders, more than the 1 classes of this data set; hint"):
        Folder(tmp_path / "tiny-imagenet-200" / "train", how_to_get="hint", num_classes=1)
    broken = tmp_path / "tiny-imagenet-200" / "train" / "a" / "a_0000.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"image .*a_0000.png cannot be read \(UnidentifiedImageError"):
        Folder(tmp_path / "tiny-imagenet-200" / "train")[0]


# ------------------------------------------------------------------------------------------------------- digits
def test_digits_split_is_fixed_disjoint_and_balanced():
    from sklearn.datasets import load_digits

    train, test = digits.split_indices()
    assert (len(train), len(test)) == (1437, 360)
    assert not set(train) & set(test) and len(set(train) | set(test)) == 1797
    assert list(test[:8]) == [4, 5, 6, 9, 14, 17, 18, 19]  # the pinned split (normalisation depends on it)
    train_set, test_set = digits.Digits(train=True), digits.Digits(train=False)
    target = load_digits().target
    assert train_set.targets == target[train].tolist() and test_set.targets == target[test].tolist()
    assert np.bincount(test_set.targets).min() >= 20 and np.bincount(train_set.targets).min() >= 100


def test_digits_images_and_normalisation_constants():
    train_set = digits.Digits(train=True)
    images = train_set.images
    assert images.shape == (1437, 32, 32, 3) and images.dtype == np.uint8 and images.max() == 255
    assert (images[..., 0] == images[..., 2]).all()
    x = images.astype(np.float64) / 255
    np.testing.assert_allclose(digits.MEAN, x.mean(axis=(0, 1, 2)), atol=1e-4)
    np.testing.assert_allclose(digits.STD, x.std(axis=(0, 1, 2)), atol=1e-4)


def test_digits_get_dataset_formats():
    train_loader, val_loader, num_data, num_classes = get_dataset(make_cfg("unused", "digits", "CRD"))
    assert (num_data, num_classes, len(val_loader.dataset)) == (1437, 10, 360)
    image, target, index, sample_idx = next(iter(train_loader))
    assert image.shape == (8, 3, 32, 32) and sample_idx.shape == (8, 17) and target.max() < 10
    image, target = next(iter(val_loader))
    assert abs(float(image.mean())) < 0.3  # normalised with its own constants
