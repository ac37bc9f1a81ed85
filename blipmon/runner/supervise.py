"""The parent of a run launched from the dashboard: ``python -m blipmon.runner.supervise``.

Why a separate process: the parent of the child is the only process that can learn how it ended
(its exit code or the signal that killed it) and append the ``exit`` record. If that parent were
the dashboard, leaving the dashboard with the run still going would lose that record. So the
dashboard starts this small supervisor in its own session; it runs ``runner.launch.Launch`` and
waits, whatever happens to the dashboard or the terminal.

Protocol: the configuration arrives as JSON on stdin (``{"config": {...}, "out": "DIR" | null}``);
the first line on stdout is ``run <run dir>`` (or ``error <message>``); SIGTERM or SIGINT asks the
child to stop. The exit status is ``blipmon run``'s (``core/outcomes.py``): 0 ok, 1 error, 3 oom, 4 stopped or
killed; 2 when it could not start the run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from blipmon.core.outcomes import EXIT_USAGE


def main() -> int:
    try:
        req = json.loads(sys.stdin.read())
        cfg, out = req["config"], req.get("out")
        from blipmon.runner.launch import Launch

        launch = Launch(cfg, Path(out) if out else None)
    except Exception as e:  # noqa: BLE001 - reported to the dashboard as one line
        print(f"error {type(e).__name__}: {e}", flush=True)
        return EXIT_USAGE

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        launch.stop(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the terminal closing must not end the run
    try:
        launch.start()
    except OSError as e:
        print(f"error cannot start the run: {e}", flush=True)
        return EXIT_USAGE
    print(f"run {launch.run_dir}", flush=True)
    # Nobody may be reading our stdout any more: never write to it again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    return launch.wait()


if __name__ == "__main__":
    sys.exit(main())
