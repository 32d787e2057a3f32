"""Evaluation metrics and data: the test vectors of docs/evaluation.md, positive/negative controls, shapes data."""
import h5py
import numpy as np
import pytest
import torch
from generated_data import export_image_folder, get_shapes_dataloaders
from torchvision.datasets import ImageFolder

from mdistiller.dataset.shapes import SHAPE_CLASSES, ShapesDataset, make_shape_sample
from mdistiller.explain.agreement import map_agreement
from mdistiller.explain.metrics import (
    PERTURBATION_FRACTIONS,
    SegmentationMeter,
    bootstrap_interval,
    mean_interval,
    perturbation_auc,
    segmentation_scores,
)
from mdistiller.explain.perturbation import (
    TIES,
    image_seeds,
    perturbation_hits,
    perturbation_test,
    pixel_order,
    remove_pixels,
    removed_indices,
)
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


def test_segmentation_per_image_scores_and_intervals():
    rng = np.random.default_rng(1)
    maps = rng.uniform(size=(12, 16, 16))
    masks = (rng.uniform(size=(12, 16, 16)) < np.linspace(0.1, 0.6, 12)[:, None, None]).astype(np.int64)
    meter = SegmentationMeter()
    for r, m in zip(maps, masks):
        meter.update(r, m)
    scores, rows, u = meter.result(), meter.per_image(), meter.uncertainty(seed=3)
    assert all(v.shape == (12,) for v in rows.values())
    for k in ("map", "f1"):  # means over images: the aggregate is the mean of the rows, normal interval
        assert scores[k] == pytest.approx(rows[k].mean())
        assert u[k]["interval"].startswith("normal") and u[k]["std"] == pytest.approx(np.std(rows[k], ddof=1))
    one = [segmentation_scores(maps[i : i + 1], masks[i : i + 1]) for i in range(12)]
    assert rows["miou"] == pytest.approx([o["miou"] for o in one])
    for k in ("pixel_accuracy", "miou", "iou_fg"):  # accumulated over the data set: seeded bootstrap
        low, high = u[k]["ci95"]
        assert u[k]["interval"].startswith("bootstrap") and low <= scores[k] <= high and high - low > 0
    assert meter.uncertainty(seed=3) == u and meter.uncertainty(seed=4)["miou"] != u["miou"]
    assert bootstrap_interval(lambda c: c.sum(1), 1) is None
    single = mean_interval([0.5])
    assert single["mean"] == 0.5 and single["std"] is None and single["ci95"] is None


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
    # the negative test on m is exactly the positive test on -m, in every tie mode (also on plateaus)
    plateau = _plateau_maps(b=images.shape[0])
    for maps in (true_maps, random_maps, plateau):
        for ties in TIES:
            neg = perturbation_hits(model, images, labels, maps, lambda x: x, negative=True, ties=ties)
            pos_of_neg = perturbation_hits(model, images, labels, -maps, lambda x: x, negative=False, ties=ties)
            assert torch.equal(neg, pos_of_neg), ties


def test_perturbation_test_per_image_records():
    model, images, labels, true_maps = _evidence_setup()
    loader = [(images[:16], labels[:16]), (images[16:], labels[16:])]
    calls = []

    def map_fn(x, classes):
        calls.append(classes)
        return true_maps[: x.shape[0], ::2, ::2]  # low resolution, upsampled inside

    res = perturbation_test(model, loader, map_fn, lambda x: x)
    assert res["num_images"] == 32 and len(calls) == 2
    assert res["auc"] == pytest.approx(perturbation_auc(res["accuracies"]))
    rows = res["per_image"]
    assert rows["hits"].shape == (32, 10) and rows["index"].tolist() == list(range(32))
    assert np.allclose(rows["hits"].mean(0), res["accuracies"])  # aggregates are the means of the rows
    assert rows["auc"].mean() == pytest.approx(res["auc"])  # the area is linear: mean of per-image AUCs
    assert res["clean_accuracy"] == res["accuracies"][0] == float((rows["pred"] == rows["label"]).mean())
    u = res["uncertainty"]["auc"]
    assert u["std"] == pytest.approx(np.std(rows["auc"], ddof=1))
    assert u["ci95"] == pytest.approx([res["auc"] - 1.96 * u["std"] / np.sqrt(32),
                                       res["auc"] + 1.96 * u["std"] / np.sqrt(32)], abs=1e-3)
    with pytest.raises(ValueError, match="target"):
        perturbation_test(model, loader, map_fn, lambda x: x, target="gt")
    with pytest.raises(ValueError, match="ties"):
        perturbation_test(model, loader, map_fn, lambda x: x, ties="stable")


# ---------------------------------------------------------------------------------------------------- ties


def _plateau_maps(b=3, size=16, distinct=20, seed=0):
    """ReLU'd-CAM-like maps: `distinct` pixels with distinct positive values, the rest a zero plateau."""
    gen = torch.Generator().manual_seed(seed)
    maps = torch.zeros(b, size * size)
    for i in range(b):
        where = torch.randperm(size * size, generator=gen)[:distinct]
        maps[i, where] = torch.rand(distinct, generator=gen) + 0.1
    return maps.view(b, size, size)


