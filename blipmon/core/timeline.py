"""Chart maths for the dashboard, as pure functions over numpy arrays: no Textual, no terminal.

Why here and not in the widgets: what a chart shows (which peak lands in which column, where a
tick goes) is the part worth testing exactly, and it is easier to test without a screen. The
widgets only turn these arrays into coloured cells.

Two rules of the dashboard (docs/dashboard.md) shape it:
- a timeline is downsampled by **min and max per column**, never by averaging, so a spike between
  two columns still reaches its full height;
- a million samples must not slow the view: every step is O(samples) in numpy at worst, and the
  per-cell work is O(width x height).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# -- downsampling --------------------------------------------------------------------------------


def minmax_columns(
    t: np.ndarray, y: np.ndarray, t0: float, t1: float, ncols: int, *, hold: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest ``y`` in each of ``ncols`` equal time columns spanning ``[t0, t1]``.

    ``t`` must be sorted. NaN in ``y`` means "not measured" and is ignored; a column with no
    measured sample is NaN, except (with ``hold``) a column between two samples, which keeps the
    previous sample's value: memory does not vanish between samples, it is just not looked at.
    """
    lo = np.full(ncols, np.nan)
    hi = np.full(ncols, np.nan)
    if ncols <= 0 or len(t) == 0 or not t1 > t0:
        return lo, hi
    edges = np.linspace(t0, t1, ncols + 1)
    idx = np.searchsorted(t, edges, side="left")
    idx[-1] = np.searchsorted(t, t1, side="right")  # the last column includes its right edge
    starts, ends = idx[:-1], idx[1:]
    full = ends > starts
    if full.any():
        cut = y[: idx[-1]]
        at = starts[full]
        with np.errstate(invalid="ignore"):
            lo[full] = np.fmin.reduceat(cut, at)
            hi[full] = np.fmax.reduceat(cut, at)
    if hold:
        # Empty columns, and columns where nothing was measured, after a sample and before the last one.
        gap = np.isnan(lo) & (starts > 0) & (starts < len(t))
        if gap.any():
            last = _last_valid_index(y)
            prev = last[starts[gap] - 1]
            ok = prev >= 0
            vals = np.where(ok, y[np.maximum(prev, 0)], np.nan)
            lo[gap] = vals
            hi[gap] = vals
    return lo, hi


def _last_valid_index(y: np.ndarray) -> np.ndarray:
    """For each position, the index of the last non-NaN value at or before it (-1 if none)."""
    pos = np.where(np.isnan(y), -1, np.arange(len(y)))
    return np.maximum.accumulate(pos) if len(pos) else pos


