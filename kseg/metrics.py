"""Segmentation metrics for nuclei: pixel, object-level, AJI and Panoptic Quality.

All functions take two H x W integer label images, ``pred`` and ``gt``: 0 is background, every other
value one instance. Ids need not be consecutive. A binary mask is a label image with one instance.

Definitions (P = predicted foreground, G = ground-truth foreground; p_j, g_i instances):

* **Pixel F1 = Dice** ``2|P∩G| / (|P| + |G|)`` and **pixel IoU** (Jaccard) ``|P∩G| / |P∪G|``, per
  image. This is what the original Kidney-SegNet code reports as "F1" and "JI" (sklearn
  ``f1_score`` / ``jaccard_score`` on the flattened binary masks), and what its paper compares.
* **Object precision / recall / F1 at IoU 0.5**: a predicted and a true instance match when their
  IoU is > 0.5 (strictly, as HoVer-Net; StarDist's ``matching`` counts IoU >= 0.5). Because two
  instances of one image are disjoint, an instance can have IoU > 0.5 with at most one instance
  of the other image, so the matching is unique without an assignment step. TP = matches,
  FP = unmatched predictions, FN = unmatched truths; P = TP / (TP + FP), R = TP / (TP + FN),
  F1 = 2TP / (2TP + FP + FN).
* **Aggregated Jaccard Index** (Kumar et al., "A Dataset and a Technique for Generalized Nuclear
  Segmentation for Computational Pathology", IEEE TMI 36(7), 2017): for every true instance g_i
  take the prediction p_j with the largest IoU; add ``|g_i ∩ p_j|`` to C and ``|g_i ∪ p_j|`` to U.
  A prediction may serve several truths. Add the area of every prediction never chosen, and of every
  truth that overlaps no prediction, to U. AJI = C / U. As HoVer-Net's ``get_fast_aji`` (Graham
  et al., Medical Image Analysis 58, 2019), which ranks by ``inter / (union + 1e-6)``: of two
  predictions with exactly the same IoU the larger pair wins, then the lowest prediction id.
* **Panoptic Quality** (Kirillov et al., "Panoptic Segmentation", CVPR 2019; for nuclei as in
  HoVer-Net ``get_fast_pq`` with match IoU 0.5): DQ = TP / (TP + FP/2 + FN/2) (equal to the object
  F1 above), SQ = mean IoU of the matched pairs, PQ = DQ x SQ.

Empty images. Every score is 1.0 when both images are empty (nothing to find and nothing found is a
perfect answer, and averaging over tiles stays defined), and 0.0 when exactly one is empty. The
same rule settles each 0/0 ratio: precision with no predictions is 1.0 only if there are also no
truths, etc. The original code instead returned 0 for an empty pair (sklearn ``zero_division``);
:func:`original_pixel_scores` reproduces that for paper comparisons.

Speed. The pairwise intersection table is computed once from the pixels where both images are
foreground (``np.unique`` over combined pair keys, a sparse contingency table); nothing loops over
instances in Python, so thousands of nuclei per tile cost a few milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

MATCH_IOU = 0.5


@dataclass(frozen=True)
class _Overlap:
    """Sparse contingency table of two compact label images.

    Instances are renumbered 0..n-1 (background dropped). ``gi, pj, inter`` list every overlapping
    pair once; ``iou`` is their IoU.
    """

    gt_area: NDArray[np.int64]  # (n_gt,)
    pred_area: NDArray[np.int64]  # (n_pred,)
    gi: NDArray[np.int64]  # (n_pairs,)
    pj: NDArray[np.int64]  # (n_pairs,)
    inter: NDArray[np.int64]  # (n_pairs,)
    iou: NDArray[np.float64]  # (n_pairs,)


def _check(pred: NDArray, gt: NDArray) -> tuple[NDArray, NDArray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    for name, a in (("prediction", pred), ("ground truth", gt)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise ValueError(f"{name}: expected an integer label image, got dtype {a.dtype}")
        if a.size and a.min() < 0:
            raise ValueError(f"{name}: label values must be >= 0, got {a.min()}")
    return pred, gt


def _compact(labels: NDArray) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Maps ids to 1..n in increasing id order (0 stays 0); returns the map and per-id areas."""
    flat = labels.ravel().astype(np.int64, copy=False)
    top = int(flat.max(initial=0))
    if top <= 4 * flat.size + 1024:  # dense id range: O(pixels) lookup table
        counts = np.bincount(flat, minlength=top + 1)
        present = counts > 0
        present[0] = False
        lut = np.cumsum(present)
        lut[0] = 0
        return lut[flat], counts[1:][present[1:]]
    ids, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if ids[0] == 0:
        return inverse.astype(np.int64), counts[1:]
    return inverse.astype(np.int64) + 1, counts


def _overlap(pred: NDArray, gt: NDArray) -> _Overlap:
    p, pred_area = _compact(pred)
    g, gt_area = _compact(gt)
    both = (p > 0) & (g > 0)
    n_pred = len(pred_area)
    keys = (g[both] - 1) * n_pred + (p[both] - 1)  # one key per (gt, pred) pair
    pairs, inter = np.unique(keys, return_counts=True)
    gi, pj = np.divmod(pairs, max(n_pred, 1))
    union = gt_area[gi] + pred_area[pj] - inter
    return _Overlap(gt_area, pred_area, gi, pj, inter, inter / union)


def _ratio(num: float, den: float, both_empty: bool) -> float:
    if den > 0:
        return float(num / den)
    return 1.0 if both_empty else 0.0


