"""``blipmon compare RUN... [--format table|markdown|csv|json] [--tui]``: runs side by side (``core/report.py``)."""

from __future__ import annotations

import argparse
import sys

from blipmon.core.errors import UsageError

MAX_TUI_RUNS = 6  # the compare view's columns; the text formats take any number


def run(args: argparse.Namespace) -> int:
    from blipmon.core.report import render_compare
    from blipmon.core.run import load_run

    if len(args.runs) > MAX_TUI_RUNS and args.tui:
        raise UsageError(f"the compare view shows 2 to {MAX_TUI_RUNS} runs")
    # Every figure of the comparison is in a run's index: a million-sample profile is compared without its samples.
    runs = [load_run(p, summary=True) for p in args.runs]
    for r in runs:
        for w in r.warnings:
            print(f"blipmon: warning: {w}", file=sys.stderr)
    if args.tui:
        from blipmon.ui.app import run_compare

        return run_compare(args.runs)
    sys.stdout.write(render_compare(runs, args.format))
    return 0
