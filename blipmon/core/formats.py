"""The formats a comparison is written in (``compare --format``, ``sweep --format``; ``core/report.py`` writes them).

A module of its own, importing nothing, so the command line can offer them without loading the report's
dependencies (numpy) for every command.
"""

from __future__ import annotations

FORMATS = ("table", "markdown", "csv", "json")

__all__ = ["FORMATS"]
