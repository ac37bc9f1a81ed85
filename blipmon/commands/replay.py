"""``blipmon replay RUN [--speed X]``: the dashboard replaying a saved run, or a finished sweep's queue."""

from __future__ import annotations

import argparse

from blipmon.core.errors import UsageError

# A hundredth of real time (a 1 s step lasts 100 s) to 10,000x (a 28-hour run in 10 s); beyond, a replay is
# either frozen or over before its first frame. The dashboard's own keys step through 0.25x-128x.
MIN_SPEED = 0.01
MAX_SPEED = 10_000.0


def run(args: argparse.Namespace) -> int:
    from blipmon.core.sweep import is_sweep_dir

    if not MIN_SPEED <= args.speed <= MAX_SPEED:  # NaN fails both comparisons
        raise UsageError(
            f"--speed {args.speed:g}: expected a number from {MIN_SPEED:g} to {MAX_SPEED:g} (1 = real time)"
        )
    if is_sweep_dir(args.run):
        from blipmon.ui.app import run_sweep_replay

        return run_sweep_replay(args.run, args.speed)
    from blipmon.ui.app import run_replay

    return run_replay(args.run, args.speed)
