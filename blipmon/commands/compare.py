"""``blipmon compare RUN... [--modules] [--format table|markdown|csv|json] [--tui]``: runs side by side (``core/report.py``).

``--modules``: the per-module differences (docs/modules-cli.md): JSON gains a ``modules`` key, the text formats
print the module comparison in place of the table.
"""

from __future__ import annotations

import argparse
import sys

from blipmon.core.errors import UsageError

MAX_TUI_RUNS = 6  # the compare view's columns; the text formats take any number


def run(args: argparse.Namespace) -> int:
    from blipmon.core.report import render_compare, run_warnings
    from blipmon.core.run import load_run
    from blipmon.core.safe_text import printable

    if len(args.runs) > MAX_TUI_RUNS and args.tui:
        raise UsageError(f"the compare view shows 2 to {MAX_TUI_RUNS} runs")
    modules = getattr(args, "modules", False)
    # Every figure of the comparison is in a run's index: a million-sample profile is compared without its samples.
    # Per-module figures are not (--modules reads the whole files).
    runs = [load_run(p, summary=not modules) for p in args.runs]
    for r in runs:
        for w in run_warnings(r):  # a path or a profile's words: made printable
            print(f"blipmon: warning: {printable(w)}", file=sys.stderr)
    if modules and not any(r.modules for r in runs):
        from blipmon.core.module_view import NO_MODULES

        if any(r.modules.dropped for r in runs):  # damage, not a setting: the warnings above say which run
            raise UsageError("none of these runs has readable per-module figures (see the warnings above)")
        raise UsageError(f"none of these runs has per-module figures ({NO_MODULES})")
    if args.tui:
        from blipmon.ui.app import run_compare

        return run_compare(args.runs)
    sys.stdout.write(render_compare(runs, args.format, modules=modules))
    return 0
