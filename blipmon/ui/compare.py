"""The compare view: 2 to 6 runs side by side.

The table is ``report.compare_rows`` — the very rows ``blipmon compare`` prints — with the best
value of each row starred and deltas against the first run. Below it, each run's memory at its
peak phase as a stacked bar; where the runs recorded per-module figures (issue 12), each module's total in every
run with what changed against the first run, per category (the figures of ``blipmon compare --modules``); and
the runs' timelines overlaid, aligned by time or by step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.cells import cell_len, set_cell_size
from rich.style import Style
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.strip import Strip
from textual.widgets import DataTable, Footer, Static

from blipmon.core import timeline as tl
from blipmon.core.errors import ProfileError
from blipmon.core.module_view import Boundary, ModuleDiff, run_module_diffs
from blipmon.core.report import compare_rows, module_changes
from blipmon.core.run import RunData, load_run
from blipmon.core.safe_text import one_line
from blipmon.core.units import fmt_bytes
from blipmon.ui import theme
from blipmon.ui.dialogs import HelpScreen, binding_keys
from blipmon.ui.export import export_compare
from blipmon.ui.widgets.base import LinesWidget, strip
from blipmon.ui.widgets.timeline import GUTTER

METRICS = (("alloc", "allocated"), ("res", "reserved"), ("dev", "device used"), ("rss", "host RSS"))
_COLUMN = {"alloc": "allocated", "res": "reserved", "dev": "device_used", "rss": "host_rss"}


def table_cells(runs: list[RunData]) -> list[list[Text]]:
    """The compare table as styled cells: label, then one cell per run (best starred, deltas vs run 1)."""
    out = []
    for row in compare_rows(runs):
        best = row.best_index()
        cells = [Text(row.label, style="bold")]
        for i in range(len(row.values)):
            text = row.cell(i)  # one line, no controls: text rows are the profiles' words
            if best == i:
                cells.append(Text("★ " + text, style=Style(color="#87d787", bold=True)))
            else:
                cells.append(Text(text))
        out.append(cells)
    return out


def step_axis(run: RunData) -> tuple[np.ndarray, np.ndarray]:
    """(times, step numbers) at which each step began, ending at the run's end: maps time to step."""
    starts = [
        (float(p.get("t") or 0.0), int(p.get("step") or 0))
        for p in run.phases
        if p.get("phase") == "before_fwd" and not p.get("micro_step") and not p.get("rank")
    ]
    if not starts:
        return np.empty(0), np.empty(0)
    t = [s[0] for s in starts] + [max(run.last_t, starts[-1][0])]
    k = [float(s[1]) for s in starts] + [float(starts[-1][1] + 1)]
    return np.array(t), np.array(k)


