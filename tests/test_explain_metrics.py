"""Evaluation metrics and data: the test vectors of docs/evaluation.md, positive/negative controls, shapes data."""
import h5py
import numpy as np
import pytest
import torch
from generated_data import export_image_folder, get_shapes_dataloaders
from torchvision.datasets import ImageFolder

from mdistiller.dataset.shapes import SHAPE_CLASSES, ShapesDataset, make_shape_sample
from mdistiller.explain.agreement import map_agreement
from mdistiller.explain.metrics import perturbation_auc, segmentation_scores
from mdistiller.explain.perturbation import perturbation_hits, perturbation_test, pixel_order, remove_pixels
from mdistiller.explain.segmentation import GtSegsDataset
from mdistiller.launch.eval_common import write_shapes_gtsegs

# ---------------------------------------------------------------------------------------------------- AUC


def test_perturbation_auc_worked_example():
    acc = [0.80314, 0.70, 0.60, 0.50, 0.40, 0.30, 0.20, 0.12, 0.06, 0.02]
    assert perturbation_auc(acc) == pytest.approx(32.9157, abs=1e-9)
    assert perturbation_auc(np.ones(10)) == pytest.approx(90.0)
    assert perturbation_auc(torch.tensor(acc)) == pytest.approx(32.9157, abs=1e-6)


def test_perturbation_auc_includes_unperturbed_and_checks_length():
    acc = [0.5] * 10
    assert perturbation_auc([1.0] + acc[1:]) > perturbation_auc(acc)  # x = 0 is part of the area
    with pytest.raises(ValueError, match="expected 10"):
        perturbation_auc(acc[1:])


# ---------------------------------------------------------------------------------------------------- segmentation


def _vector_a():
    y, x = np.mgrid[0:224, 0:224].astype(np.float64)
    relevance = np.exp(-((y - 112) ** 2 + (x - 100) ** 2) / (2 * 40**2))
    mask = ((y - 112) ** 2 + (x - 112) ** 2 <= 60**2).astype(np.int64)
    return relevance, mask


def test_segmentation_vector_a():
    r, m = _vector_a()
    s = segmentation_scores(r[None], m[None])
    assert s["pixel_accuracy"] == pytest.approx(0.901347, abs=1e-6)
    assert (s["iou_bg"], s["iou_fg"]) == pytest.approx((0.872711, 0.695160), abs=1e-6)
    assert s["miou"] == pytest.approx(0.783935, abs=1e-6)
    assert s["map"] == pytest.approx(0.981692, abs=1e-6)
    assert s["f1"] == pytest.approx(0.820170, abs=1e-6)  # true per-image F1 (TE's row-averaged one gives 0.448884)


def test_segmentation_vector_a_transforms():
    r, m = _vector_a()
    base = segmentation_scores(r[None], m[None])
    affine = segmentation_scores(torch.from_numpy(3 * r + 5)[None], torch.from_numpy(m)[None])
    for k in ("pixel_accuracy", "miou", "map", "f1"):
        assert affine[k] == pytest.approx(base[k], abs=1e-9)
    sq = segmentation_scores((r**2)[None], m[None])  # monotone but not affine: the scores move
    assert sq["pixel_accuracy"] == pytest.approx(0.942283, abs=1e-6)
    assert sq["miou"] == pytest.approx(0.851496, abs=1e-6)
    assert sq["map"] == pytest.approx(0.962165, abs=1e-6)


def test_segmentation_accumulates_over_dataset():
    rng = np.random.default_rng(0)
    maps = rng.uniform(size=(3, 20, 20))
    masks = np.zeros((3, 20, 20), dtype=np.int64)
    masks[0, :2, :2] = 1
    masks[1, 5:15, 5:15] = 1
    masks[2, :, :10] = 1
    whole = segmentation_scores(maps, masks)
    single = [segmentation_scores(maps[i : i + 1], masks[i : i + 1]) for i in range(3)]
    assert whole["map"] == pytest.approx(np.mean([s["map"] for s in single]))  # mAP: mean over images
    assert whole["f1"] == pytest.approx(np.mean([s["f1"] for s in single]))
    assert whole["pixel_accuracy"] == pytest.approx(np.mean([s["pixel_accuracy"] for s in single]))  # equal sizes
    # mIoU uses dataset-summed intersections and unions, which differs from averaging per-image IoUs
    inter, union = np.zeros(2), np.zeros(2)
    for r, m in zip(maps, masks):
        rn = (r - r.min()) / (r.max() - r.min())
        pred = (rn > rn.mean()).astype(np.int64)
        for c in (0, 1):
            inter[c] += ((pred == c) & (m == c)).sum()
            union[c] += ((pred == c) | (m == c)).sum()
    assert whole["miou"] == pytest.approx((inter / union).mean(), abs=1e-12)
    assert abs(whole["miou"] - np.mean([s["miou"] for s in single])) > 1e-3


