"""Shared fixtures: small generated data sets in the real on-disk layouts (see tests/generated_data.py)."""
import multiprocessing
from pathlib import Path

import pytest
import torch
from generated_data import write_cifar100, write_image_folder

# The suite's models are tiny: one intra-op thread is faster than two and keeps subprocess tests (DDP, CLI) from
# oversubscribing a 2-core CI machine.
torch.set_num_threads(1)

IMAGE_FOLDER_CLASSES = ("n01440764", "n01443537", "n01484850")


@pytest.fixture(autouse=True)
def no_child_process_left_running():
    """Fails the test that leaves a child process running (and kills it): multiprocessing joins its children when
    the interpreter exits, so one that never ends (a loader worker ignoring SIGTERM) hangs the suite after it passed."""
    yield
    left = multiprocessing.active_children()
    for child in left:
        child.kill()
        child.join(10)
    assert not left, f"child processes left running: {left}"


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory) -> Path:
    """DATASET.ROOT holding cifar-100-python/{train,test,meta}: 200 train and 100 test images (every class)."""
    return write_cifar100(tmp_path_factory.mktemp("cifar100_data"), num_train=200, num_test=100, seed=0)


@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory) -> Path:
    """DATASET.ROOT holding imagenet/{train,val} (3 classes, 4 + 2 JPEGs each, 48x40) and
    tiny-imagenet-200/{train,val} (same classes, 4 + 2 PNGs each, 64x64)."""
    root = tmp_path_factory.mktemp("imagenet_data")
    for folder, size, ext in (("imagenet", (48, 40), "JPEG"), ("tiny-imagenet-200", 64, "png")):
        write_image_folder(root / folder / "train", IMAGE_FOLDER_CLASSES, 4, size, ext, seed=0)
        write_image_folder(root / folder / "val", IMAGE_FOLDER_CLASSES, 2, size, ext, seed=1)
    return root
