"""The latest step's four phase boundaries as stacked bars: params, grads, optim, acts, other.

One row per phase, all on one scale, so the eye sees where the step grows (activations after the
forward pass, gradients after backward, optimizer state after the first step). Each row ends with
the phase's total and its peak: the allocator's peak within the phase on a GPU, the highest total
this phase reached in any step on a CPU (where there is no allocator peak).

With several ranks the bars are the selected rank's; in "all" mode (``spread_lines``) each bar is
the highest rank's stack, a ``┃`` marks the lowest rank's total, and the row ends with
``min..max r<rank of max>``: one glance says whether the ranks agree and which one is the worst.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.style import Style
from textual.strip import Strip

from blipmon.core import timeline as tl
from blipmon.core.ranks import PhaseSpread, RankView, phase_peak, rank_view
from blipmon.core.run import PHASES
from blipmon.core.snapshot import Snapshot
from blipmon.core.units import fmt_bytes
from blipmon.ui import theme
from blipmon.ui.widgets.base import LinesWidget, strip

LABEL = 11
_SHORT = {"before_fwd": "before fwd", "after_fwd": "after fwd", "after_bwd": "after bwd", "after_opt_step": "after opt"}


def phase_values(p: Mapping[str, Any]) -> list[int]:
    return [int(p.get(c) or 0) for c, _ in theme.CATEGORIES]


def phase_bar_lines(
    latest: Sequence[Mapping[str, Any]],
    step_peaks: Mapping[str, int],
    width: int,
    height: int,
    title: str = "phases",
    newest: Any = None,
) -> list[Strip]:
    """Rows for the phase bars; pure, for tests. ``latest`` holds one record per phase (any subset); ``newest`` is
    the newest complete step: when the bars show an older one (the newest counted in full), the title says so."""
    rows: list[Strip] = []
    by_phase = {p.get("phase"): p for p in latest}
    step = latest[-1].get("step") if latest else None
    older = isinstance(step, int) and isinstance(newest, int) and newest > step
    where = f"(step {step}{', the newest counted in full' if older else ''}) " if step is not None else ""
    head: list[tuple[str, Style | None]] = [(f"{title} {where}", theme.BOLD)]
    for cat, color in theme.CATEGORIES:
        head += [("■", Style(color=color)), (f"{cat} ", None)]
    if width >= 60:
        head.append(("▏▲ peak", Style(color=theme.CAPACITY_COLOR)))
    rows.append(strip(head, width))
    if not latest:
        rows.append(strip([("  waiting for the first step…", theme.DIM)], width))
        return rows[:height]
    peaks = {ph: _peak(by_phase.get(ph), step_peaks.get(ph)) for ph in PHASES}
    scale = max([sum(phase_values(p)) for p in latest] + [v for v in peaks.values() if v] + [1])
    wide = width >= 60
    tail = 22 if wide else 11
    bar_w = max(width - LABEL - tail, 4)
    for ph in PHASES:
        p = by_phase.get(ph)
        parts: list[tuple[str, Style | None]] = [(f"{_SHORT[ph]:<{LABEL - 1}} ", theme.DIM)]
        if p is None:
            parts.append(("·" * bar_w, theme.DIM))
            rows.append(strip(parts, width))
            continue
        vals = phase_values(p)
        cells = tl.stack_cells(vals, scale, bar_w)
        used = 0
        for n, (_, color) in zip(cells, theme.CATEGORIES, strict=True):
            if n:
                parts.append(("█" * n, Style(color=color)))
                used += n
        peak = peaks[ph]
        rest = bar_w - used
        if rest > 0:
            mark = int(round(peak / scale * bar_w)) - used - 1 if peak else -1
            pad = [" "] * rest
            if 0 <= mark < rest:
                pad[mark] = "▏"
            parts.append(("".join(pad), Style(color=theme.CAPACITY_COLOR)))
        total = sum(vals)
        parts.append((f" {fmt_bytes(total):>10}", None))
        if wide:
            parts.append((f" ▲{fmt_bytes(peak)}" if peak else "", Style(color=theme.CAPACITY_COLOR)))
        rows.append(strip(parts, width))
    return rows[:height]


def _peak(p: Mapping[str, Any] | None, seen: int | None) -> int | None:
    return phase_peak(p, seen)


MIN_MARK = "┃"
_MIN_STYLE = Style(color="#ffffff", bold=True)


def spread_lines(view: RankView, width: int, height: int) -> list[Strip]:
    """Rows for "all ranks": per phase the highest rank's stacked bar, the lowest rank's total as ``┃``,
    the highest peak as ``▏`` (as for one rank), then ``min..max r<rank>``; pure, for tests.

    The last row, when there is room, lists each rank's highest phase total, the worst one marked.
    """
    wide = width >= 60
    steps = view.spread_steps
    step_txt = f"(step {steps[0]}) " if len(steps) == 1 else f"(steps {steps[0]}-{steps[-1]}) " if steps else ""
    head: list[tuple[str, Style | None]] = [(f"{view.title()} {step_txt}", theme.BOLD)]
    head += [(MIN_MARK, _MIN_STYLE), ("min ", None)]
    for cat, color in theme.CATEGORIES:
        head += [("■", Style(color=color)), (f"{cat} ", None)]
    rows = [strip(head, width)]
    if not view.spread:
        rows.append(strip([("  waiting for the first step…", theme.DIM)], width))
        return rows[:height]
    by_phase = {s.phase: s for s in view.spread}
    scale = max([s.hi for s in view.spread] + [s.peak or 0 for s in view.spread] + [1])
    tail = 24 if wide else 17
    bar_w = max(width - LABEL - tail, 4)
    for ph in PHASES:
        sp = by_phase.get(ph)
        parts: list[tuple[str, Style | None]] = [(f"{_SHORT[ph]:<{LABEL - 1}} ", theme.DIM)]
        if sp is None:
            parts.append(("·" * bar_w, theme.DIM))
            rows.append(strip(parts, width))
            continue
        parts += _spread_bar(sp, scale, bar_w)
        parts.append((_spread_text(sp, wide).rjust(tail), None if sp.even else Style(bold=True)))
        rows.append(strip(parts, width))
    if view.rank_peaks and len(rows) < height:
        top = max(v for _, v in view.rank_peaks)
        # The worst rank is marked only when it stands out: equal ranks have no worst.
        worst = {r for r, v in view.rank_peaks if v == top} if any(v < top for _, v in view.rank_peaks) else set()
        line: list[tuple[str, Style | None]] = [("rank peaks ", theme.DIM)]
        for r, v in view.rank_peaks:
            line.append((f"r{r} {tl.short_bytes(v)}" + ("▲ " if r in worst else "  "),
                         Style(bold=True) if r in worst else None))  # fmt: skip
        rows.append(strip(line, width))
    return rows[:height]


def _spread_bar(sp: PhaseSpread, scale: float, bar_w: int) -> list[tuple[str, Style | None]]:
    """One phase's bar cells: the highest rank's stack, the lowest total's mark over it, the peak's after it."""
    cells: list[tuple[str, Style | None]] = []
    for n, (_, color) in zip(tl.stack_cells(list(sp.values), scale, bar_w), theme.CATEGORIES, strict=True):
        cells += [("█", Style(color=color))] * n
    used = len(cells)
    cells += [(" ", None)] * (bar_w - used)
    if sp.peak:
        mark = int(round(sp.peak / scale * bar_w)) - 1
        if used <= mark < bar_w:
            cells[mark] = ("▏", Style(color=theme.CAPACITY_COLOR))
    if not sp.even:
        at = min(max(int(round(sp.lo / scale * bar_w)) - 1, 0), bar_w - 1)
        under = cells[at][1]
        bg = under.color.name if under is not None and under.color is not None and cells[at][0] == "█" else None
        cells[at] = (MIN_MARK, _MIN_STYLE + Style(bgcolor=bg) if bg else _MIN_STYLE)
    merged: list[tuple[str, Style | None]] = []
    for ch, st in cells:  # one segment per run of equal style, as the single-rank bars draw them
        if merged and merged[-1][1] == st:
            merged[-1] = (merged[-1][0] + ch, st)
        else:
            merged.append((ch, st))
    return merged


def _spread_text(sp: PhaseSpread, wide: bool) -> str:
    """``min..max r<rank of max>``, or the one total and ``same on all`` when every rank agrees."""
    if wide:
        unit = "GiB" if sp.hi >= 1024**3 else "MiB" if sp.hi >= 1024**2 else "KiB"
        lo, hi = fmt_bytes(sp.lo, unit=unit).split()[0], fmt_bytes(sp.hi, unit=unit)
        return f"{hi} same on all" if sp.even else f"{lo}..{hi} r{sp.hi_rank}"
    lo_s, hi_s = tl.short_bytes(sp.lo), tl.short_bytes(sp.hi)
    return f"{hi_s} same on all" if sp.even else f"{lo_s}..{hi_s} r{sp.hi_rank}"


class PhaseBars(LinesWidget):
    DEFAULT_CSS = """
    PhaseBars { height: 6; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.latest: Sequence[Mapping[str, Any]] = ()
        self.peaks: Mapping[str, int] = {}
        self.view: RankView | None = None
        self.newest: Any = None

    def show(self, snap: Snapshot, view: RankView | None = None) -> None:
        """Draw ``view`` (the selected rank's data; rank 0's when not given) of ``snap``."""
        view = view if view is not None else rank_view(snap, 0)
        self.view = view
        self.latest = view.latest
        self.peaks = view.peaks
        self.newest = snap.newest_complete_step(view.selected if view.selected is not None else 0)
        self.set_data((len(snap.phases), snap.path, view.key))

    def build(self, width: int, height: int) -> list[Strip]:
        view = self.view
        if view is not None and view.all_ranks:
            return spread_lines(view, width, height)
        title = view.title() if view is not None else "phases"
        return phase_bar_lines(self.latest, self.peaks, width, height, title=title, newest=self.newest)
