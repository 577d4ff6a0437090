"""Patient-level train / validation / test splits: no patient ever has tiles in two splits.

Tiles of one patient share stain, scanner day and tissue, so a tile-level split leaks: a model is
then tested on near-copies of its training tiles. The original code had no split at all and picked
its best checkpoint on the test set; here the test patients are fixed up front and the validation
patients, which pick the best epoch, are drawn from the remaining (training) patients.

Policy (``params.split``, documented in docs/data.md):

- ``test_patients`` non-empty: exactly those patients are the test set, for any source.
- empty (the default): the source's default. TNBC uses the fixed ``tnbc_test_patients``, so its
  numbers are comparable across runs and seeds; every other source draws test patients with
  ``seed`` until their tiles come closest to ``test_fraction`` of all tiles.
- validation patients are drawn (with ``seed``) from the non-test patients until their tiles come
  closest to ``val_fraction`` of all tiles; at least one patient always stays in training.

:func:`patient_folds` gives patient-level k-fold cross-validation folds (scikit-learn's
``GroupKFold`` with patients as groups), for experiments that need more than one split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from kseg.config import SplitConfig

SPLITS = ("train", "val", "test")


def _draw(
    counts: Mapping[str, int], pool: list[str], target: float, rng: np.random.Generator, keep: int
) -> list[str]:
    """Patients from ``pool`` (shuffled) whose tile total comes closest to ``target``.

    A patient is taken when it moves the total closer to the target, so small patients can fill a
    gap that a large one would overshoot. ``keep`` patients of the pool are always left over.
    """
    if target <= 0 or len(pool) <= keep:
        return []
    order = [pool[i] for i in rng.permutation(len(pool))]
    chosen: list[str] = []
    total = 0
    for patient in order:
        if len(pool) - len(chosen) <= keep:
            break
        n = counts[patient]
        if not chosen or abs(total + n - target) < abs(total - target):
            chosen.append(patient)
            total += n
    return sorted(chosen)


def assign_patients(
    counts: Mapping[str, int], cfg: SplitConfig, source: str
) -> dict[str, list[str]]:
    """Assigns every patient to exactly one of train / val / test.

    Args:
        counts: Tiles per patient.
        cfg: The split parameters.
        source: ``data.source`` of the dataset (picks the default test patients).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` sorted patient ids.

    Raises:
        ValueError: an unknown test patient, or no patient left for training.
    """
    patients = sorted(counts)
    total = sum(counts.values())
    fixed = cfg.test_patients or (cfg.tnbc_test_patients if source == "tnbc" else ())
    if fixed:
        unknown = sorted(set(fixed) - set(patients))
        key = "split.test_patients" if cfg.test_patients else "split.tnbc_test_patients"
        if unknown:
            raise ValueError(f"{key}: unknown patient(s) {unknown}; the data has {patients}")
        test = sorted(set(fixed))
    else:
        rng = np.random.default_rng([cfg.seed, 0])
        test = _draw(counts, patients, cfg.test_fraction * total, rng, keep=1)
    rest = [p for p in patients if p not in test]
    if not rest:
        raise ValueError(f"no patient left for training: test takes all of {patients}")
    val = _draw(counts, rest, cfg.val_fraction * total, np.random.default_rng([cfg.seed, 1]), 1)
    train = [p for p in rest if p not in val]
    return {"train": train, "val": val, "test": test}


def split_tiles(
    tile_patients: Mapping[str, str], by_split: Mapping[str, list[str]]
) -> dict[str, object]:
    """The ``split.json`` content: tile ids per split and the patients of each split.

    Args:
        tile_patients: ``{tile_id: patient}`` in manifest order.
        by_split: Output of :func:`assign_patients`.
    """
    where = {p: s for s, ps in by_split.items() for p in ps}
    out: dict[str, object] = {
        s: [t for t, p in tile_patients.items() if where[p] == s] for s in SPLITS
    }
    out["patients"] = {s: list(by_split[s]) for s in SPLITS}
    return out


def patient_folds(
    tile_ids: Sequence[str], patients: Sequence[str], n_folds: int, seed: int | None = None
) -> list[tuple[list[str], list[str]]]:
    """Patient-level k-fold cross-validation: every patient is tested in exactly one fold.

    Built on ``sklearn.model_selection.GroupKFold`` with the patients as groups, so no patient
    has tiles on both sides of a fold, and every tile is tested exactly once over the folds.

    Args:
        tile_ids: Tile ids (unique), e.g. the manifest's ``tile_id`` column.
        patients: The patient of each tile, in the same order.
        n_folds: Number of folds, at least 2 and at most the number of patients.
        seed: None (default): folds balanced by tile count (GroupKFold puts the patient with the
            most tiles into the fold with the fewest so far); the same input always gives the same
            folds, whatever its order. An int: patients are shuffled with this seed and dealt
            into folds of (nearly) equal patient counts, so tile counts may differ between folds.

    Returns:
        ``n_folds`` pairs ``(train_ids, test_ids)``, each list in the input order.

    Raises:
        ValueError: lengths that differ, a repeated tile id, ``n_folds`` below 2, or fewer
            patients than folds (the message names both numbers).
    """
    from sklearn.model_selection import GroupKFold

    tiles, groups = list(tile_ids), [str(p) for p in patients]
    if len(tiles) != len(groups):
        raise ValueError(f"patient_folds: {len(tiles)} tile ids but {len(groups)} patients")
    repeated = sorted(t for t, n in Counter(tiles).items() if n > 1)
    if repeated:
        raise ValueError(f"patient_folds: repeated tile id(s) {repeated[:10]}")
    if n_folds < 2:
        raise ValueError(f"patient_folds: n_folds must be at least 2, got {n_folds}")
    n_patients = len(set(groups))
    if n_patients < n_folds:
        raise ValueError(
            f"patient_folds: {n_folds} folds need at least {n_folds} patients, but the "
            f"{len(tiles)} tiles come from {n_patients} patient(s) (n_folds = {n_patients} would "
            "leave one patient out per fold)"
        )
    if seed is None:
        kfold = GroupKFold(n_splits=n_folds)
    else:
        kfold = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = []
    for train_idx, test_idx in kfold.split(np.zeros(len(tiles)), groups=groups):
        folds.append(([tiles[i] for i in train_idx], [tiles[i] for i in test_idx]))
    return folds
