"""Colours and labels shared by every view, so a series looks the same on every screen."""

from __future__ import annotations

from rich.style import Style

# Memory series, in drawing order (later ones are drawn over earlier ones).
SERIES = (
    ("rss", "host RSS", "#87d787"),
    ("dev", "device used", "#ffaf5f"),
    ("res", "reserved", "#af87ff"),
    ("alloc", "allocated", "#5fafff"),
)
CAPACITY_COLOR = "#ff5f5f"

CATEGORIES = (
    ("params", "#5fafff"),
    ("grads", "#d787d7"),
    ("optim", "#ffd75f"),
    ("acts", "#87d787"),
    ("other", "#8a8a8a"),
)

ACTIVITY_COLORS = {
    "load": "#5f8787",
    "forward": "#5fafff",
    "backward": "#d787d7",
    "optimizer": "#ffd75f",
    "data": "#585858",
}

# Up to six runs in a comparison.
RUN_COLORS = ("#5fafff", "#ffaf5f", "#87d787", "#d787d7", "#ffd75f", "#5fd7d7")

STATUS_COLORS = {
    "running": "#5fafff",
    "starting": "#5fafff",
    "ok": "#87d787",
    "oom": "#ff5f5f",
    "error": "#ff5f5f",
    "stopped": "#ffd75f",
    "killed": "#ff8700",
}

DIM = Style(color="#808080")
AXIS = Style(color="#6c6c6c")
BOLD = Style(bold=True)


def fg(color: str, **kw: bool) -> Style:
    return Style(color=color, **kw)


def status_style(status: str) -> Style:
    return Style(color=STATUS_COLORS.get(status, "#d0d0d0"), bold=True)
