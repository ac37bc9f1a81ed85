"""The latest step's four phase boundaries as stacked bars: params, grads, optim, acts, other.

One row per phase, all on one scale, so the eye sees where the step grows (activations after the
forward pass, gradients after backward, optimizer state after the first step). Each row ends with
the phase's total and its peak: the allocator's peak within the phase on a GPU, the highest total
this phase reached in any step on a CPU (where there is no allocator peak).
"""

from __future__ import annotations

from typing import Any

from rich.style import Style
from textual.strip import Strip

from blipmon.core import timeline as tl
from blipmon.core.run import PHASES, phase_total
from blipmon.core.source import Snapshot
from blipmon.core.units import fmt_bytes
from blipmon.ui import theme
from blipmon.ui.widgets.base import LinesWidget, strip

LABEL = 11
_SHORT = {"before_fwd": "before fwd", "after_fwd": "after fwd", "after_bwd": "after bwd", "after_opt_step": "after opt"}


def phase_values(p: dict[str, Any]) -> list[int]:
    return [int(p.get(c) or 0) for c, _ in theme.CATEGORIES]


def phase_bar_lines(
    latest: list[dict[str, Any]], step_peaks: dict[str, int], width: int, height: int, title: str = "phases"
) -> list[Strip]:
    """Rows for the phase bars; pure, for tests. ``latest`` holds one record per phase (any subset)."""
    rows: list[Strip] = []
    by_phase = {p.get("phase"): p for p in latest}
    step = latest[-1].get("step") if latest else None
    head: list[tuple[str, Style | None]] = [(f"{title} " + (f"(step {step}) " if step is not None else ""), theme.BOLD)]
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


def _peak(p: dict[str, Any] | None, seen: int | None) -> int | None:
    if p is not None and isinstance(p.get("peak"), (int, float)):
        return int(p["peak"])
    if seen is not None:
        return seen
    return phase_total(p) if p else None


class PhaseBars(LinesWidget):
    DEFAULT_CSS = """
    PhaseBars { height: 6; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.latest: list[dict[str, Any]] = []
        self.peaks: dict[str, int] = {}

    def show(self, snap: Snapshot) -> None:
        self.latest = snap.latest_step()
        self.peaks = snap.step_peaks()
        self.set_data((len(snap.phases), snap.path))

    def build(self, width: int, height: int) -> list[Strip]:
        return phase_bar_lines(self.latest, self.peaks, width, height)
