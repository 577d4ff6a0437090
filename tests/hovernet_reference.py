"""HoVer-Net's AJI and PQ, step for step, as the oracle for kseg.metrics.

Reference: ``get_fast_aji``, ``get_fast_pq`` and ``remap_label`` in ``metrics/stats_utils.py`` of
HoVer-Net (Graham et al., Medical Image Analysis 58, 2019; MIT licence),
https://github.com/vqdang/hover_net/blob/master/metrics/stats_utils.py

This is a re-implementation written for these tests, not a copy of that file (this workplace keeps
third-party code out of the repository). It keeps every choice of the published functions that can
change a number, so that kseg is held to HoVer-Net's conventions and not to a reading of the papers:

* ids must be contiguous (``remap_label`` first); instance masks are compared pixel by pixel, one
  truth at a time, with the predictions that overlap it (no shared code with kseg's sparse table);
* AJI: the pairwise IoU is ``inter / (union + 1e-6)`` and each truth takes the ``argmax`` over the
  predictions (the first of equal values, i.e. the lowest id). The 1e-6 breaks an exact IoU tie in
  favour of the pair with the larger union. Truths whose best IoU is 0 stay unpaired; the union
  gets the area of every unpaired truth and of every prediction that no truth took;
* PQ at ``match_iou`` >= 0.5: a pair matches when its IoU (``inter / union``) is **> match_iou**,
  strictly, so IoU exactly 0.5 is no match (StarDist's ``matching`` uses ``>=``);
  DQ = TP / (TP + FP/2 + FN/2), SQ = sum of matched IoUs / (TP + 1e-6), PQ = DQ x SQ.

The names, arguments and return values are those of the published functions, so a verbatim copy of
them can replace this file. Like those, both images empty is not defined here (0 / 0).
"""

from __future__ import annotations

import numpy as np


def remap_label(pred: np.ndarray) -> np.ndarray:
    """Ids renumbered 1..n in increasing order of the old id (0 stays background)."""
    out = np.zeros(pred.shape, np.int32)
    for new, old in enumerate(v for v in np.unique(pred) if v != 0):
        out[pred == old] = new + 1
    return out


def _pairwise(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intersections and unions of every (truth, prediction) pair that overlaps (float64)."""
    n_true, n_pred = len(np.unique(true)) - 1, len(np.unique(pred)) - 1
    inter = np.zeros((max(n_true, 0), max(n_pred, 0)), np.float64)
    union = np.zeros_like(inter)
    for t in range(1, n_true + 1):
        t_mask = true == t
        for p in np.unique(pred[t_mask]):
            if p == 0:
                continue
            p_mask = pred == p
            both = int(np.count_nonzero(t_mask & p_mask))
            inter[t - 1, p - 1] = both
            union[t - 1, p - 1] = (
                int(np.count_nonzero(t_mask)) + int(np.count_nonzero(p_mask)) - both
            )
    return inter, union


def get_fast_aji(true: np.ndarray, pred: np.ndarray) -> float:
    """AJI of contiguous label images (MoNuSeg's definition, as HoVer-Net computes it)."""
    inter, union = _pairwise(true, pred)
    n_true, n_pred = inter.shape
    iou = inter / (union + 1.0e-6)
    best = np.argmax(iou, axis=1) if n_pred else np.zeros(n_true, np.int64)
    best_iou = iou[np.arange(n_true), best] if n_pred else np.zeros(n_true)
    paired_true = np.nonzero(best_iou > 0.0)[0]
    paired_pred = best[paired_true]
    overall_inter = float(inter[paired_true, paired_pred].sum())
    overall_union = float(union[paired_true, paired_pred].sum())
    for t in range(n_true):
        if t not in set(paired_true.tolist()):
            overall_union += int(np.count_nonzero(true == t + 1))
    for p in range(n_pred):
        if p not in set(paired_pred.tolist()):
            overall_union += int(np.count_nonzero(pred == p + 1))
    return overall_inter / overall_union


def get_fast_pq(
    true: np.ndarray, pred: np.ndarray, match_iou: float = 0.5
) -> tuple[list[float], list[list[int]]]:
    """``[dq, sq, pq]`` and ``[paired_true, paired_pred, unpaired_true, unpaired_pred]`` (ids)."""
    if match_iou < 0.5:
        raise NotImplementedError("only the unique matching (match_iou >= 0.5) is reproduced")
    inter, union = _pairwise(true, pred)
    n_true, n_pred = inter.shape
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    paired_t, paired_p = np.nonzero(iou > match_iou)
    paired_iou = iou[paired_t, paired_p]
    paired_true = [int(t) + 1 for t in paired_t]
    paired_pred = [int(p) + 1 for p in paired_p]
    unpaired_true = [t for t in range(1, n_true + 1) if t not in paired_true]
    unpaired_pred = [p for p in range(1, n_pred + 1) if p not in paired_pred]
    tp, fp, fn = len(paired_true), len(unpaired_pred), len(unpaired_true)
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(paired_iou.sum()) / (tp + 1.0e-6)
    return [dq, sq, dq * sq], [paired_true, paired_pred, unpaired_true, unpaired_pred]
