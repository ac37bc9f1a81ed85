"""Helpers for the dashboard tests: driving an app, its screenshots and text, snapshots (recorded runs: tests/recorded.py).

(A module of its own rather than conftest.py, so test modules can import it by a unique name.)
"""

from __future__ import annotations

import asyncio
import difflib
import html
import re
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

SNAPSHOTS = Path(__file__).parent / "snapshots"


_TEXT = re.compile(
    r'<text class="[^"]*" x="([0-9.]+)" y="[0-9.]+" textLength="[0-9.]+" clip-path="url\(#[^)]*-line-(\d+)\)">(.*?)</text>',
    re.S,
)
_UNIQUE_ID = re.compile(r"terminal-\d+")
CHAR_WIDTH = 12.2  # Rich's SVG export: 0.61 of its 20 px font per terminal cell


def screenshot(app: Any) -> str:
    """The screen as Textual's own SVG screenshot (``App.export_screenshot``, the public API), dialogs included.

    The id Rich derives from the content is replaced by a fixed one, so two screenshots of the same screen are
    the same text whatever else the SVG holds.
    """
    return _UNIQUE_ID.sub("terminal", app.export_screenshot())


def svg_text(svg: str, size: tuple[int, int]) -> str:
    """The characters of an SVG screenshot, row by row (trailing spaces dropped): what a person reads on it.

    Rich writes each run of same-styled cells as one ``<text>`` at ``x = column x 12.2`` on the clip path of its
    line; spaces are ``&#160;``.
    """
    width, height = size
    rows = [[" "] * width for _ in range(height)]
    for x, line, content in _TEXT.findall(svg):
        row, col = int(line), round(float(x) / CHAR_WIDTH)
        if row >= height:
            continue
        for ch in html.unescape(content).replace("\xa0", " "):
            if ch == "\n" or col >= width:
                break
            rows[row][col] = ch
            col += 1
    return "\n".join("".join(r).rstrip() for r in rows)


def screen_text(app: Any) -> str:
    """The screen as plain text, row by row, dialogs included (read from ``screenshot``)."""
    return svg_text(screenshot(app), app.size)


def check_snapshot(name: str, svg: str, size: tuple[int, int], update: bool) -> None:
    """Compare a screenshot with tests/ui/snapshots/NAME.svg; only BLIPMON_SNAPSHOT_UPDATE=1 writes it.

    The snapshot is Textual's own SVG (open it in a browser to review it as a picture). A missing file fails: a
    snapshot that wrote itself on first run would pass whatever the screen shows, and a deleted or misnamed one
    would go unnoticed. Making one is deliberate: run the test with BLIPMON_SNAPSHOT_UPDATE=1, look at the
    picture, commit it. A difference is reported as the lines of text that changed (or, when only colours or
    styles did, as that), with where both pictures are.
    """
    path = SNAPSHOTS / f"{name}.svg"
    if update:
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(svg, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(
            f"no snapshot {path}: to create it, run this test with BLIPMON_SNAPSHOT_UPDATE=1, look at the picture "
            "(open the .svg in a browser) and commit it (docs/testing.md)",
            pytrace=False,
        )
    expected = path.read_text(encoding="utf-8")
    if svg == expected:
        return
    got = Path(tempfile.gettempdir()) / f"blipmon-snapshot-{name}.svg"
    got.write_text(svg, encoding="utf-8")
    diff = "\n".join(
        difflib.unified_diff(
            svg_text(expected, size).splitlines(), svg_text(svg, size).splitlines(), "snapshot", "now", lineterm=""
        )
    )
    what = diff or "the same text in other colours or styles"
    pytest.fail(
        f"{name} differs from {path} (the screen now: {got}); if the change is intended, look at both pictures and "
        f"rerun with BLIPMON_SNAPSHOT_UPDATE=1:\n{what}",
        pytrace=False,
    )


def drive(app: Any, script: Callable[[Any], Awaitable[None]], size: tuple[int, int] = (80, 24)) -> Any:
    """Run ``app`` headless at ``size``, let ``script`` drive it through a Pilot, return the app's result."""

    async def main() -> Any:
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await script(pilot)
        return app.return_value

    return asyncio.run(main())


PATIENCE_S = 240.0  # only a guard against hanging; nothing asserts how fast anything happened


async def wait_until(pilot: Any, cond: Callable[[], bool], what: str, timeout: float = PATIENCE_S) -> None:
    """Let the app run until ``cond()`` holds; fail with the screen's text if it never does."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}\n{screen_text(pilot.app)}")
        await pilot.pause(0.1)


def compared(app: Any) -> bool:
    """The compare view is up with its table filled in."""
    from textual.widgets import DataTable

    from blipmon.ui.compare import CompareScreen

    screen = app.screen
    return (
        isinstance(screen, CompareScreen)
        and bool(screen.query(DataTable))
        and screen.query_one(DataTable).row_count > 0
    )