def overlay_lines(runs: list[RunData], metric: str, by_step: bool, width: int, height: int) -> list[Strip]:
    """Every run's ``metric`` over time (or steps) in one chart, one colour per run; pure, for tests."""
    rows: list[Strip] = []
    label = dict(METRICS)[metric]
    head: list[tuple[str, Style | None]] = [(f"{label} by {'step' if by_step else 'time'}  ", theme.BOLD)]
    plot_h, plot_w = max(height - 2, 1), max(width - GUTTER, 1)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for i, run in enumerate(runs):
        arr = run.samples.arrays()
        t, y = arr["t"], arr[_COLUMN[metric]]
        if by_step:
            st, sk = step_axis(run)
            if len(st) < 2:
                t, y = np.empty(0), np.empty(0)
            else:
                keep = (t >= st[0]) & (t <= st[-1])
                t, y = np.interp(t[keep], st, sk), y[keep]
        xs.append(t)
        ys.append(y)
        color = theme.RUN_COLORS[i % len(theme.RUN_COLORS)]
        measured = len(y) and not np.isnan(y).all()
        head += [
            ("■ ", Style(color=color)),
            (f"{i + 1}. {run.name[:24]}{'' if measured else ' (not measured)'}  ", None),
        ]
    rows.append(strip(head, width))
    x1 = max([float(x[-1]) for x in xs if len(x)] + [1.0])
    cols = [tl.minmax_columns(x, y, 0.0, x1, 2 * plot_w) for x, y in zip(xs, ys, strict=True)]
    top = max([float(np.nanmax(hi)) for _, hi in cols if not np.isnan(hi).all()] + [1.0])
    axis_top, ticks, unit, div = tl.byte_axis(top)
    raster = tl.rasterize(cols, plot_w, plot_h, 0.0, axis_top)
    labels: dict[int, str] = {}
    for v in ticks:
        pos = tl.hline_cells(v, 0.0, axis_top, plot_h)
        if pos is not None and pos[0] not in labels:
            labels[pos[0]] = tl.fmt_axis_bytes(v, div, unit)
    styles = [Style(color=theme.RUN_COLORS[i % len(theme.RUN_COLORS)]) for i in range(len(runs))]
    for r in range(plot_h):
        parts: list[tuple[str, Style | None]] = [(f"{labels[r]:>5} ┤" if r in labels else "      │", theme.AXIS)]
        for c in range(plot_w):
            b, o = int(raster.bits[r, c]), int(raster.owner[r, c])
            parts.append((chr(tl.BRAILLE_BASE + b) if b else " ", styles[o] if o >= 0 else None))
        rows.append(strip(parts, width))
    if by_step:
        ticks_x = tl.nice_ticks(0.0, x1, max(plot_w // 10, 2))
        text = tl.label_row(ticks_x, [f"{v:g}" for v in ticks_x], 0.0, x1, plot_w)
    else:
        ticks_x = tl.time_ticks(0.0, x1, max(plot_w // 12, 2))
        text = tl.label_row(ticks_x, [tl.fmt_clock(v) for v in ticks_x], 0.0, x1, plot_w)
    rows.append(strip([(" " * GUTTER, None), (text, theme.AXIS)], width))
    return rows[:height]


def bar_lines(runs: list[RunData], width: int) -> list[Strip]:
    """Each run's categories at its peak phase, as stacked bars on one scale."""
    head: list[tuple[str, Style | None]] = [("at the peak phase  ", theme.BOLD)]
    for cat, color in theme.CATEGORIES:
        head += [("■", Style(color=color)), (f"{cat} ", None)]
    rows = [strip(head, width)]
    peaks = [r.peak_phase() for r in runs]
    totals = [sum(int(p.get(c) or 0) for c, _ in theme.CATEGORIES) if p else 0 for p in peaks]
    scale = max(totals + [1])
    name_w = min(max((len(r.name) for r in runs), default=8), 24) + 5
    bar_w = max(width - name_w - 12, 4)
    for i, (run, p) in enumerate(zip(runs, peaks, strict=True)):
        color = theme.RUN_COLORS[i % len(theme.RUN_COLORS)]
        parts: list[tuple[str, Style | None]] = [
            (f"{i + 1}. {run.name[: name_w - 5]:<{name_w - 3}}", Style(color=color))
        ]
        if p is None:
            parts.append(("no phases recorded", theme.DIM))
        else:
            vals = [int(p.get(c) or 0) for c, _ in theme.CATEGORIES]
            for n, (_, c) in zip(tl.stack_cells(vals, scale, bar_w), theme.CATEGORIES, strict=True):
                if n:
                    parts.append(("█" * n, Style(color=c)))
            parts.append(
                (" " * (bar_w - sum(tl.stack_cells(vals, scale, bar_w))) + f" {fmt_bytes(totals[i]):>10}", None)
            )
        rows.append(strip(parts, width))
    return rows


class CompareBars(LinesWidget):
    DEFAULT_CSS = "CompareBars { height: auto; }"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.runs: list[RunData] = []

    def show(self, runs: list[RunData]) -> None:
        self.runs = runs
        self.styles.height = len(runs) + 1
        self.set_data(tuple(id(r) for r in runs))

    def build(self, width: int, height: int) -> list[Strip]:
        return bar_lines(self.runs, width)[:height]


def module_diff_lines(
    runs: list[RunData], bounds: list[Boundary | None], diffs: list[ModuleDiff], width: int
) -> list[Strip]:
    """Per module (tree order, indented): each run's total in its colour, then what changed against run 1 per
    category (``acts −700.00 KiB``); unchanged modules dimmed. Pure, for tests."""
    if bounds and bounds[0] is not None and all(b == bounds[0] for b in bounds):
        where = f"{bounds[0].label()} in every run"
    else:
        where = " · ".join(f"{i + 1}. {b.label() if b else 'none'}" for i, b in enumerate(bounds))
    rows = [strip([("per module  ", theme.BOLD), (f"at {where}; changes against run 1", theme.DIM)], width)]
    # Names come from a file: made printable before they are measured (a control character becomes two cells,
    # an escape sequence none), and measured in cells (a wide character takes two).
    names = [one_line("  " * d.depth + d.name) for d in diffs]
    name_w = min(max((cell_len(n) for n in names), default=8) + 2, max(width // 3, 16))
    col_w = 12
    for d, name in zip(diffs, names, strict=True):
        dim = not d.changed
        name = name if cell_len(name) < name_w else set_cell_size(name, name_w - 2) + "…"
        parts: list[tuple[str, Style | None]] = [(set_cell_size(name, name_w), theme.DIM if dim else None)]
        for i in range(len(runs)):
            v = d.value(i, "total")
            color = theme.RUN_COLORS[i % len(theme.RUN_COLORS)]
            parts.append((f"{fmt_bytes(v) if v is not None else '—':>{col_w - 1}} ", Style(color=color, dim=dim)))
        parts.append((" " + module_changes(d, len(runs)), theme.DIM if dim else theme.BOLD))
        rows.append(strip(parts, width))
    return rows


class CompareModules(LinesWidget):
    """The per-module differences; hidden when no run recorded per-module figures."""

    DEFAULT_CSS = "CompareModules { height: auto; }"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.runs: list[RunData] = []
        self.bounds: list[Boundary | None] = []
        self.diffs: list[ModuleDiff] = []

    def show(self, runs: list[RunData]) -> None:
        self.runs = runs
        self.bounds, self.diffs = run_module_diffs(runs)
        self.display = bool(self.diffs)
        self.styles.height = len(self.diffs) + 1
        self.set_data(tuple(id(r) for r in runs))

    def build(self, width: int, height: int) -> list[Strip]:
        return module_diff_lines(self.runs, self.bounds, self.diffs, width)[:height]


class CompareTimeline(LinesWidget):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.runs: list[RunData] = []
        self.metric = "alloc"
        self.by_step = False

    def show(self, runs: list[RunData], metric: str, by_step: bool) -> None:
        self.runs, self.metric, self.by_step = runs, metric, by_step
        self.set_data((tuple(id(r) for r in runs), metric, by_step))

    def build(self, width: int, height: int) -> list[Strip]:
        return overlay_lines(self.runs, self.metric, self.by_step, width, height) if self.runs else []


def default_metric(runs: list[RunData]) -> str:
    """Allocated where every run measured it (GPU runs), else host RSS."""
    for key, _ in METRICS:
        if all(not np.isnan(r.samples.arrays()[_COLUMN[key]]).all() for r in runs if len(r.samples)):
            return key
    return "rss"


class CompareScreen(Screen[Any]):
    BINDINGS = [
        Binding("t", "toggle_align", "time/step"),
        Binding("v", "next_metric", "metric"),
        Binding("m", "export_markdown", "markdown"),
        Binding("x", "export_csv", "CSV"),
        Binding("q,escape", "leave", "back"),
        Binding("question_mark", "help", "help", key_display="?"),
    ]
    export_name = "compare"

    def __init__(self, run_dirs: list[Path], *, standalone: bool = False, runs: list[RunData] | None = None) -> None:
        super().__init__()
        self.run_dirs = run_dirs
        self.standalone = standalone
        self.runs: list[RunData] = runs or []
        self.metric = "alloc"
        self.by_step = False

    def compose(self) -> ComposeResult:
        yield Static("reading runs…", id="compare-status")
        with VerticalScroll(id="compare-body"):
            yield DataTable(id="compare-table", zebra_stripes=True, cursor_type="row")
            yield CompareBars(id="compare-bars")
            yield CompareModules(id="compare-modules")
            yield CompareTimeline(id="compare-timeline")
        yield Footer()

    def on_mount(self) -> None:
        if self.runs:
            self._loaded(self.runs)
        else:
            self._load()

    @work(thread=True, exclusive=True)
    def _load(self) -> None:
        try:
            runs = [load_run(p) for p in self.run_dirs]
        except ProfileError as e:
            self.app.call_from_thread(self._failed, str(e))
            return
        self.app.call_from_thread(self._loaded, runs)

    def _failed(self, message: str) -> None:
        self.query_one("#compare-status", Static).update(
            Text.assemble(("cannot compare:", "bold red"), " ", one_line(message))
        )

    def _loaded(self, runs: list[RunData]) -> None:
        self.runs = runs
        self.metric = default_metric(runs)
        table = self.query_one(DataTable)
        table.clear(columns=True)
        table.add_column("", key="label")
        for i, r in enumerate(runs):
            table.add_column(
                Text(
                    f"{i + 1}. {one_line(r.name)[:26]}",
                    style=Style(color=theme.RUN_COLORS[i % len(theme.RUN_COLORS)], bold=True),
                )
            )
        for cells in table_cells(runs):
            table.add_row(*cells)
        self.query_one(CompareBars).show(runs)
        self.query_one(CompareModules).show(runs)
        self._update()

    def _update(self) -> None:
        n = len(self.runs)
        self.query_one("#compare-status", Static).update(
            Text.assemble(
                (f"{n} runs", "bold"),
                "  ★ best of the row · (±%) against the first run · — not measured on that device",
            )
        )
        self.query_one(CompareTimeline).show(self.runs, self.metric, self.by_step)

    def action_toggle_align(self) -> None:
        self.by_step = not self.by_step
        self._update()

    def action_next_metric(self) -> None:
        keys = [k for k, _ in METRICS]
        self.metric = keys[(keys.index(self.metric) + 1) % len(keys)]
        self._update()

    def _export(self, fmt: str) -> None:
        if not self.runs:
            return
        try:
            path = export_compare(self.runs, fmt, getattr(self.app, "export_dir", None))
        except OSError as e:
            self.notify(f"could not write the file: {e}", severity="error")
            return
        self.notify(f"saved {path}", title=fmt, timeout=6)

    def action_export_markdown(self) -> None:
        self._export("markdown")

    def action_export_csv(self) -> None:
        self._export("csv")

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen("compare", binding_keys(self.BINDINGS) + [("↑/↓", "scroll")]))

    def action_leave(self) -> None:
        self.dismiss(0)
