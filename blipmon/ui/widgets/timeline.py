"""The memory timeline: GPU allocated, reserved and device used, and host RSS, over the run's time.

Drawn in braille cells (2 x 4 dots each) from min/max per dot column, so no peak falls between
columns; the GPU's capacity is a red line; a strip under the plot shows what the step was doing
(forward, backward, optimizer, data) and marks where each step began, for the rank shown (every
rank's boundaries with rank 0's step starts when all ranks are).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.style import Style
from textual.strip import Strip

from blipmon.core import timeline as tl
from blipmon.core.snapshot import Snapshot
from blipmon.core.units import fmt_bytes
from blipmon.ui import theme
from blipmon.ui.widgets.base import LinesWidget, strip

GUTTER = 7


def shown_series(snap: Snapshot, rank: int | None = None) -> list[tuple[str, str, str, np.ndarray]]:
    """(key, label, colour, values) of every series that has at least one measured value.

    ``rank`` picks one rank's samples; ``None`` plots every sample, which for several ranks is
    their envelope (each column's min and max across the ranks' samples).
    """
    samples = snap.samples_of(rank)
    out = []
    for key, label, color in theme.SERIES:
        arr = samples.get(key)
        if arr is not None and len(arr) and not np.isnan(arr).all():
            out.append((key, label, color, arr))
    return out


def time_range(snap: Snapshot) -> tuple[float, float]:
    """The whole run so far, from its start to now (at least 5 s, so a new run does not look zoomed)."""
    t = snap.samples.get("t")
    last = float(t[-1]) if t is not None and len(t) else 0.0
    return 0.0, max(snap.now, last, 5.0)


def timeline_lines(snap: Snapshot, width: int, height: int, rank: int | None = None) -> list[Strip]:
    """The whole chart as rows of cells; pure, so tests can read it without a terminal.

    ``rank``: one rank's samples, peaks and phase strip (``None``: the whole run). The time axis is
    the whole run's either way, so moving between ranks never rescales it.
    """
    rows: list[Strip] = []
    series = shown_series(snap, rank)
    gpu_total = snap.gpu_total if snap.cuda else None
    rows.append(_legend(snap, series, gpu_total, width, rank))
    plot_h = max(height - 3, 1)
    plot_w = max(width - GUTTER, 1)
    t0, t1 = time_range(snap)
    t = snap.samples_of(rank).get("t", np.empty(0))
    cols = [tl.minmax_columns(t, arr, t0, t1, 2 * plot_w) for _, _, _, arr in series]
    top = max([float(np.nanmax(hi)) for _, hi in cols if not np.isnan(hi).all()] + [float(gpu_total or 0), 2.0**20])
    axis_top, ticks, unit, div = tl.byte_axis(top)
    raster = tl.rasterize(cols, plot_w, plot_h, 0.0, axis_top)
    colors = [Style(color=c) for _, _, c, _ in series]
    cap_row = tl.hline_cells(float(gpu_total), 0.0, axis_top, plot_h) if gpu_total else None
    labels: dict[int, str] = {}
    for v in ticks:
        pos = tl.hline_cells(v, 0.0, axis_top, plot_h)
        if pos is not None and pos[0] not in labels:
            labels[pos[0]] = tl.fmt_axis_bytes(v, div, unit)
    cap_style = Style(color=theme.CAPACITY_COLOR)
    owner = raster.owner.astype(int)
    bits = raster.bits.astype(int)
    if cap_row is not None:  # the capacity line, where no series is drawn over it
        r, dot = cap_row
        free = owner[r] < 0
        bits[r, free] |= tl.HLINE_BITS[dot]
        owner[r, free] = len(colors)
    styles = [*colors, cap_style]
    for r in range(plot_h):
        parts: list[tuple[str, Style | None]] = [(f"{labels[r]:>5} ┤" if r in labels else "      │", theme.AXIS)]
        chars = _BRAILLE[bits[r]]
        own = np.where(bits[r] > 0, owner[r], -1)
        edges = np.flatnonzero(np.diff(own)) + 1
        for lo, hi in zip(np.r_[0, edges], np.r_[edges, plot_w], strict=True):
            o = int(own[lo])
            parts.append(("".join(chars[lo:hi]), styles[o] if o >= 0 else None))
        rows.append(strip(parts, width))
    rows.append(_phase_strip(snap, t0, t1, plot_w, width, rank))
    tt = tl.time_ticks(t0, t1, max(plot_w // 12, 2))
    rows.append(
        strip(
            [(" " * GUTTER, None), (tl.label_row(tt, [tl.fmt_clock(v) for v in tt], t0, t1, plot_w), theme.AXIS)], width
        )
    )
    return rows[:height]


_SHORT_LABEL = {"alloc": "alloc", "res": "res", "dev": "dev", "rss": "host"}
_PEAK_KEY = {"alloc": "allocated", "res": "reserved", "dev": "device_used", "rss": "host_rss"}


def _legend(
    snap: Snapshot,
    series: list[tuple[str, str, str, np.ndarray]],
    gpu_total: int | None,
    width: int,
    rank: int | None = None,
) -> Strip:
    """Series with their peaks (``rank``'s, or the whole run's), and the GPU's capacity; short labels when narrow."""
    narrow = width < 110
    parts: list[tuple[str, Style | None]] = [("memory ", theme.BOLD)] if not narrow else []
    if gpu_total:
        parts += [
            ("━", Style(color=theme.CAPACITY_COLOR)),
            (f"GPU {tl.short_bytes(gpu_total) if narrow else fmt_bytes(gpu_total)}  ", None),
        ]
    peaks = snap.peaks(rank)
    for key, label, color, _ in reversed(series):
        peak = peaks.get(_PEAK_KEY[key])
        text = f"{_SHORT_LABEL[key]} {tl.short_bytes(peak)} " if narrow else f"{label} {fmt_bytes(peak)}  "
        parts += [("■", Style(color=color)), (text, None)]
    if not gpu_total and snap.environment:
        reason = snap.environment.get("gpu_reason") or "this run did not use a GPU"
        parts.append((f" no NVIDIA GPU: {reason}", theme.DIM))
    return strip(parts, width)


