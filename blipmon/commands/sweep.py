"""``blipmon sweep CONFIG... [--set K=V]... [--out DIR] [--format table|markdown|csv|json] [--live]``.

Every configuration is resolved and validated before anything starts: a typo in the fifth file
should cost a second, not the four runs before it (exit 2, nothing run). Then each runs in a fresh
child, one after another (``runner/sweep.py``), and the comparison of them all is printed at the end.
``--live`` opens the dashboard's sweep view instead, which starts this same command as a detached
child with the hidden ``--announce`` flag (``runner/sweep_control.py``: ``LiveSweep``).

Exit code (``core/outcomes.py``): 0 when every run is ``ok``; otherwise the most severe outcome, in this
order: 4 stopped or killed > 1 error > 3 out of memory > 2 refused. docs/sweeps.md has the rest.
"""

from __future__ import annotations

import argparse
import sys

from blipmon.core.config import ConfigError
from blipmon.core.formats import FORMATS


def run(args: argparse.Namespace) -> int:
    from blipmon.core.outcomes import EXIT_STOPPED, sweep_exit_code
    from blipmon.core.report import render_compare
    from blipmon.core.sweep import expand, sweep_label, table_runs
    from blipmon.runner.sweep import AnnouncingProgress, run_sweep

    fmt = getattr(args, "format", None) or "table"
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    sources = list(args.configs)
    overrides = list(getattr(args, "overrides", None) or [])
    entries = expand(sources, overrides)  # with --live too: a typo is exit 2 before the dashboard opens
    if getattr(args, "live", False):
        from blipmon.ui.app import run_sweep_live

        return run_sweep_live(sources, overrides, getattr(args, "out", None), fmt)
    progress = AnnouncingProgress(len(entries)) if getattr(args, "announce", False) else None
    sweep_dir, entries = run_sweep(entries, getattr(args, "out", None), sweep_label(sources), progress)
    runs = table_runs(entries)
    if runs:
        sys.stdout.write(render_compare(runs, fmt))
        sys.stdout.flush()
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.status] = counts.get(e.status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    print(f"blipmon: sweep done ({summary}); runs in {sweep_dir}", file=sys.stderr)
    return sweep_exit_code([e.code for e in entries] + ([EXIT_STOPPED] if counts.get("not run") else []))
