"""A widget drawn line by line from a pure function of (data, width, height), cached until either changes.

Why the line API: a chart is a grid of cells we compute ourselves, so handing Textual ready-made
``Strip`` rows is both the fastest path and the easiest to test (``render_line`` is all there is).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip
from textual.widget import Widget

from blipmon.core.safe_text import one_line


def strip(parts: Iterable[tuple[str, Style | None]], width: int) -> Strip:
    """A row from (text, style) runs, cropped or padded to ``width`` cells.

    Segments go to the terminal as they are (no markup, but no filtering either), and many carry
    text from a profile (a run's name, a GPU's name, a phase), so every run passes through
    ``one_line``: an escape sequence in a name can neither retitle nor clear the user's terminal.
    Text without control characters (all of ours) is passed through untouched.
    """
    segs = [Segment(one_line(text), style) for text, style in parts if text]
    return Strip(segs).crop_extend(0, width, None)


class LinesWidget(Widget):
    """Subclasses implement ``build(width, height) -> list[Strip]``; call ``set_data`` when data changes."""

    DEFAULT_CSS = """
    LinesWidget { height: 1fr; }
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cache: list[Strip] | None = None
        self._cache_key: tuple[Any, ...] = ()
        self.data_key: Any = None

    def set_data(self, key: Any) -> None:
        """Mark the drawing stale when ``key`` (a version number, say) changed; repaint once."""
        if key != self.data_key:
            self.data_key = key
            self._cache = None
            self.refresh()

    def build(self, width: int, height: int) -> list[Strip]:
        raise NotImplementedError

    def render_line(self, y: int) -> Strip:
        width, height = self.size.width, self.size.height
        key = (width, height, self.data_key)
        if self._cache is None or key != self._cache_key:
            self._cache = self.build(width, height) if width > 0 and height > 0 else []
            self._cache_key = key
        if 0 <= y < len(self._cache):
            return self._cache[y]
        return Strip.blank(width)
