"""``blipmon show RUN [--modules [--depth N] [--step S] [--phase P]] [--json]``: one run's summary (``--json``: the
fixed JSON summary); of a sweep folder, its table.

A saved prediction is printed beside what was measured. Everything shown comes from the profile, which
is untrusted text: warnings and the prediction's lines are made printable first.

``--modules`` prints one boundary's per-module tree instead (docs/modules-cli.md): the run's peak phase unless
``--step``/``--phase`` choose another, down to ``--depth``; with ``--json``, that boundary's rows as a list of
the summary's fixed ``modules`` objects (plus ``depth`` and, where saved, ``predicted``). A run without module
figures, or a step or phase it did not record, is refused with exit 2 and says what was recorded.
"""

from __future__ import annotations

import argparse
import json
import sys

from blipmon.core.errors import UsageError
from blipmon.core.layout import EVENTS, SWEEP_FILE


def run(args: argparse.Namespace) -> int:
    from blipmon.core.report import render_show, run_warnings
    from blipmon.core.run import load_run
    from blipmon.core.safe_text import printable

    modules = getattr(args, "modules", False)
    chosen = [f"--{k}" for k in ("depth", "step", "phase") if getattr(args, k, None) is not None]
    if chosen and not modules:
        raise UsageError(f"{', '.join(chosen)}: only with --modules (blipmon show RUN --modules {' '.join(chosen)} …)")
    if not (args.run / EVENTS).exists() and (args.run / SWEEP_FILE).is_file():
        if modules:
            raise UsageError(f"{args.run} is a sweep folder: --modules shows one run (blipmon show RUN_DIR --modules)")
        return _show_sweep(args)
    if modules:
        return _show_modules(args)
    # The text needs only the run's index (a few MB read from the end); --json's fixed summary lists every phase.
    run_data = load_run(args.run, summary=not args.json)
    if run_data.oom is not None and run_data.indexed is not None and not args.json:
        # An out-of-memory outcome lists the modules of the last boundary before it: records the index leaves out.
        run_data = load_run(args.run)
    for w in run_warnings(run_data):
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


def _show_modules(args: argparse.Namespace) -> int:
    """``show --modules``: one boundary's tree, as a table or (``--json``) as a list of the summary's objects."""
    from blipmon.core.module_view import (
        NO_MODULES,
        boundary_tree,
        check_depth,
        select_boundary,
        tree_json,
        walk,
    )
    from blipmon.core.report import render_modules
    from blipmon.core.run import load_run
    from blipmon.core.safe_text import printable

    check_depth(args.depth)
    run_data = load_run(args.run)  # module records are not in the run index: the whole file is read
    for w in run_data.warnings:
        print(f"blipmon: warning: {printable(w)}", file=sys.stderr)
    bad = run_data.modules.unreadable()
    if not run_data.modules:
        # Records there but unreadable are damage: saying "attribution was off" would send the user to a setting.
        raise UsageError(
            f"{args.run}: no per-module figures could be read: {bad}" if bad else f"{args.run}: {NO_MODULES}"
        )
    if bad:
        print(f"blipmon: warning: {printable(args.run)}: {bad}", file=sys.stderr)
    peak = run_data.peak_phase()
    b = select_boundary(run_data.modules, peak, step=args.step, phase=args.phase)
    nodes = walk(boundary_tree(run_data.modules, b, run_data.prediction), max_depth=args.depth)
    if args.json:
        print(json.dumps(tree_json(nodes), indent=1))
        return 0
    if args.step is not None or args.phase is not None:
        why = "as asked"
    elif peak is not None and (b.rank, b.step, b.micro_step, b.phase) == (
        peak.get("rank") or 0,
        peak.get("step"),
        peak.get("micro_step") or 0,
        peak.get("phase"),
    ):
        why = "the run's peak phase"
    else:
        why = "the last boundary recorded: the peak phase has no module figures"
    sys.stdout.write(render_modules(run_data, b, nodes, why))
    return 0