def test_segmentation_constant_map_and_bad_input():
    mask = np.zeros((1, 8, 8), dtype=np.int64)
    mask[0, :4] = 1
    s = segmentation_scores(np.full((1, 8, 8), 3.0), mask)  # TE: NaN map -> all background
    assert s["pixel_accuracy"] == pytest.approx(0.5) and s["iou_fg"] == 0.0 and s["f1"] == 0.0
    with pytest.raises(ValueError, match="must both be"):
        segmentation_scores(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))
    with pytest.raises(ValueError, match="mask values"):
        segmentation_scores(np.zeros((1, 8, 8)), np.full((1, 8, 8), 2))


def test_true_mask_beats_random_map_on_shapes():
    samples = [make_shape_sample(i, seed=3, size=32, num_classes=6) for i in range(12)]
    masks = np.stack([s[1] for s in samples]).astype(np.int64)
    rng = np.random.default_rng(0)
    smooth_true = masks + 0.01 * rng.normal(size=masks.shape)
    random = segmentation_scores(rng.uniform(size=masks.shape), masks)
    for maps in (masks.astype(np.float64), smooth_true):
        good = segmentation_scores(maps, masks)
        for k in ("pixel_accuracy", "miou", "map", "f1"):
            assert good[k] > random[k] + 0.2, k
    assert segmentation_scores(masks.astype(np.float64), masks)["miou"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------- perturbation


class _LinearEvidence(torch.nn.Module):
    """Class 0 wins while the weighted brightness of the evidence pixels stays above half of its unperturbed value."""

    def __init__(self, weight: torch.Tensor, threshold: float) -> None:
        super().__init__()
        self.weight, self.threshold = weight, threshold

    def forward(self, x):
        score = (x.mean(1) * self.weight).flatten(1).sum(1)
        logits = torch.stack([score, torch.full_like(score, self.threshold)], dim=1)
        return logits, {}


def _evidence_setup(n=32, size=16):
    gen = torch.Generator().manual_seed(0)
    weight = torch.rand(size, size, generator=gen) ** 4
    images = 0.5 + 0.5 * torch.rand(n, 3, size, size, generator=gen)
    model = _LinearEvidence(weight, threshold=float(0.75 * weight.sum() * 0.6))
    labels = torch.zeros(n, dtype=torch.long)
    return model, images, labels, weight.expand(n, size, size)


def _auc(model, images, labels, maps, negative):
    hits = perturbation_hits(model, images, labels, maps, lambda x: x, negative=negative)
    return perturbation_auc(hits.float().mean(1))


def test_remove_pixels_counts_and_order():
    images = torch.rand(2, 3, 10, 10) + 0.1
    maps = torch.rand(2, 10, 10)
    order = pixel_order(maps)
    out = remove_pixels(images, order, 0.3)
    black = (out == 0).all(1).flatten(1)
    assert black.sum(1).tolist() == [30, 30]
    top = maps.flatten(1).topk(30, dim=1).indices
    assert all(black[b, top[b]].all() for b in range(2))
    assert torch.equal(remove_pixels(images, order, 0.0), images)


def test_positive_vs_negative_and_true_vs_random():
    model, images, labels, true_maps = _evidence_setup()
    random_maps = torch.rand(true_maps.shape, generator=torch.Generator().manual_seed(1))
    pos_true, neg_true = _auc(model, images, labels, true_maps, False), _auc(model, images, labels, true_maps, True)
    pos_rand = _auc(model, images, labels, random_maps, False)
    assert pos_true < pos_rand - 10  # the true ordering destroys the evidence fastest
    assert neg_true > pos_true + 30
    # the negative test on m is exactly the positive test on -m
    for maps in (true_maps, random_maps):
        neg = perturbation_hits(model, images, labels, maps, lambda x: x, negative=True)
        pos_of_neg = perturbation_hits(model, images, labels, -maps, lambda x: x, negative=False)
        assert torch.equal(neg, pos_of_neg)


def test_perturbation_test_loader_and_cached_maps():
    model, images, labels, true_maps = _evidence_setup()
    loader = [(images[:16], labels[:16]), (images[16:], labels[16:])]
    calls = []

    def map_fn(x, classes):
        calls.append(classes)
        return true_maps[: x.shape[0], ::2, ::2]  # low resolution, upsampled inside

    res = perturbation_test(model, loader, map_fn, lambda x: x)
    assert res["num_images"] == 32 and len(calls) == 2
    assert res["auc"] == pytest.approx(perturbation_auc(res["accuracies"]))
    again = perturbation_test(model, loader, None, lambda x: x, maps=res["maps"])
    assert again["accuracies"] == res["accuracies"] and len(calls) == 2
    with pytest.raises(ValueError, match="target"):
        perturbation_test(model, loader, map_fn, lambda x: x, target="gt")


# ---------------------------------------------------------------------------------------------------- agreement


def test_map_agreement_controls():
    maps = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(0))
    same = map_agreement(maps, 5 * maps)
    assert torch.allclose(same["cosine"], torch.ones(4)) and torch.equal(same["iou"], torch.ones(4))
    opposite = map_agreement(maps, -maps)  # top 20 % of -m is the bottom 20 % of m
    assert torch.equal(opposite["iou"], torch.zeros(4)) and (opposite["cosine"] < 0).all()
    low = map_agreement(maps, maps[:, ::2, ::2])  # student resized to the teacher's resolution
    assert low["cosine"].shape == (4,) and (low["cosine"] > 0.5).all()
    with pytest.raises(ValueError, match="top"):
        map_agreement(maps, maps, top=0.0)


