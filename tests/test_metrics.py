"""Metrics: known answers, empty cases, and AJI / PQ against HoVer-Net's (real TNBC nuclei too)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi
from sklearn.metrics import f1_score, jaccard_score

from kseg.metrics import (
    aggregated_jaccard_index,
    object_scores,
    original_pixel_scores,
    pixel_scores,
    segmentation_metrics,
)
from tests.hovernet_reference import get_fast_aji, get_fast_pq, remap_label

KEYS = (
    "pixel_f1",
    "pixel_iou",
    "dice",
    "object_precision",
    "object_recall",
    "object_f1",
    "aji",
    "pq",
    "dq",
    "sq",
)


def disk(shape: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def lens_iou(r: float, d: float) -> float:
    """IoU of two disks of radius r whose centres are d apart (circle-circle intersection)."""
    inter = 2 * r * r * math.acos(d / (2 * r)) - d / 2 * math.sqrt(4 * r * r - d * d)
    return inter / (2 * math.pi * r * r - inter)


@pytest.mark.parametrize("shift", [10.0, 30.0, 48.0, 70.0])
def test_shifted_disks_of_known_overlap(shift: float) -> None:
    r = 60.0
    gt = disk((200, 320), 100, 100, r).astype(np.int32)
    pred = disk((200, 320), 100 + shift, 100, r).astype(np.int32) * 7  # any id
    iou = lens_iou(r, shift)
    m = segmentation_metrics(pred, gt)
    assert m["pixel_iou"] == pytest.approx(iou, abs=0.005)
    assert m["pixel_f1"] == pytest.approx(2 * iou / (1 + iou), abs=0.005)
    assert m["aji"] == pytest.approx(iou, abs=0.005)  # one pair: AJI is its IoU
    matched = iou > 0.5  # shift 30 -> 0.53, shift 48 -> 0.38
    assert m["tp"] == float(matched)
    assert m["object_f1"] == m["dq"] == float(matched)
    assert m["sq"] == pytest.approx(iou if matched else 0.0, abs=0.005)
    assert m["pq"] == pytest.approx(iou if matched else 0.0, abs=0.005)


def test_shifted_squares_exact() -> None:
    gt = np.zeros((40, 60), np.int32)
    pred = np.zeros_like(gt)
    gt[10:30, 10:30] = 3
    pred[10:30, 15:35] = 1  # 20x20 shifted by 5: overlap 300, union 500
    m = segmentation_metrics(pred, gt)
    assert m["pixel_f1"] == m["dice"] == 0.75
    assert m["pixel_iou"] == m["aji"] == m["sq"] == m["pq"] == 0.6
    assert m["object_precision"] == m["object_recall"] == m["object_f1"] == m["dq"] == 1.0


def test_split_nucleus() -> None:
    gt = np.zeros((40, 40), np.int32)
    gt[10:30, 10:30] = 1
    halves = np.zeros_like(gt)
    halves[10:30, 10:20], halves[10:30, 20:30] = 1, 2  # IoU 0.5 each: not > 0.5, no match
    m = segmentation_metrics(halves, gt)
    assert m["pixel_f1"] == 1.0
    assert (m["tp"], m["fp"], m["fn"]) == (0.0, 2.0, 1.0)
    assert m["object_f1"] == m["pq"] == 0.0
    assert m["aji"] == pytest.approx(200 / 600)  # tie -> lower id; the other half adds to U

    uneven = np.zeros_like(gt)
    uneven[10:30, 10:22], uneven[10:30, 22:30] = 1, 2  # IoU 0.6 and 0.4
    m = segmentation_metrics(uneven, gt)
    assert (m["tp"], m["fp"], m["fn"]) == (1.0, 1.0, 0.0)
    assert (m["object_precision"], m["object_recall"]) == (0.5, 1.0)
    assert m["object_f1"] == m["dq"] == pytest.approx(2 / 3)
    assert m["sq"] == pytest.approx(0.6)
    assert m["pq"] == pytest.approx(0.4)
    assert m["aji"] == pytest.approx(240 / 560)


def test_merged_nuclei() -> None:
    gt = np.zeros((40, 40), np.int32)
    gt[10:30, 10:20], gt[10:30, 20:30] = 1, 2
    merged = (gt > 0).astype(np.int32)
    m = segmentation_metrics(merged, gt)
    assert m["pixel_iou"] == 1.0
    assert (m["tp"], m["fp"], m["fn"]) == (0.0, 1.0, 2.0)
    assert m["pq"] == 0.0
    assert m["aji"] == 0.5  # the merged prediction is counted for both truths (Kumar's definition)


def test_empty_cases() -> None:
    empty = np.zeros((16, 16), np.int32)
    one = empty.copy()
    one[4:9, 4:9] = 5
    both = segmentation_metrics(empty, empty)
    assert all(both[k] == 1.0 for k in KEYS)
    for pred, gt in ((empty, one), (one, empty)):
        m = segmentation_metrics(pred, gt)
        assert all(m[k] == 0.0 for k in KEYS), m
        assert not any(math.isnan(v) for v in m.values())
    assert segmentation_metrics(empty, one)["fn"] == 1.0
    assert segmentation_metrics(one, empty)["fp"] == 1.0


def test_pixel_scores_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        pred = rng.integers(0, 4, (30, 30)) * (rng.random((30, 30)) < 0.4)
        gt = rng.integers(0, 3, (30, 30)) * (rng.random((30, 30)) < 0.5)
        f1, iou = pixel_scores(pred, gt)
        assert f1 == pytest.approx(f1_score(gt.ravel() > 0, pred.ravel() > 0))
        assert iou == pytest.approx(jaccard_score(gt.ravel() > 0, pred.ravel() > 0))


def test_original_averaging_is_mean_of_batch_means() -> None:
    full = np.ones((4, 4), np.int32)
    half = np.zeros((4, 4), np.int32)
    half[:2] = 1
    empty = np.zeros((4, 4), np.int32)
    # Per image F1: 1, 2/3, 0 (empty pair counts 0 as in sklearn), 1, 1 ; batches of 2.
    preds, gts = [full, half, empty, full, full], [full, full, empty, full, full]
    f1, iou = original_pixel_scores(preds, gts, batch_size=2)
    assert f1 == pytest.approx(((1 + 2 / 3) / 2 + (0 + 1) / 2 + 1) / 3)
    assert iou == pytest.approx(((1 + 0.5) / 2 + 0.5 + 1) / 3)
    with pytest.raises(ValueError, match="batch_size"):
        original_pixel_scores(preds, gts, batch_size=0)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(ValueError, match="integer"):
        segmentation_metrics(np.zeros((3, 3), float), np.zeros((3, 3), int))
    with pytest.raises(ValueError, match=">= 0"):
        segmentation_metrics(-np.ones((3, 3), int), np.zeros((3, 3), int))
    with pytest.raises(ValueError, match=r"0\.5"):
        object_scores(np.zeros((3, 3), int), np.zeros((3, 3), int), iou_threshold=0.3)


# ---------------------------------------------------------------------------------------------
# Against HoVer-Net's get_fast_aji / get_fast_pq (tests/hovernet_reference.py)
# ---------------------------------------------------------------------------------------------


def assert_as_hovernet(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """kseg's AJI, DQ, SQ, PQ and TP / FP / FN equal HoVer-Net's on remapped ids."""
    m = segmentation_metrics(pred, gt)
    true, guess = remap_label(gt), remap_label(pred)
    assert m["aji"] == pytest.approx(get_fast_aji(true, guess), abs=1e-12)
    (dq, sq, pq), (paired_true, _, unpaired_true, unpaired_pred) = get_fast_pq(true, guess)
    tp = len(paired_true)
    assert (m["tp"], m["fp"], m["fn"]) == (tp, len(unpaired_pred), len(unpaired_true))
    assert m["dq"] == pytest.approx(dq, abs=1e-12)
    # HoVer-Net divides the IoU sum by TP + 1e-6; with that undone, SQ and PQ agree to rounding.
    exact = (tp + 1.0e-6) / tp if tp else 1.0
    assert m["sq"] == pytest.approx(sq * exact, abs=1e-12)
    assert m["pq"] == pytest.approx(pq * exact, abs=1e-12)
    return m


def random_instances(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """Random ellipses painted in order (later ones cover earlier), random sparse ids."""
    labels = np.zeros(shape, np.int32)
    ids = rng.choice(np.arange(1, 10 * n), size=n, replace=False)
    for i in ids:
        center = (int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0])))
        axes = (int(rng.integers(2, 9)), int(rng.integers(2, 9)))
        cv2.ellipse(labels, center, axes, float(rng.uniform(0, 180)), 0, 360, int(i), -1)
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_aji_and_pq_match_hovernet_on_random_labels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gt = random_instances(rng, (96, 128), 40)
    # Prediction: the truth shifted by a pixel or two, with dropped, merged and extra objects.
    pred = np.roll(gt, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
    ids = np.unique(pred)[1:]
    pred[np.isin(pred, rng.choice(ids, 4, replace=False))] = 0
    a, b = rng.choice(np.unique(pred)[1:], 2, replace=False)
    pred[pred == a] = b
    extra = random_instances(rng, pred.shape, 8) + 1000
    pred = np.where((pred == 0) & (extra > 1000), extra, pred)

    m = assert_as_hovernet(pred, gt)
    assert m["object_f1"] == pytest.approx(m["dq"])  # same matching, same formula
    assert 0 < m["pq"] < 1
    assert aggregated_jaccard_index(pred, gt) == m["aji"]


def _erode(labels: np.ndarray, steps: int) -> np.ndarray:
    """Each nucleus loses its outer ring of pixels ``steps`` times (touching ones separate)."""
    for _ in range(steps):
        labels = labels * (ndi.minimum_filter(labels, 3) == ndi.maximum_filter(labels, 3))
    return labels


def _dilate(labels: np.ndarray, steps: int) -> np.ndarray:
    """Each nucleus grows into the background ``steps`` times (the larger id wins a contact)."""
    for _ in range(steps):
        labels = np.where(labels == 0, ndi.maximum_filter(labels, 3), labels)
    return labels


def _split(labels: np.ndarray, rng: np.random.Generator, share: float) -> np.ndarray:
    """About ``share`` of the nuclei cut in two at the centroid column (new ids on the right)."""
    out = labels.astype(np.int64)
    top = int(out.max())
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None or rng.random() > share:
            continue
        inst = labels[sl] == i
        right = inst & (np.arange(inst.shape[1])[None, :] > np.nonzero(inst)[1].mean())
        top += 1
        out[sl][right] = top
    return out


def _merge(labels: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` nuclei given the id of their nearest neighbour (centroids): under-segmentation."""
    ids = np.unique(labels)[1:]
    centres = np.array(ndi.center_of_mass(np.ones(labels.shape), labels, ids))
    out = labels.copy()
    for k in rng.choice(len(ids), n, replace=False):
        dist = np.hypot(*(centres - centres[k]).T)
        dist[k] = np.inf
        out[labels == ids[k]] = ids[int(np.argmin(dist))]
    return out