def minmax_by_index(values: np.ndarray, ncols: int) -> tuple[np.ndarray, np.ndarray]:
    """Min/max of ``values`` (one per step, say) in ``ncols`` equal groups of consecutive items.

    With fewer items than columns, item ``i`` takes the columns ``i`` covers, so a short series
    still spans the whole width.
    """
    n = len(values)
    lo = np.full(ncols, np.nan)
    hi = np.full(ncols, np.nan)
    if n == 0 or ncols <= 0:
        return lo, hi
    if n <= ncols:
        owner = np.minimum((np.arange(ncols) * n) // ncols, n - 1)
        return values[owner].astype(float), values[owner].astype(float)
    starts = (np.arange(ncols) * n) // ncols
    with np.errstate(invalid="ignore"):
        lo = np.fmin.reduceat(values.astype(float), starts)
        hi = np.fmax.reduceat(values.astype(float), starts)
    return lo, hi


# -- braille rasterisation -----------------------------------------------------------------------

# Bit of each dot in a braille cell, indexed [row from the top 0..3][column 0..1].
_BRAILLE_BITS = np.array([[0x01, 0x08], [0x02, 0x10], [0x04, 0x20], [0x40, 0x80]], dtype=np.uint8)
BRAILLE_BASE = 0x2800


@dataclass(frozen=True)
class Raster:
    """A chart as cells: ``bits[row, col]`` is the braille dot pattern, ``owner`` the series drawn on top (-1: none)."""

    bits: np.ndarray
    owner: np.ndarray

    @property
    def height(self) -> int:
        return self.bits.shape[0]

    @property
    def width(self) -> int:
        return self.bits.shape[1]

    def text_row(self, row: int) -> str:
        """One row as braille characters (blank cells as spaces), for tests and plain-text export."""
        return "".join(" " if b == 0 else chr(BRAILLE_BASE + int(b)) for b in self.bits[row])


def dot_rows(lo: np.ndarray, hi: np.ndarray, y_min: float, y_max: float, dots: int) -> tuple[np.ndarray, np.ndarray]:
    """Dot rows (0 = bottom) spanned by each column, joined to the neighbouring column so lines stay unbroken."""
    span = (y_max - y_min) or 1.0
    with np.errstate(invalid="ignore"):
        r_lo = np.round((lo - y_min) / span * (dots - 1))
        r_hi = np.round((hi - y_min) / span * (dots - 1))
    r_lo = np.clip(r_lo, 0, dots - 1)
    r_hi = np.clip(r_hi, 0, dots - 1)
    # Join each column to the previous one: a step from 2 to 9 draws the vertical run between them.
    prev_lo = np.concatenate([[np.nan], r_lo[:-1]])
    prev_hi = np.concatenate([[np.nan], r_hi[:-1]])
    with np.errstate(invalid="ignore"):
        up = prev_hi < r_lo  # previous column entirely below: extend down to it
        down = prev_lo > r_hi  # previous column entirely above: extend up to it
    r_lo = np.where(up, prev_hi + 1, r_lo)
    r_hi = np.where(down, prev_lo - 1, r_hi)
    return r_lo, r_hi


def rasterize(
    series: Sequence[tuple[np.ndarray, np.ndarray]],
    width: int,
    height: int,
    y_min: float,
    y_max: float,
) -> Raster:
    """Draw series (``lo``, ``hi`` per dot column: 2 per cell) into ``height`` x ``width`` braille cells.

    Later series are drawn over earlier ones: a cell's ``owner`` is the last series with a dot in
    it, and its dots are the union of all series' dots (a cell has one colour, not one per dot).
    """
    bits = np.zeros((height, width), np.uint8)
    owner = np.full((height, width), -1, np.int8)
    if width <= 0 or height <= 0:
        return Raster(bits, owner)
    dots_y = height * 4
    rows = np.arange(dots_y)[:, None]
    for k, (lo, hi) in enumerate(series):
        lo = _fit(lo, 2 * width)
        hi = _fit(hi, 2 * width)
        r_lo, r_hi = dot_rows(lo, hi, y_min, y_max, dots_y)
        valid = ~np.isnan(r_lo) & ~np.isnan(r_hi)
        with np.errstate(invalid="ignore"):
            mask = (rows >= r_lo) & (rows <= r_hi) & valid  # (dots_y, 2*width), row 0 = bottom
        mask = mask[::-1]  # row 0 = top
        cells = mask.reshape(height, 4, width, 2)
        cell_bits = (cells * _BRAILLE_BITS[None, :, None, :]).sum(axis=(1, 3)).astype(np.uint8)
        bits |= cell_bits
        owner[cell_bits > 0] = k
    return Raster(bits, owner)


def _fit(a: np.ndarray, n: int) -> np.ndarray:
    if len(a) == n:
        return a.astype(float)
    out = np.full(n, np.nan)
    out[: min(n, len(a))] = a[:n]
    return out


def hline_cells(value: float, y_min: float, y_max: float, height: int) -> tuple[int, int] | None:
    """Cell row (0 = top) and dot row inside it (0 = top) where a horizontal line at ``value`` goes."""
    if height <= 0 or not (y_min <= value <= y_max) or y_max <= y_min:
        return None
    dots = height * 4
    r = int(round((value - y_min) / (y_max - y_min) * (dots - 1)))
    from_top = dots - 1 - r
    return from_top // 4, from_top % 4


HLINE_BITS = (0x09, 0x12, 0x24, 0xC0)  # both dots of one braille row, by row from the top


# -- axes ------------------------------------------------------------------------------------------


def nice_step(span: float, target: int) -> float:
    """A 1-2-5 step that cuts ``span`` into about ``target`` intervals."""
    if span <= 0 or target <= 0:
        return 1.0
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def nice_ticks(lo: float, hi: float, target: int = 4) -> list[float]:
    """Round tick values covering ``[lo, hi]``."""
    if hi <= lo:
        return [lo]
    step = nice_step(hi - lo, target)
    first = math.ceil(lo / step - 1e-9) * step
    out = []
    v = first
    while v <= hi + step * 1e-9:
        out.append(round(v, 12))
        v += step
    return out


_BYTE_STEPS = [2**k for k in range(0, 60)]


def byte_axis(top: float, target: int = 4) -> tuple[float, list[float], str, float]:
    """Axis top, ticks, unit and divisor for a memory axis from 0 to at least ``top`` bytes.

    Ticks fall on round numbers of the unit shown (GiB, MiB, KiB), so labels stay short.
    """
    top = max(float(top), 1.0)
    unit, div = "B", 1.0
    for u, d in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if top >= d:
            unit, div = u, float(d)
            break
    step = nice_step(top / div, target)
    axis_top = math.ceil(top / div / step - 1e-9) * step * div
    ticks = [i * step * div for i in range(int(round(axis_top / div / step)) + 1)]
    return axis_top, ticks, unit, div


def fmt_axis_bytes(v: float, div: float, unit: str) -> str:
    x = v / div
    text = f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.1f}" if abs(x * 10 - round(x * 10)) < 1e-6 else f"{x:.2f}"
    return f"{text}{unit[0] if unit != 'B' else 'B'}"


