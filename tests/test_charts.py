"""Explorer figures: what a marker says must be where it is drawn."""

import pytest

from gfwsvd_ui import charts


def test_heatmap_markers_sit_at_the_exact_rank_and_break_even():
    grid = [1, 2, 4, 8, 16, 32, 64, 128]
    fig = charts.rank_heatmap(["a", "b", "c"], grid, [[0.0] * len(grid)] * 3, {"a": 8, "b": 81, "c": None},
                              break_even={"a": 100.0, "b": 40.0, "c": 1000.0})
    chosen = next(t for t in fig.data if t.name == "chosen")
    assert list(chosen.y) == ["a", "b"]
    assert chosen.x[0] == 3.0  # on the grid: its column
    assert chosen.x[1] == pytest.approx(6 + (81 - 64) / 64)  # between the 64 and 128 columns, not snapped to one
    assert "rank 81" in chosen.text[1]
    be = next(t for t in fig.data if t.name == "break-even")
    assert be.x[0] == pytest.approx(6 + 36 / 64) and be.x[1] == pytest.approx(5 + 8 / 32)
    assert be.x[2] > len(grid) - 1  # past the last column: drawn to its right
    # a numeric axis labelled with the ranks, so fractional marker positions are not categories
    assert fig.layout.xaxis.type == "linear" and list(fig.layout.xaxis.ticktext) == [str(r) for r in grid]
    assert list(fig.data[0].x) == list(range(len(grid))) and list(fig.data[0].customdata[0]) == list(grid)
