"""``blipmon run CONFIG [--set K=V]... [--out DIR] [--live]``: one job in a fresh child; prints the run directory.

Headless, ``blipmon run`` is the child's parent: SIGTERM or SIGHUP to it stop the child, which
records the stop (``runner/launch.py``: ``stop_signals_forwarded_to``). ``--live`` opens the dashboard
on the run instead, started through the supervisor so that leaving the dashboard loses nothing.
Exit codes (``core/outcomes.py``): 0 ok, 1 error, 2 refused before starting, 3 out of memory, 4 stopped
or killed.
"""

from __future__ import annotations

import argparse
import sys

from blipmon.core.errors import ProfileError, UsageError
from blipmon.core.layout import LOG, PROFILES


def run(args: argparse.Namespace) -> int:
    from blipmon.core.config import resolve
    from blipmon.core.run import load_run
    from blipmon.runner.launch import Launch, stop_signals_forwarded_to
    from blipmon.runner.preflight import preflight

    cfg = resolve(args.config, args.overrides)
    preflight(cfg)
    if args.live:
        from blipmon.ui.app import run_live

        return run_live(cfg, args.out)
    try:
        launch = Launch(cfg, args.out)
    except OSError as e:
        where = args.out if args.out is not None else PROFILES
        raise UsageError(f"--out {where}: cannot create the run directory there ({e.strerror or e})") from None
    print(f"blipmon: recording {cfg['name']} into {launch.run_dir}", file=sys.stderr)
    launch.start()
    try:
        with stop_signals_forwarded_to(launch):
            code = launch.wait()
    except KeyboardInterrupt:
        # A Ctrl-C after the child started but before the wait began: the child exists (and got the same
        # Ctrl-C from the terminal), so this is a stopped run like any other: let it record that, then wait.
        launch.stop()
        code = launch.wait()
    try:
        status = load_run(launch.run_dir).status
    except ProfileError as e:  # the child died before it recorded anything: the exit code still stands
        status = f"nothing readable was recorded ({e}); its output is in {launch.run_dir / LOG}"
    print(f"blipmon: {cfg['name']}: {status}; see `blipmon show {launch.run_dir}`", file=sys.stderr)
    print(launch.run_dir)
    return code
