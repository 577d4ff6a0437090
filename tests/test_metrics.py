"""Metrics: known answers, empty cases, and AJI / PQ against a plain loop implementation."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from sklearn.metrics import f1_score, jaccard_score

from kseg.metrics import (
    aggregated_jaccard_index,
    object_scores,
    original_pixel_scores,
    pixel_scores,
    segmentation_metrics,
)

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
# Independent, loop-based AJI and PQ following HoVer-Net's get_fast_aji / get_fast_pq
# ---------------------------------------------------------------------------------------------


def _remap(labels: np.ndarray) -> np.ndarray:
    out = np.zeros_like(labels)
    for new, old in enumerate(i for i in np.unique(labels) if i != 0):
        out[labels == old] = new + 1
    return out


def _pairwise(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_t, n_p = int(true.max()), int(pred.max())
    inter = np.zeros((n_t, n_p))
    union = np.zeros((n_t, n_p))
    for t in range(1, n_t + 1):
        t_mask = true == t
        for p in np.unique(pred[t_mask]):
            if p == 0:
                continue
            p_mask = pred == p
            inter[t - 1, p - 1] = np.sum(t_mask & p_mask)
            union[t - 1, p - 1] = np.sum(t_mask | p_mask)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return inter, union, iou


def loop_aji(true: np.ndarray, pred: np.ndarray) -> float:
    true, pred = _remap(true), _remap(pred)
    inter, union, iou = _pairwise(true, pred)
    c = u = 0.0
    used: set[int] = set()
    paired_true: set[int] = set()
    for t in range(iou.shape[0]):
        if iou.shape[1] == 0 or iou[t].max() <= 0:
            continue
        p = int(np.argmax(iou[t]))
        c, u = c + inter[t, p], u + union[t, p]
        used.add(p)
        paired_true.add(t)
    u += sum(np.sum(true == t + 1) for t in range(iou.shape[0]) if t not in paired_true)
    u += sum(np.sum(pred == p + 1) for p in range(iou.shape[1]) if p not in used)
    return c / u


def loop_pq(true: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    true, pred = _remap(true), _remap(pred)
    _, _, iou = _pairwise(true, pred)
    paired = [(t, p) for t in range(iou.shape[0]) for p in range(iou.shape[1]) if iou[t, p] > 0.5]
    tp = len(paired)
    fp, fn = iou.shape[1] - tp, iou.shape[0] - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = sum(iou[t, p] for t, p in paired) / tp if tp else 0.0
    return dq, sq, dq * sq


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
def test_aji_and_pq_match_loop_implementation(seed: int) -> None:
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

    m = segmentation_metrics(pred, gt)
    assert m["aji"] == pytest.approx(loop_aji(gt, pred), abs=1e-12)
    dq, sq, pq = loop_pq(gt, pred)
    assert (m["dq"], m["sq"], m["pq"]) == pytest.approx((dq, sq, pq), abs=1e-12)
    assert m["object_f1"] == pytest.approx(m["dq"])  # same matching, same formula
    assert 0 < m["pq"] < 1
    assert aggregated_jaccard_index(pred, gt) == m["aji"]


def test_many_nuclei_and_sparse_ids() -> None:
    """Thousands of instances with huge ids: same answer as with compact ids."""
    rng = np.random.default_rng(1)
    gt = random_instances(rng, (512, 512), 3000)
    pred = np.roll(gt, 1, axis=1)
    m = segmentation_metrics(pred, gt)
    sparse = np.where(pred > 0, pred.astype(np.int64) * 1_000_003, 0)
    assert segmentation_metrics(sparse, gt) == m
    assert m["n_gt"] > 1500