def pixel_scores(pred: NDArray, gt: NDArray) -> tuple[float, float]:
    """Pixel F1 (= Dice) and pixel IoU of the foregrounds of one image.

    Returns:
        ``(f1, iou)``; (1.0, 1.0) if both foregrounds are empty.
    """
    pred, gt = _check(pred, gt)
    p, g = pred > 0, gt > 0
    inter = int(np.count_nonzero(p & g))
    sp, sg = int(np.count_nonzero(p)), int(np.count_nonzero(g))
    empty = sp == 0 and sg == 0
    return _ratio(2 * inter, sp + sg, empty), _ratio(inter, sp + sg - inter, empty)


def original_pixel_scores(
    preds: list[NDArray], gts: list[NDArray], batch_size: int
) -> tuple[float, float]:
    """Pixel F1 and IoU averaged as the original code does, for comparison with the paper.

    Per image: sklearn-style binary F1 / Jaccard with 0 for an empty pair (``zero_division=0``).
    Then the mean over each batch of ``batch_size`` images (in the given order) and the mean of the
    batch means, so a short last batch weighs more, as in the original evaluation loop.
    """
    if len(preds) != len(gts) or not preds:
        raise ValueError(
            f"need equally many (>0) predictions and truths, got {len(preds)}, {len(gts)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per = []
    for pr, gt in zip(preds, gts, strict=True):
        f1, iou = pixel_scores(pr, gt)
        empty = not np.any(np.asarray(pr) > 0) and not np.any(np.asarray(gt) > 0)
        per.append((0.0, 0.0) if empty else (f1, iou))
    arr = np.asarray(per)
    batches = [arr[i : i + batch_size].mean(axis=0) for i in range(0, len(arr), batch_size)]
    f1, iou = np.mean(batches, axis=0)
    return float(f1), float(iou)


def object_scores(pred: NDArray, gt: NDArray, iou_threshold: float = MATCH_IOU) -> dict[str, float]:
    """Object-level detection and Panoptic Quality at a match IoU (> ``iou_threshold``, >= 0.5).

    Returns:
        ``tp, fp, fn, object_precision, object_recall, object_f1, dq, sq, pq``.
    """
    if iou_threshold < 0.5:
        raise ValueError(f"iou_threshold must be >= 0.5 for a unique matching, got {iou_threshold}")
    pred, gt = _check(pred, gt)
    ov = _overlap(pred, gt)
    return _object_scores(ov, iou_threshold)


def _object_scores(ov: _Overlap, iou_threshold: float) -> dict[str, float]:
    matched = ov.iou > iou_threshold
    tp = int(np.count_nonzero(matched))
    fp, fn = len(ov.pred_area) - tp, len(ov.gt_area) - tp
    empty = len(ov.pred_area) == 0 and len(ov.gt_area) == 0
    dq = _ratio(tp, tp + 0.5 * fp + 0.5 * fn, empty)
    sq = _ratio(float(ov.iou[matched].sum()), tp, empty)
    return {
        "tp": float(tp),
        "fp": float(fp),
        "fn": float(fn),
        "object_precision": _ratio(tp, tp + fp, empty),
        "object_recall": _ratio(tp, tp + fn, empty),
        "object_f1": _ratio(2 * tp, 2 * tp + fp + fn, empty),
        "dq": dq,
        "sq": sq,
        "pq": dq * sq,
    }


def aggregated_jaccard_index(pred: NDArray, gt: NDArray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017), as HoVer-Net ``get_fast_aji``."""
    pred, gt = _check(pred, gt)
    return _aji(_overlap(pred, gt))


def _aji(ov: _Overlap) -> float:
    n_gt, n_pred = len(ov.gt_area), len(ov.pred_area)
    if n_gt == 0 and n_pred == 0:
        return 1.0
    # Best prediction per truth, ranked as HoVer-Net's get_fast_aji ranks it: by
    # inter / (union + 1e-6), which of two equal IoUs prefers the larger pair, then by lowest id.
    rank = ov.inter / (ov.gt_area[ov.gi] + ov.pred_area[ov.pj] - ov.inter + 1.0e-6)
    order = np.lexsort((ov.pj, -rank, ov.gi))
    gi, first = np.unique(ov.gi[order], return_index=True)
    best = order[first]  # one pair per truth that overlaps something
    inter = int(ov.inter[best].sum())
    union = int((ov.gt_area[gi] + ov.pred_area[ov.pj[best]] - ov.inter[best]).sum())
    unpaired_gt = np.ones(n_gt, bool)
    unpaired_gt[gi] = False
    unused_pred = np.ones(n_pred, bool)
    unused_pred[ov.pj[best]] = False
    union += int(ov.gt_area[unpaired_gt].sum()) + int(ov.pred_area[unused_pred].sum())
    return inter / union if union else 0.0


def segmentation_metrics(pred: NDArray, gt: NDArray) -> dict[str, float]:
    """All metrics of one image (the evaluate stage averages them over tiles).

    Args:
        pred: H x W predicted instance labels (0 = background).
        gt: H x W true instance labels.

    Returns:
        ``pixel_f1``, ``pixel_iou``, ``dice`` (= ``pixel_f1``), ``object_precision``,
        ``object_recall``, ``object_f1``, ``aji``, ``pq``, ``dq``, ``sq``, and the counts ``tp``,
        ``fp``, ``fn``, ``n_pred``, ``n_gt``.

    Raises:
        ValueError: for different shapes, non-integer or negative labels.
    """
    pred, gt = _check(pred, gt)
    f1, iou = pixel_scores(pred, gt)
    ov = _overlap(pred, gt)
    out = {"pixel_f1": f1, "pixel_iou": iou, "dice": f1}
    out.update(_object_scores(ov, MATCH_IOU))
    out["aji"] = _aji(ov)
    out["n_pred"] = float(len(ov.pred_area))
    out["n_gt"] = float(len(ov.gt_area))
    return out