def _phase_strip(snap: Snapshot, t0: float, t1: float, plot_w: int, width: int, rank: int | None = None) -> Strip:
    """What the step was doing under each column, and where steps began: ``rank``'s, or the whole run's."""
    bt, kinds, is_start = snap.boundaries(rank)
    load_end = float(snap.load["t"]) if snap.load and isinstance(snap.load.get("t"), (int, float)) else None
    code = tl.phase_strip_columns(bt, kinds, is_start, t0, t1, plot_w, load_end)
    parts: list[tuple[str, Style | None]] = [("phase ", theme.DIM), (" ", None)]
    # One run of text per stretch of equal cells: a handful of segments, not one per column.
    edges = np.flatnonzero(np.diff(code)) + 1
    for lo, hi in zip(np.r_[0, edges], np.r_[edges, plot_w], strict=True):
        c = int(code[lo])
        if c == tl.STEP_MARK:
            parts.append(("┃" * (hi - lo), _MARK))
        elif c >= 0:
            parts.append(("━" * (hi - lo), _ACTIVITY_STYLES[c]))
        else:
            parts.append((" " * (hi - lo), None))
    return strip(parts, width)


_MARK = Style(color="#e4e4e4")
_ACTIVITY_STYLES = [Style(color=theme.ACTIVITY_COLORS[a]) for a in tl.ACTIVITIES]
_BRAILLE = np.array([" "] + [chr(tl.BRAILLE_BASE + b) for b in range(1, 256)])


def _merge(parts: list[tuple[str, Style | None]]) -> list[tuple[str, Style | None]]:
    out: list[tuple[str, Style | None]] = []
    for text, style in parts:
        if out and out[-1][1] == style:
            out[-1] = (out[-1][0] + text, style)
        else:
            out.append((text, style))
    return out


class TimelineChart(LinesWidget):
    """The memory timeline of the current snapshot: every sample, or one rank's (``show(snap, rank)``)."""

    DEFAULT_CSS = """
    TimelineChart { height: 1fr; min-height: 6; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.snapshot: Snapshot | None = None
        self.rank: int | None = None

    def show(self, snap: Snapshot, rank: int | None = None) -> None:
        self.snapshot = snap
        self.rank = rank
        self.set_data((snap.data_version, round(snap.now), snap.path, rank))

    def build(self, width: int, height: int) -> list[Strip]:
        if self.snapshot is None:
            return []
        return timeline_lines(self.snapshot, width, height, self.rank)
