"""``blipmon attach RUN``: the dashboard following a run or a sweep that is still being written.

A run whose ``events.jsonl`` is still empty is accepted (its header comes next); leaving never stops it.
"""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from blipmon.core.sweep import is_sweep_dir

    if is_sweep_dir(args.run, attach=True):
        from blipmon.ui.app import run_sweep_attach

        return run_sweep_attach(args.run)
    from blipmon.ui.app import run_attach

    return run_attach(args.run)
