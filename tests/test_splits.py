"""Patient-level k-fold folds (kseg.data.splits.patient_folds, scikit-learn's GroupKFold)."""

from __future__ import annotations

import numpy as np
import pytest

from kseg.data.splits import patient_folds

# TNBC-like: 11 patients, 2 to 8 tiles each (50 tiles), tile id "<patient>_<n>".
COUNTS = {f"{p:02d}": n for p, n in enumerate([3, 8, 4, 5, 2, 6, 4, 3, 7, 5, 3], start=1)}
TILES = [f"{p}_{i}" for p, n in COUNTS.items() for i in range(1, n + 1)]
PATIENT = {t: t.split("_")[0] for t in TILES}


def _folds(tiles: list[str], n_folds: int, seed: int | None = None):
    return patient_folds(tiles, [PATIENT[t] for t in tiles], n_folds, seed=seed)


@pytest.mark.parametrize(("n_folds", "seed"), [(2, None), (5, None), (11, None), (3, 0), (5, 7)])
def test_folds_never_split_a_patient_and_test_every_tile_once(n_folds: int, seed: int | None):
    folds = _folds(TILES, n_folds, seed)
    assert len(folds) == n_folds
    tested = []
    for train, test in folds:
        assert test and train
        assert sorted(train + test) == sorted(TILES)  # a partition of the tiles
        assert not {PATIENT[t] for t in train} & {PATIENT[t] for t in test}  # no leakage
        assert test == [t for t in TILES if t in set(test)]  # input order kept
        tested += test
    assert sorted(tested) == sorted(TILES)  # each tile is tested exactly once
    if n_folds == len(COUNTS):  # leave one patient out
        assert sorted(len({PATIENT[t] for t in test}) for _, test in folds) == [1] * n_folds


def test_default_folds_are_balanced_by_tiles_and_independent_of_input_order():
    folds = _folds(TILES, 5)
    sizes = sorted(len(test) for _, test in folds)
    assert sum(sizes) == 50 and sizes[-1] - sizes[0] <= max(COUNTS.values())
    # GroupKFold's greedy fill, by hand: patients of 8, 7, 6, 5, 5 tiles open the folds, then each
    # next largest (4, 4, 3, 3, 3, 2) joins the lightest fold: 8+3, 7+3, 6+3+2, 5+4, 5+4.
    assert sizes == [9, 9, 10, 11, 11]
    shuffled = [TILES[i] for i in np.random.default_rng(0).permutation(len(TILES))]
    as_sets = {frozenset(test) for _, test in folds}
    assert {frozenset(test) for _, test in _folds(shuffled, 5)} == as_sets
    assert _folds(TILES, 5) == folds  # deterministic


def test_seeded_folds_are_reproducible_and_depend_on_the_seed():
    assert _folds(TILES, 4, seed=1) == _folds(TILES, 4, seed=1)
    by_seed = {tuple(tuple(test) for _, test in _folds(TILES, 4, seed=s)) for s in range(6)}
    assert len(by_seed) > 1
    for _, test in _folds(TILES, 4, seed=3):  # equal patient counts (11 into 4: 3, 3, 3, 2)
        assert len({PATIENT[t] for t in test}) in (2, 3)


def test_errors_name_the_numbers():
    three = [t for t in TILES if PATIENT[t] in ("01", "02", "03")]
    with pytest.raises(ValueError, match=r"5 folds need at least 5 patients.*15 tiles.*3 patient"):
        _folds(three, 5)
    with pytest.raises(ValueError, match="at least 2, got 1"):
        _folds(TILES, 1)
    with pytest.raises(ValueError, match="3 tile ids but 2 patients"):
        patient_folds(["a", "b", "c"], ["p", "q"], 2)
    with pytest.raises(ValueError, match=r"repeated tile id\(s\) \['a'\]"):
        patient_folds(["a", "a", "b"], ["p", "p", "q"], 2)
