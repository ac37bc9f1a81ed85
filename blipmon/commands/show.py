"""``blipmon show RUN [--json]``: one run's summary (``--json``: the fixed JSON summary); of a sweep folder, its table.

A saved prediction is printed beside what was measured. Everything shown comes from the profile, which
is untrusted text: warnings and the prediction's lines are made printable first.
"""

from __future__ import annotations

import argparse
import json
import sys

from blipmon.core.layout import EVENTS, SWEEP_FILE


def run(args: argparse.Namespace) -> int:
    from blipmon.core.report import render_show
    from blipmon.core.run import load_run
    from blipmon.core.safe_text import printable

    if not (args.run / EVENTS).exists() and (args.run / SWEEP_FILE).is_file():
        return _show_sweep(args)
    # The text needs only the run's index (a few MB read from the end); --json's fixed summary lists every phase.
    run_data = load_run(args.run, summary=not args.json)
    for w in run_data.warnings:
        print(f"blipmon: warning: {printable(w)}", file=sys.stderr)
    if args.json:
        print(json.dumps(run_data.summary(), indent=1))  # json escapes every control character itself
        return 0
    sys.stdout.write(render_show(run_data))
    if isinstance(run_data.prediction, dict) and run_data.prediction.get("phases"):
        from blipmon.core.units import GIB
        from blipmon.estimate import predicted_vs_measured, render_predicted_vs_measured, render_verdict_line

        rows = predicted_vs_measured(run_data.prediction, run_data.summary())
        unit = "GiB" if any((r["predicted"] or 0) >= GIB for r in rows) else "MiB"
        # The saved prediction is read from the profile: its text is as untrusted as the rest.
        sys.stdout.write(printable(render_predicted_vs_measured(rows, unit=unit)))
        on_gpu = run_data.environment.get("device") == "cuda"
        sys.stdout.write(printable(render_verdict_line(run_data.prediction, on_gpu=on_gpu, oom=run_data.oom)))
    return 0


def _show_sweep(args: argparse.Namespace) -> int:
    """``show`` on a sweep folder: the comparison its sweep printed at the end, from its recorded runs."""
    from blipmon.core.report import render_compare
    from blipmon.core.sweep import load_sweep_runs

    runs = load_sweep_runs(args.run)
    if not runs:
        print(f"blipmon: {args.run}: a sweep with no recorded runs yet", file=sys.stderr)
        return 0
    sys.stdout.write(render_compare(runs, "json" if args.json else "table"))
    return 0
