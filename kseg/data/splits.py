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
"""

from __future__ import annotations

from collections.abc import Mapping

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
