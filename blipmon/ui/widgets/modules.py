"""The run view's module view: the model's modules as an expandable tree, each with a stacked bar of params,
grads, optimizer state and activations at one phase boundary, largest first, the prediction beside (issue 12).

Drawn line by line from ``ModulePanel`` (core/module_view.py), which the screen builds from its snapshot: the
figures, the order and the depth are the ones ``blipmon show --modules`` prints. Module names come from the
profile, so they go out as plain segments through ``strip`` (``one_line``), never as markup.

All bars share one scale, the largest total shown (measured or predicted): the root's, so a module's bar is its
share of the model. ``▏`` marks a module's predicted total where the run saved a per-module prediction.
"""

from __future__ import annotations

import textwrap
from typing import Any

from rich.cells import cell_len, set_cell_size
from rich.style import Style
from textual.strip import Strip

from blipmon.core import timeline as tl
from blipmon.core.module_view import NO_MODULES, ModuleNode, ModulePanel
from blipmon.core.modules import MODULE_CATEGORIES
from blipmon.core.safe_text import one_line
from blipmon.core.units import fmt_bytes
from blipmon.ui import theme
from blipmon.ui.widgets.base import LinesWidget, strip

COLORS = dict(theme.CATEGORIES)
PREDICTED_MARK = "▏"
_PRED_STYLE = Style(color="#ffffff", bold=True)
_CURSOR = Style(reverse=True)
NAME_MIN = 14
TOTAL_W = 11  # " 999.99 MiB"
PRED_W = 24  # " pred 999.99 MiB +99.9%"
HINT = ", . boundary  ↑ ↓ module  enter open/close  m timeline"
_OOM = Style(color=theme.CAPACITY_COLOR, bold=True)


def _name(n: ModuleNode, panel: ModulePanel) -> str:
    """The name cell as displayed: ``one_line`` here, before its width is measured, not later in ``strip``
    (an escape sequence removed or a control character shown as ``^X`` would change its width after the
    column was laid out, and shift the bars after it)."""
    mark = ("▾ " if n.path in panel.expanded else "▸ ") if n.path in panel.openable else "  "
    return "  " * n.depth + mark + one_line(n.label)


def _pred_text(n: ModuleNode) -> str:
    p = n.predicted
    if p is None:
        return " pred —"
    err = "" if not n.total else f" {(p.total - n.total) / n.total * 100:+.1f}%"
    return f" pred {fmt_bytes(p.total)}{err}"


def _fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal cells (``…`` where cut), then padded to exactly ``width``: measured in
    cells, so a wide character (``视觉``, two cells) cannot push the bars out of their column."""
    if cell_len(text) > width:
        text = set_cell_size(text, max(width - 1, 0)) + "…" if width > 0 else ""
    return set_cell_size(text, width)


def module_lines(panel: ModulePanel | None, cursor: str | None, width: int, height: int) -> list[Strip]:
    """Rows of the module view; pure, for tests. ``cursor``: the path of the highlighted module."""
    head: list[tuple[str, Style | None]] = [("modules ", theme.BOLD)]
    if panel is None or panel.boundary is None:
        rows = [strip(head, width)]
        rows += [strip([(f"  {line}", theme.DIM)], width) for line in textwrap.wrap(NO_MODULES, max(width - 2, 10))]
        return rows[:height]
    b = panel.boundary
    head.append((f"{b.label()} ", theme.BOLD))
    how = "following" if panel.following else "chosen"
    head.append((f"({how} {panel.position + 1}/{panel.count}) ", theme.DIM))
    for cat in MODULE_CATEGORIES:
        head += [("■", Style(color=COLORS[cat])), (f"{cat} ", None)]
    if panel.with_prediction:
        head += [(PREDICTED_MARK, _PRED_STYLE), ("predicted", None)]
    rows = [strip(head, width)]
    if panel.oom:
        rows.append(strip([(f"OOM next, {panel.oom}", _OOM)], width))
    nodes = panel.nodes
    tail = TOTAL_W + (PRED_W if panel.with_prediction and width >= 70 else 0)
    name_w = min(max((cell_len(_name(n, panel)) for n in nodes), default=NAME_MIN) + 1, max(width // 3, NAME_MIN))
    bar_w = max(width - name_w - tail, 4)
    scale = max([n.total for n in nodes] + [n.predicted.total for n in nodes if n.predicted] + [1])
    room = max(height - len(rows), 1)
    at = next((i for i, n in enumerate(nodes) if n.path == cursor), 0)
    top = max(0, min(at - room // 2, len(nodes) - room))
    for i, n in enumerate(nodes[top : top + room], start=top):
        name = _fit(_name(n, panel), name_w - 1) + " "
        style = _OOM if n.path in panel.oom_paths else None
        parts: list[tuple[str, Style | None]] = [(name, style + _CURSOR if style and i == at else _CURSOR if i == at
                                                  else style)]  # fmt: skip
        vals = [getattr(n.row, c) for c in MODULE_CATEGORIES]
        cells = tl.stack_cells(vals, scale, bar_w)
        for k, cat in zip(cells, MODULE_CATEGORIES, strict=True):
            if k:
                parts.append(("█" * k, Style(color=COLORS[cat])))
        used = sum(cells)
        pad = [" "] * (bar_w - used)
        if n.predicted is not None:
            mark = int(round(n.predicted.total / scale * bar_w)) - used - 1
            if 0 <= mark < len(pad):
                pad[mark] = PREDICTED_MARK
        parts.append(("".join(pad), _PRED_STYLE))
        parts.append((f" {fmt_bytes(n.total):>{TOTAL_W - 1}}", None))
        if tail > TOTAL_W:
            parts.append((_pred_text(n), theme.DIM))
        rows.append(strip(parts, width))
    if len(rows) < height:  # room to spare: the keys, which the footer has no room for
        rows += [strip([], width)] * (height - len(rows) - 1) + [strip([(HINT, theme.DIM)], width)]
    return rows[:height]


class ModuleView(LinesWidget):
    """The module view; the screen hands it a ``ModulePanel`` and the cursor's path (``show``)."""

    DEFAULT_CSS = """
    ModuleView { height: 1fr; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.panel: ModulePanel | None = None
        self.cursor: str | None = None

    def show(self, panel: ModulePanel | None, cursor: str | None) -> None:
        self.panel, self.cursor = panel, cursor
        self.set_data((panel, cursor))

    def build(self, width: int, height: int) -> list[Strip]:
        return module_lines(self.panel, self.cursor, width, height)
