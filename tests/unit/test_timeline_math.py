"""Chart maths as pure functions: what lands in which column, which dots light up, where ticks go."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blipmon.core import timeline as tl


def test_a_spike_between_columns_keeps_its_full_height() -> None:
    t = np.arange(1000) / 100.0  # 10 s at 100 Hz
    y = np.full(1000, 5.0)
    y[537] = 90.0  # one sample spike
    lo, hi = tl.minmax_columns(t, y, 0.0, 10.0, 7)
    assert np.nanmax(hi) == 90.0
    assert np.nanmin(lo) == 5.0
    assert (hi == 90.0).sum() == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1e12), min_size=1, max_size=400), st.integers(1, 50))
def test_min_and_max_over_columns_are_the_series_min_and_max(values: list[float], ncols: int) -> None:
    y = np.array(values)
    t = np.arange(len(y), dtype=float)
    lo, hi = tl.minmax_columns(t, y, 0.0, float(max(len(y) - 1, 1)), ncols)
    assert np.nanmax(hi) == y.max()
    assert np.nanmin(lo) == y.min()


def test_gaps_between_samples_hold_the_previous_value() -> None:
    t = np.array([0.0, 10.0])
    y = np.array([1.0, 3.0])
    lo, hi = tl.minmax_columns(t, y, 0.0, 10.0, 10)
    assert lo[0] == 1.0 and hi[0] == 1.0
    assert list(lo[1:9]) == [1.0] * 8  # held, not blank
    assert hi[-1] == 3.0


def test_unmeasured_series_stays_blank() -> None:
    t = np.arange(5.0)
    lo, hi = tl.minmax_columns(t, np.full(5, np.nan), 0.0, 4.0, 4)
    assert np.isnan(lo).all() and np.isnan(hi).all()


def test_nothing_to_draw_gives_nan_columns() -> None:
    lo, hi = tl.minmax_columns(np.empty(0), np.empty(0), 0.0, 1.0, 3)
    assert np.isnan(lo).all() and len(hi) == 3


def test_minmax_by_index_spreads_a_short_series_over_the_width() -> None:
    lo, hi = tl.minmax_by_index(np.array([1.0, 2.0]), 4)
    assert list(lo) == [1.0, 1.0, 2.0, 2.0]
    lo, hi = tl.minmax_by_index(np.arange(10.0), 2)
    assert list(lo) == [0.0, 5.0] and list(hi) == [4.0, 9.0]


def test_rasterize_a_flat_line_lights_the_bottom_dots() -> None:
    lo = hi = np.zeros(4)
    r = tl.rasterize([(lo, hi)], 2, 1, 0.0, 1.0)
    assert r.text_row(0) == "⣀⣀"
    assert (r.owner == 0).all()


def test_rasterize_a_vertical_range_fills_the_column() -> None:
    lo = np.array([0.0, np.nan])
    hi = np.array([1.0, np.nan])
    r = tl.rasterize([(lo, hi)], 1, 2, 0.0, 1.0)
    assert [r.text_row(0), r.text_row(1)] == ["⡇", "⡇"]


def test_rasterize_joins_a_step_between_columns() -> None:
    lo = hi = np.array([0.0, 0.0, 1.0, 1.0])
    r = tl.rasterize([(lo, hi)], 2, 1, 0.0, 1.0)
    # the second cell's left column climbs from just above the old level to the new one
    assert r.bits[0, 1] & 0x47 == 0x07
    assert r.text_row(0) == "⣀⠏"


def test_later_series_own_shared_cells() -> None:
    a = (np.zeros(2), np.zeros(2))
    b = (np.zeros(2), np.zeros(2))
    r = tl.rasterize([a, b], 1, 1, 0.0, 1.0)
    assert r.owner[0, 0] == 1


def test_hline_position() -> None:
    assert tl.hline_cells(0.0, 0.0, 1.0, 2) == (1, 3)
    assert tl.hline_cells(1.0, 0.0, 1.0, 2) == (0, 0)
    assert tl.hline_cells(2.0, 0.0, 1.0, 2) is None


def test_byte_axis_uses_round_numbers_of_the_unit() -> None:
    top, ticks, unit, div = tl.byte_axis(70 * 2**30)
    assert unit == "GiB" and top >= 70 * 2**30
    assert all((v / div) == int(v / div) for v in ticks)
    assert tl.fmt_axis_bytes(ticks[1], div, unit).endswith("G")
    assert tl.byte_axis(0)[2] == "B"


@pytest.mark.parametrize(("span", "target", "expected"), [(10, 5, 2), (1, 4, 0.25), (700, 4, 200), (0, 4, 1.0)])
def test_nice_step(span: float, target: int, expected: float) -> None:
    assert tl.nice_step(span, target) == expected


def test_nice_and_time_ticks() -> None:
    assert tl.nice_ticks(0, 10, 5) == [0, 2, 4, 6, 8, 10]
    assert tl.time_ticks(0, 95, 5) == [0, 30, 60, 90]
    assert tl.fmt_clock(45) == "45s" and tl.fmt_clock(750) == "12m30s" and tl.fmt_clock(7500) == "2h05m"


def test_label_row_drops_overlapping_labels() -> None:
    row = tl.label_row([0, 1, 2, 10], ["0s", "1s", "2s", "10s"], 0, 10, 20)
    assert row.startswith("0s") and "10s" in row and "1s " not in row
    assert len(row) == 20


def test_stack_cells_is_exact_and_keeps_small_segments() -> None:
    cells = tl.stack_cells([50, 30, 18.5, 1.5], 100, 40)
    assert sum(cells) == 40 and all(c > 0 for c in cells)
    assert tl.stack_cells([99, 1], 100, 20)[1] == 0  # a fifth of a cell: too small to draw
    assert tl.stack_cells([10, None, 0], 100, 10) == [1, 0, 0]
    assert tl.stack_cells([1, 1], 0, 10) == [0, 0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10**12), min_size=1, max_size=5), st.integers(1, 120))
def test_stack_cells_never_overflows(values: list[int], width: int) -> None:
    scale = max(sum(values), 1)
    cells = tl.stack_cells(values, scale, width)
    assert sum(cells) <= width and all(c >= 0 for c in cells)


def test_bar_cells_eighths() -> None:
    assert tl.bar_cells(1, 2, 4) == "██"
    assert tl.bar_cells(1, 16, 2) == "▏"
    assert tl.bar_cells(1, 4, 2) == "▌"


def test_activity_columns_follow_phase_boundaries() -> None:
    names = {n: i for i, n in enumerate(tl.ACTIVITIES)}
    bt = np.array([2.0, 4.0, 6.0, 8.0])
    kinds = np.array([names["forward"], names["backward"], names["optimizer"], names["data"]])
    act = tl.activity_columns(bt, kinds, 0.0, 10.0, 10, load_end=1.0)
    assert act[0] == names["load"] and act[1] == -1
    assert act[2] == names["forward"] and act[5] == names["backward"] and act[9] == names["data"]
    marks = tl.boundary_columns(np.array([2.0, 9.99]), 0.0, 10.0, 10)
    assert list(np.flatnonzero(marks)) == [2, 9]
