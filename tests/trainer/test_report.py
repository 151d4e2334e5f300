"""Layout of the sample grids written by trainer/report.py (title clear of the headers, perturbation colour bar)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from trainer.report import DELTA_COLUMNS, grid_figure, save_grid


def _rows(n_samples: int, ir_delta: bool = False, h: int = 48, w: int = 64) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n_samples):
        ir, vis, lab = rng.random((h, w)), rng.random((h, w, 3)), rng.integers(0, 9, (h, w))
        rows.append({"label": f"{k}\nclean", "ir": ir, "vis": vis, "fused": vis, "pred": lab, "gt": lab,
                     "delta": None})
        d = np.ones((h, w))  # a sign-step PGD: nearly every pixel at the full budget
        row = {"label": f"{k}\nstrong", "ir": ir, "vis": vis, "fused": vis, "pred": lab, "gt": lab, "delta": d}
        if ir_delta:
            row["delta_ir"], rows[-1]["delta_ir"] = d, None
        rows.append(row)
    return rows


def _bbox(fig, artist):
    return artist.get_window_extent(fig.canvas.get_renderer())


@pytest.mark.parametrize("n_samples", [1, 2, 4])
def test_title_clear_of_column_headers(n_samples):
    fig = grid_figure(_rows(n_samples), title="clean vs attacked by 'strong'")
    try:
        fig.canvas.draw()
        title = _bbox(fig, fig._suptitle)
        headers = [_bbox(fig, ax.title) for ax in fig.axes[:6] if ax.get_title()]
        assert len(headers) == 6
        assert all(title.y0 > hb.y1 for hb in headers), "the grid title overlaps a column header"
        assert title.y1 <= fig.bbox.y1 + 1, "the grid title is cut off at the top"
        assert all(hb.y0 > ax.get_window_extent().y1 - 1 for hb, ax in zip(headers, fig.axes))
    finally:
        plt.close(fig)


def test_perturbation_colorbar_and_labels():
    fig = grid_figure(_rows(2), title="t")
    try:
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert titles[:5] == ["infrared", "visible", "fused", "prediction", "ground truth"]
        assert titles[5] == dict(DELTA_COLUMNS)["delta"] and "1 = full budget" in titles[5]
        cbars = [ax for ax in fig.axes if "ε" in ax.get_ylabel()]
        assert len(cbars) == 1, "expected one colour bar for the perturbation columns"
        cax = cbars[0]
        assert cax.get_ylim() == pytest.approx((0.0, 1.0))
        assert "full budget" in cax.get_ylabel()
        assert [t.get_text() for t in cax.get_yticklabels()][-1] == "1 = ε"
        fig.canvas.draw()
        last_col = _bbox(fig, fig.axes[5])
        assert _bbox(fig, cax).x0 > last_col.x1, "the colour bar overlaps the grid"
        assert fig.get_tightbbox(fig.canvas.get_renderer()).x1 <= fig.bbox_inches.x1 + 0.05
    finally:
        plt.close(fig)


def test_ir_perturbation_column_and_no_colorbar_without_deltas(tmp_path):
    fig = grid_figure(_rows(1, ir_delta=True))
    try:
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert titles[5:] == [dict(DELTA_COLUMNS)["delta_ir"], dict(DELTA_COLUMNS)["delta"]]
        assert sum("ε" in ax.get_ylabel() for ax in fig.axes) == 1  # one shared colour bar
    finally:
        plt.close(fig)
    rows = [{k: v for k, v in r.items() if not k.startswith("delta")} for r in _rows(1)]
    fig = grid_figure(rows)
    try:
        assert len(fig.axes) == 2 * 5 and not any("ε" in ax.get_ylabel() for ax in fig.axes)
    finally:
        plt.close(fig)
    png = save_grid(tmp_path / "g.png", _rows(1, ir_delta=True), title="x")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.get_fignums()


def test_empty_rows_rejected():
    with pytest.raises(ValueError, match="at least one row"):
        save_grid("unused.png", [])


def test_grid_rows_round_trip_through_npz(tmp_path):
    """save_grid_rows / load_grid_rows keep every array and the None entries (clean rows have no perturbation,
    unlabelled rows no ground truth); an empty grid is refused."""
    from trainer.report import load_grid_rows, save_grid_rows

    rng = np.random.default_rng(0)
    rows = [{"label": "a\nclean", "ir": rng.random((4, 5)), "vis": rng.random((4, 5, 3)), "fused": rng.random((4, 5, 3)),
             "pred": rng.integers(0, 9, (4, 5)), "gt": rng.integers(0, 9, (4, 5)), "delta": None, "delta_ir": None},
            {"label": "a\nstrong", "ir": rng.random((4, 5)), "vis": rng.random((4, 5, 3)),
             "fused": rng.random((4, 5, 3)), "pred": rng.integers(0, 9, (4, 5)), "gt": None,
             "delta": rng.random((4, 5)), "delta_ir": rng.random((4, 5))}]
    back = load_grid_rows(save_grid_rows(tmp_path / "g.npz", rows))
    assert [r["label"] for r in back] == ["a\nclean", "a\nstrong"]
    for got, want in zip(back, rows):
        for key, value in want.items():
            if key == "label":
                continue
            assert (got[key] is None) if value is None else np.array_equal(got[key], value), key
    with pytest.raises(ValueError, match="expected at least one row"):
        save_grid_rows(tmp_path / "h.npz", [])
