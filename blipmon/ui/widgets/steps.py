"""Step time and loss over steps: two small braille charts, min/max per column like the timeline.

With several ranks they are the selected rank's steps; for "all ranks" each step is the slowest
rank's time and the mean loss (``blipmon.core.ranks.combine_steps``), and the titles say so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from rich.style import Style
from textual.strip import Strip

from blipmon.core import timeline as tl
from blipmon.core.ranks import RankView, rank_view
from blipmon.core.snapshot import Snapshot
from blipmon.core.units import fmt_seconds
from blipmon.ui import theme
from blipmon.ui.widgets.base import LinesWidget, strip

STEP_COLOR = "#5fd7d7"
LOSS_COLOR = "#ffaf87"


def mini_chart(values: Sequence[float | None], width: int, height: int, color: str) -> list[Strip]:
    """A braille chart of one value per step, scaled between its own min and max."""
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    if width <= 0 or height <= 0:
        return []
    lo, hi = tl.minmax_by_index(arr, 2 * width)
    ok = arr[~np.isnan(arr)]
    if not len(ok):
        return [Strip.blank(width) for _ in range(height)]
    vmin, vmax = float(ok.min()), float(ok.max())
    if vmax - vmin < 1e-12:
        vmin, vmax = vmin - 1.0, vmax + 1.0
    raster = tl.rasterize([(lo, hi)], width, height, vmin, vmax)
    style = Style(color=color)
    return [strip([(raster.text_row(r), style)], width) for r in range(height)]


def step_lines(
    steps: Sequence[Mapping[str, Any]],
    width: int,
    height: int,
    time_label: str = "step time",
    loss_label: str = "loss",
) -> list[Strip]:
    """Title row plus step-time and loss charts side by side (or stacked when narrow)."""
    secs = [s.get("seconds") if isinstance(s.get("seconds"), (int, float)) else None for s in steps]
    loss = [s.get("loss") if isinstance(s.get("loss"), (int, float)) else None for s in steps]
    last_s = next((v for v in reversed(secs) if v is not None), None)
    last_l = next((v for v in reversed(loss) if v is not None), None)
    rate = next(
        (s.get("samples_per_s") for s in reversed(steps) if isinstance(s.get("samples_per_s"), (int, float))), None
    )
    half = max((width - 1) // 2, 1)
    title = [
        (f"{time_label} ", theme.BOLD),
        (f"{fmt_seconds(last_s)}" + (f" {rate:,.1f}/s" if rate else ""), Style(color=STEP_COLOR)),
    ]
    left = Strip.join([strip(title, half - 1), strip([(" ", None)], 1)])
    right = strip(
        [(f"{loss_label} ", theme.BOLD), ("—" if last_l is None else f"{last_l:.4f}", Style(color=LOSS_COLOR))],
        width - half,
    )
    rows = [Strip.join([left, right])]
    h = max(height - 1, 1)
    if not steps:
        rows.append(strip([("  no steps yet", theme.DIM)], width))
        return rows[:height]
    a = mini_chart(secs, half - 1, h, STEP_COLOR)
    b = mini_chart(loss, width - half - 1, h, LOSS_COLOR)
    for r in range(h):
        rows.append(Strip.join([a[r], strip([(" ", None)], 1), b[r], strip([(" ", None)], 1)]))
    return rows[:height]


class StepCharts(LinesWidget):
    DEFAULT_CSS = """
    StepCharts { height: 6; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps: Sequence[Mapping[str, Any]] = ()
        self.all_ranks = False

    def show(self, snap: Snapshot, view: RankView | None = None) -> None:
        """Chart ``view``'s steps (the selected rank's; rank 0's, i.e. ``snap.steps``, when not given)."""
        view = view if view is not None else rank_view(snap, 0)
        self.steps = view.steps
        self.all_ranks = view.all_ranks
        self.set_data((len(self.steps), view.key))

    def build(self, width: int, height: int) -> list[Strip]:
        if self.all_ranks:
            return step_lines(self.steps, width, height, time_label="slowest", loss_label="mean loss")
        return step_lines(self.steps, width, height)