# ---------------------------------------------------------------------------------------------------- shapes data


def test_shapes_deterministic_balanced_and_masked():
    a, b = make_shape_sample(5, seed=7, size=32, num_classes=6), make_shape_sample(5, seed=7, size=32, num_classes=6)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], make_shape_sample(5, seed=8, size=32, num_classes=6)[0])
    ds = ShapesDataset(60, size=32, seed=0, num_classes=6)
    assert np.bincount(ds.targets).tolist() == [10] * 6 and ds.classes == list(SHAPE_CLASSES)
    fractions = [ds.sample(i)[1].mean() for i in range(60)]
    assert min(fractions) > 0.02 and max(fractions) < 0.6
    img, label = ds[7]
    assert img.size == (32, 32) and label == 1
    with pytest.raises(ValueError, match="num_classes"):
        make_shape_sample(0, num_classes=9)


def test_shapes_image_folder(tmp_path):
    export_image_folder(str(tmp_path), 8, size=24, num_classes=4)
    folder = ImageFolder(str(tmp_path))
    assert len(folder) == 8 and folder.classes == sorted(SHAPE_CLASSES[:4])
    img, label = folder[0]
    assert img.size == (24, 24) and folder.classes[label] in SHAPE_CLASSES


def test_gtsegs_layout_roundtrip(tmp_path):
    path = str(tmp_path / "gtsegs_shapes.mat")
    assert write_shapes_gtsegs(path, 4, size=32, seed=1) == 4
    with open(path, "rb") as fh:
        assert fh.read(10) == b"MATLAB 7.3"
    with h5py.File(path, "r") as f:  # read exactly as TE's data/Imagenet.py does
        img = np.array(f[f["/value/img"][2, 0]]).transpose(2, 1, 0)
        mask = np.array(f[f[f["/value/gt"][2, 0]][0, 0]]).transpose(1, 0)
    ref_img, ref_mask, _ = make_shape_sample(2, seed=1, size=32)
    assert np.array_equal(img, ref_img) and np.array_equal(mask, ref_mask)
    ds = GtSegsDataset(path, size=64)
    image, m = ds[2]
    assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
    assert m.shape == (64, 64) and m.sum() == 4 * ref_mask.sum()  # nearest x2 upsampling


def test_shapes_loaders_match_get_dataset_contract():
    train, val, num_data, num_classes = get_shapes_dataloaders(8, 4, num_train=16, num_val=8, size=32, num_classes=4)
    image, target, index = next(iter(train))
    assert image.shape == (8, 3, 32, 32) and index.shape == (8,) and (num_data, num_classes) == (16, 4)
    image, target = next(iter(val))
    assert image.shape == (4, 3, 32, 32) and target.tolist() == [0, 1, 2, 3]
    assert -3 < image.mean() < 3 and image.min() < 0  # normalised, not [0, 1]