@pytest.fixture(scope="module")
def tnbc_truths(tnbc_dir) -> list[np.ndarray]:
    """Instance labels of one TNBC tile of each of 4 patients (8-connected components of GT)."""
    from PIL import Image

    from kseg.data.prepare import to_labels

    out = []
    for name in ("01/01_1", "04/04_1", "07/07_3", "10/10_1"):  # 69 to 297 nuclei
        patient, tile = name.split("/")
        path = tnbc_dir / f"GT_{patient}" / f"{tile}.png"
        if not path.is_file():
            pytest.skip(f"{path} not found")
        with Image.open(path) as img:
            out.append(to_labels(np.asarray(img))[0])
    return out


def test_aji_and_pq_match_hovernet_on_perturbed_tnbc_truth(tnbc_truths: list) -> None:
    """Real nuclei against the errors a segmenter makes: too small, too big, split, merged."""
    rng = np.random.default_rng(0)
    for gt in tnbc_truths:
        assert gt.max() > 20
        cases = {
            "eroded": _erode(gt, 2),
            "dilated": _dilate(gt, 3),
            "split": _split(gt, rng, 0.4),
            "merged": _merge(gt, rng, 8),
            "shifted": np.roll(gt, (2, -3), axis=(0, 1)),
            "everything": _split(_merge(_dilate(_erode(gt, 1), 2), rng, 5), rng, 0.2),
        }
        scores = {name: assert_as_hovernet(pred, gt) for name, pred in cases.items()}
        assert assert_as_hovernet(gt, gt)["aji"] == 1.0
        # Each error lowers the scores, and the matching sees it: splits and merges add FP / FN.
        assert all(m["aji"] < 1 and m["pq"] < 1 for m in scores.values())
        assert scores["split"]["fp"] > 0 and scores["merged"]["fn"] > 0