def _reference_hits(model, images, labels, maps, negative):
    """The reference's loop (docs/evaluation.md): vis = -vis for the negative test, torch.topk per step, zeroing."""
    vis = (-maps if negative else maps).reshape(images.shape[0], -1)
    hits = []
    for p in PERTURBATION_FRACTIONS:
        _, idx = torch.topk(vis, int(images.shape[-1] * images.shape[-2] * p), dim=-1)
        data = images.clone().reshape(images.shape[0], images.shape[1], -1)
        data = data.scatter_(-1, idx.unsqueeze(1).repeat(1, images.shape[1], 1), 0).reshape(images.shape)
        hits.append(model(data)[0].argmax(1) == labels)
    return torch.stack(hits)


def test_tie_modes_differ_only_on_the_plateau():
    maps = _plateau_maps()
    flat = maps.reshape(3, -1)
    k = int(256 * 0.3)  # 76: the 20 distinct pixels, then 56 from the plateau
    sets = {t: removed_indices(maps, 0.3, ties=t) for t in TIES}
    for t, idx in sets.items():
        assert idx.shape == (3, k)
        assert (flat.gather(1, idx[:, :20]) > 0).all(), t  # every mode removes the relevant pixels first
        assert (flat.gather(1, idx[:, 20:]) == 0).all(), t
    raster_plateau = sets["raster"][:, 20:]
    assert (raster_plateau.diff(dim=1) > 0).all()  # raster: the plateau in pixel-index order (top rows first)
    for t in ("random", "topk"):
        for b in range(3):
            assert set(sets[t][b, 20:].tolist()) != set(raster_plateau[b].tolist()), t
    # with no ties the three modes remove the same sets
    distinct = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(5))
    for p in PERTURBATION_FRACTIONS:
        ref = set(map(tuple, removed_indices(distinct, p, ties="raster").sort(1).values.tolist()))
        for t in ("random", "topk"):
            assert set(map(tuple, removed_indices(distinct, p, ties=t).sort(1).values.tolist())) == ref


def test_topk_ties_are_the_references_call():
    maps = _plateau_maps(b=4)
    for negative in (False, True):
        vis = (-maps if negative else maps).reshape(4, -1)
        for p in PERTURBATION_FRACTIONS:
            expected = torch.topk(vis, int(256 * p), dim=-1).indices
            assert torch.equal(removed_indices(maps, p, negative, ties="topk"), expected)
    model, images, labels, _ = _evidence_setup(n=4, size=16)
    for negative in (False, True):
        ours = perturbation_hits(model, images, labels, maps, lambda x: x, negative=negative, ties="topk")
        assert torch.equal(ours, _reference_hits(model, images, labels, maps, negative))


def test_random_ties_are_seeded_per_image_and_unbiased():
    maps = _plateau_maps(b=4)
    a = pixel_order(maps, ties="random", seeds=[7, 8, 9, 10])
    assert torch.equal(a, pixel_order(maps, ties="random", seeds=[7, 8, 9, 10]))  # reproducible
    assert not torch.equal(a, pixel_order(maps, ties="random", seeds=[1, 2, 3, 4]))
    assert torch.equal(a[2:], pixel_order(maps[2:], ties="random", seeds=[9, 10]))  # independent of the batch
    by_run_seed = [pixel_order(maps, ties="random", seeds=image_seeds(s, range(4))) for s in (0, 1)]
    assert (by_run_seed[0] != by_run_seed[1]).any(1).all()  # the run's seed changes every image's tie order
    assert torch.equal(a.sort(1).values, torch.arange(256).expand(4, 256))  # a permutation
    assert (maps.reshape(4, -1).gather(1, a)[:, :20] > 0).all()  # ranking kept, only ties shuffled
    # a map that is one plateau: random removes uniformly over the image, raster from the top rows down
    flat_maps = torch.zeros(64, 32, 32)
    seeds = image_seeds(0, range(64))
    rows = {t: (removed_indices(flat_maps, 0.1, ties=t, seeds=seeds) // 32).float() for t in ("random", "raster")}
    assert abs(rows["random"].mean().item() - 15.5) < 1.0
    assert rows["raster"].max().item() <= 3
    assert rows["random"].min().item() == 0 and rows["random"].max().item() == 31


def test_random_ties_do_not_depend_on_the_batch_size():
    model, images, labels, _ = _evidence_setup(n=12, size=16)
    maps = _plateau_maps(b=12, distinct=60)

    def run(bs, seed=0):
        loader = [(images[i : i + bs], labels[i : i + bs]) for i in range(0, 12, bs)]
        starts = iter(range(0, 12, bs))
        return perturbation_test(model, loader, lambda x, c: maps[next(starts):][: x.shape[0]], lambda x: x,
                                 seed=seed)["per_image"]["hits"]

    assert np.array_equal(run(3), run(12))  # the tie order depends on (seed, image index), not on the batch


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
