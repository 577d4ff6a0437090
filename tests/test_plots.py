"""Charts (kseg.plots): matplotlib off-screen, the learning curve's content, atomic PNG writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kseg.plots import figure, line_chart, line_chart_figure, overlay, save_figure

REPO = Path(__file__).resolve().parents[1]
HISTORY = {
    "train_loss": [1.2, 0.9, 0.7, 0.6],
    "val_loss": [1.3, 1.0, float("nan"), 0.8],  # an epoch without validation: a gap
    "aji": [0.20, 0.35, 0.41, 0.44],
    "pq": [0.15, 0.30, 0.37, 0.40],
}


def _not_blank(img: np.ndarray) -> None:
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    white = (img == 255).all(axis=2)
    assert 0.01 < 1 - white.mean() < 0.6  # lines, text and axes, on a mostly white page
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20  # colours and anti-aliasing


@pytest.mark.parametrize("size", [(640, 400), (329, 201)])
def test_line_chart_has_the_requested_size_and_is_drawn(size: tuple[int, int]) -> None:
    img = line_chart(HISTORY, title="learning curve", size=size)
    assert img.shape == (size[1], size[0], 3)
    _not_blank(img)
    # matplotlib's first two cycle colours (C0 #1f77b4, C1 #ff7f0e) are on the picture.
    for rgb in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(img.astype(int) - rgb).sum(axis=2) < 30).sum() > 50, rgb


def test_line_chart_changes_with_the_data() -> None:
    short = {k: v[:3] for k, v in HISTORY.items()}
    assert not np.array_equal(line_chart(short), line_chart(HISTORY))  # 3 vs 4 epochs
    assert np.array_equal(line_chart(HISTORY), line_chart(HISTORY))  # deterministic
    assert not np.array_equal(line_chart(HISTORY, title="a"), line_chart(HISTORY, title="b"))


def test_line_chart_figure_has_axes_labels_legend_and_title() -> None:
    fig = line_chart_figure(HISTORY, title="learning curve")
    loss_ax, score_ax = fig.axes  # losses left, scores on a twin axis on the right
    assert loss_ax.get_title() == "learning curve"
    assert loss_ax.get_xlabel() == "epoch"
    assert (loss_ax.get_ylabel(), score_ax.get_ylabel()) == ("loss", "score")
    assert [ln.get_label() for ln in loss_ax.get_lines()] == ["train_loss", "val_loss"]
    assert [ln.get_label() for ln in score_ax.get_lines()] == ["aji", "pq"]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == list(HISTORY)
    np.testing.assert_array_equal(loss_ax.get_lines()[0].get_xdata(), [1, 2, 3, 4])
    ticks = [t for t in loss_ax.get_xticks() if 0.5 <= t <= 4.5]
    assert ticks and all(float(t).is_integer() for t in ticks)  # whole epochs only
    # One kind of series: one axis, and one epoch still gets an integer tick.
    (only,) = line_chart_figure({"aji": [0.5]}).axes
    assert only.get_ylabel() == "score"
    assert [t for t in only.get_xticks() if 0.5 <= t <= 1.5] == [1.0]
    _not_blank(line_chart({}, title="no epochs yet"))  # empty history: axes and title only


def test_save_figure_writes_a_png_atomically(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "curve.png"
    save_figure(line_chart_figure(HISTORY, size=(500, 300)), path)
    with Image.open(path) as im:
        assert (im.format, im.size) == ("PNG", (500, 300))
        _not_blank(np.asarray(im.convert("RGB")))
    before = path.read_bytes()

    fig = figure((200, 100))

    def broken_savefig(fname, **_kwargs) -> None:
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    fig.savefig = broken_savefig  # type: ignore[method-assign]
    with pytest.raises(OSError, match=r"curve\.png"):
        save_figure(fig, path)
    assert path.read_bytes() == before  # the previous picture survives
    assert sorted(p.name for p in path.parent.iterdir()) == ["curve.png"]  # no temporary left


def test_charts_never_use_pyplot_or_the_process_backend(tmp_path: Path) -> None:
    # A GUI backend named in the environment (no display here) must not matter: the chart renders
    # with its own Agg canvas, and pyplot (global state, not thread-safe) is never imported.
    code = (
        "import sys\n"
        "from kseg.plots import line_chart\n"
        "img = line_chart({'train_loss': [2, 1], 'aji': [0.1, 0.3]}, title='t')\n"
        "assert img.shape == (400, 640, 3), img.shape\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "print('ok')\n"
    )
    env = {**os.environ, "MPLBACKEND": "TkAgg", "DISPLAY": "", "MPLCONFIGDIR": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_overlay_draws_outlines_in_their_colours() -> None:
    image = np.full((12, 12, 3), 128, np.uint8)
    gt = np.zeros((12, 12), np.int32)
    gt[2:6, 2:6] = 1
    pred = np.zeros_like(gt)
    pred[6:10, 6:10] = 1
    out = overlay(image, pred=pred, gt=gt)
    assert (out[2, 2] == (0, 200, 255)).all() and (out[6, 6] == (255, 230, 0)).all()
    assert (out[4, 4] == 128).all() and (out[0, 0] == 128).all()  # interiors and background kept