def test_iou_exactly_one_half_is_not_a_match() -> None:
    """The convention, pinned: kseg and HoVer-Net match at IoU > 0.5, StarDist at IoU >= 0.5.

    A 30 x 30 nucleus and a prediction shifted by 10 px: intersection 600, union 1200, IoU 0.5
    exactly (pixel grids hit it; a nucleus split into equal halves is another case). No match:
    TP 0, PQ 0 (StarDist would report TP 1, PQ 0.5). Shifted by 9 px: IoU 630 / 1170 > 0.5, a match.
    """
    gt = np.zeros((50, 60), np.int32)
    gt[10:40, 10:40] = 1
    half = np.roll(gt, 10, axis=1) * 4
    m = assert_as_hovernet(half, gt)
    assert (m["tp"], m["fp"], m["fn"], m["pq"]) == (0.0, 1.0, 1.0, 0.0)
    assert m["aji"] == 0.5  # AJI has no threshold
    assert object_scores(half, gt)["tp"] == 0.0
    above = assert_as_hovernet(np.roll(gt, 9, axis=1), gt)
    assert above["tp"] == 1.0 and above["pq"] == pytest.approx(630 / 1170)


def test_aji_tie_goes_to_the_larger_pair_as_hovernet() -> None:
    """Two predictions with the same IoU 0.2 with a truth of 200 px: HoVer-Net's
    inter / (union + 1e-6) prefers the larger pair (inter 100, union 500) over the lower id
    (inter 50, union 250). AJI = 100 / (500 + 100), not 50 / (250 + 400)."""
    gt = np.zeros((40, 60), np.int32)
    gt[5:15, 5:25] = 1
    pred = np.zeros_like(gt)
    pred[5:15, 5:10], pred[15:20, 5:15] = 1, 1  # 50 px inside the truth, 50 outside
    pred[5:15, 15:25], pred[20:35, 5:25] = 2, 2  # 100 px inside, 300 outside
    m = assert_as_hovernet(pred, gt)
    assert m["aji"] == pytest.approx(100 / 600)


def test_many_nuclei_and_sparse_ids() -> None:
    """Thousands of instances with huge ids: same answer as with compact ids."""
    rng = np.random.default_rng(1)
    gt = random_instances(rng, (512, 512), 3000)
    pred = np.roll(gt, 1, axis=1)
    m = segmentation_metrics(pred, gt)
    sparse = np.where(pred > 0, pred.astype(np.int64) * 1_000_003, 0)
    assert segmentation_metrics(sparse, gt) == m
    assert m["n_gt"] > 1500