def short_bytes(n: float | None) -> str:
    """Bytes in at most six characters for tight legends: ``62.5G``, ``441M``, ``—``."""
    if n is None:
        return "—"
    for unit, div in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if abs(n) >= div:
            x = n / div
            return f"{x:.1f}{unit}" if x < 100 else f"{x:.0f}{unit}"
    return f"{int(n)}B"


def fmt_clock(seconds: float) -> str:
    """Elapsed time as a short label: ``45s``, ``12m30s``, ``2h05m``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s" if s else f"{m}m"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def time_ticks(t0: float, t1: float, target: int = 5) -> list[float]:
    """Round times (seconds, minutes, hours) across ``[t0, t1]``."""
    span = t1 - t0
    if span <= 0:
        return [t0]
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800, 86400):
        if span / step <= target:
            break
    else:
        step = nice_step(span, target)
    first = math.ceil(t0 / step) * step
    return [float(v) for v in np.arange(first, t1 + 1e-9, step)]


def tick_positions(ticks: Sequence[float], lo: float, hi: float, width: int) -> list[int]:
    """Cell index of each tick on an axis of ``width`` cells from ``lo`` to ``hi``."""
    if hi <= lo or width <= 1:
        return [0 for _ in ticks]
    return [int(round((v - lo) / (hi - lo) * (width - 1))) for v in ticks]


def label_row(ticks: Sequence[float], labels: Sequence[str], lo: float, hi: float, width: int) -> str:
    """Tick labels laid out under an axis, dropping any that would overlap the previous one."""
    row = [" "] * width
    end = -1
    for pos, text in zip(tick_positions(ticks, lo, hi, width), labels, strict=True):
        start = min(max(pos - len(text) // 2, 0), max(width - len(text), 0))
        if start <= end:
            continue
        for i, ch in enumerate(text[: width - start]):
            row[start + i] = ch
        end = start + len(text)
    return "".join(row)


# -- phases ----------------------------------------------------------------------------------------

# What runs after each boundary until the next one.
PHASE_ACTIVITY = {"before_fwd": "forward", "after_fwd": "backward", "after_bwd": "optimizer", "after_opt_step": "data"}
ACTIVITIES = ("load", "forward", "backward", "optimizer", "data")


def activity_columns(
    boundary_t: np.ndarray, boundary_kind: np.ndarray, t0: float, t1: float, ncols: int, load_end: float | None = None
) -> np.ndarray:
    """Which activity each column shows: an index into ``ACTIVITIES`` (-1 = none yet).

    ``boundary_kind`` holds indices into ``ACTIVITIES`` of what starts at each boundary. A column
    takes the activity running at its centre, so stripes stay honest when zoomed out; the boundary
    itself is marked separately by ``boundary_columns``.
    """
    out = np.full(ncols, -1, np.int8)
    if ncols <= 0 or t1 <= t0:
        return out
    centres = t0 + (np.arange(ncols) + 0.5) * (t1 - t0) / ncols
    if len(boundary_t):
        i = np.searchsorted(boundary_t, centres, side="right") - 1
        has = i >= 0
        out[has] = boundary_kind[i[has]]
    if load_end is not None:
        before = (out == -1) & (centres <= load_end)
        out[before] = 0
    return out


def boundary_columns(times: np.ndarray, t0: float, t1: float, ncols: int) -> np.ndarray:
    """Columns that contain at least one of ``times`` (e.g. the start of each step)."""
    out = np.zeros(ncols, bool)
    if ncols <= 0 or t1 <= t0 or not len(times):
        return out
    pos = np.floor((times - t0) / (t1 - t0) * ncols).astype(int)
    pos = pos[(pos >= 0) & (pos < ncols)]
    out[pos] = True
    return out


STEP_MARK = len(ACTIVITIES)  # a column of the phase strip where a step begins


def phase_strip_columns(
    boundary_t: np.ndarray,
    boundary_kind: np.ndarray,
    is_start: np.ndarray,
    t0: float,
    t1: float,
    ncols: int,
    load_end: float | None = None,
) -> np.ndarray:
    """What each column of the phase strip shows: an index into ``ACTIVITIES``, ``STEP_MARK`` where a
    step begins, -1 for nothing yet.

    The arrays are ``Snapshot.boundaries(rank)``: one rank's, or the whole run's. Step starts are
    marked only while steps are at least three columns apart on average; closer, marks would hide
    the activities.
    """
    act = activity_columns(boundary_t, boundary_kind, t0, t1, ncols, load_end)
    starts = boundary_t[is_start]
    if 0 < len(starts) <= ncols // 3:
        return np.where(boundary_columns(starts, t0, t1, ncols), STEP_MARK, act.astype(int))
    return act.astype(int)


# -- stacked bars ----------------------------------------------------------------------------------


def stack_cells(values: Sequence[float | None], scale: float, width: int) -> list[int]:
    """Cells for each segment of a stacked bar whose full ``width`` stands for ``scale``.

    Largest-remainder rounding keeps the total exact; a non-zero segment worth at least half a
    cell is never rounded away entirely.
    """
    vals = [max(float(v or 0.0), 0.0) for v in values]
    if scale <= 0 or width <= 0:
        return [0] * len(vals)
    total_cells = min(width, int(round(sum(vals) / scale * width)))
    exact = [v / scale * width for v in vals]
    cells = [int(math.floor(x)) for x in exact]
    cells = [1 if c == 0 and x >= 0.5 else c for c, x in zip(cells, exact, strict=True)]
    spare = total_cells - sum(cells)
    for i in sorted(range(len(vals)), key=lambda i: exact[i] - cells[i], reverse=True):
        if spare <= 0 or exact[i] - cells[i] <= 0:
            break
        cells[i] += 1
        spare -= 1
    while sum(cells) > total_cells:  # the minimum cells overshot: take from the largest, else the smallest
        big = max(range(len(cells)), key=lambda i: cells[i])
        if cells[big] <= 1:
            big = min((i for i in range(len(cells)) if cells[i]), key=lambda i: exact[i])
        cells[big] -= 1
    return cells


def bar_cells(value: float, scale: float, width: int) -> str:
    """A one-colour horizontal bar with eighth-cell precision."""
    if scale <= 0 or width <= 0:
        return ""
    eighths = int(round(max(value, 0.0) / scale * width * 8))
    eighths = min(eighths, width * 8)
    full, part = divmod(eighths, 8)
    return "█" * full + ("" if part == 0 else " ▏▎▍▌▋▊▉"[part])


__all__ = [
    "ACTIVITIES",
    "PHASE_ACTIVITY",
    "Raster",
    "STEP_MARK",
    "activity_columns",
    "bar_cells",
    "boundary_columns",
    "byte_axis",
    "fmt_axis_bytes",
    "fmt_clock",
    "label_row",
    "minmax_by_index",
    "minmax_columns",
    "nice_ticks",
    "phase_strip_columns",
    "rasterize",
    "stack_cells",
    "tick_positions",
    "time_ticks",
]
