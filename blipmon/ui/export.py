"""Files the dashboard writes on request: SVG pictures of a view, the compare table as markdown or CSV.

They go to the current directory with a timestamped name, so nothing is ever overwritten.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from blipmon.core.report import render_compare
from blipmon.core.run import RunData


def stamp(now: datetime | None = None) -> str:
    return (now or datetime.now()).strftime("%Y%m%d-%H%M%S")


def export_path(kind: str, ext: str, folder: Path | None = None, now: datetime | None = None) -> Path:
    folder = Path.cwd() if folder is None else folder
    base = folder / f"blipmon-{kind}-{stamp(now)}"
    path, n = base.with_suffix(f".{ext}"), 1
    while path.exists():
        n += 1
        path = folder / f"{base.name}-{n}.{ext}"
    return path


def export_compare(runs: list[RunData], fmt: str, folder: Path | None = None) -> Path:
    """Write the comparison (the same rows as ``blipmon compare --format``) and return where."""
    path = export_path("compare", "md" if fmt == "markdown" else fmt, folder)
    path.write_text(render_compare(runs, fmt), encoding="utf-8")
    return path
