"""Starting and stopping a run from the dashboard: the handle a live view holds.

The run is started through ``blipmon.runner.supervise``, which owns the child and records its exit even
after the dashboard has gone (see that module for why). This handle only talks to the supervisor:
it learns the run directory, asks for a stop, and reads the final exit status if it is still
around to see it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from blipmon.core.errors import LaunchError
from blipmon.core.layout import LOG


class DetachedProcess:
    """A process this dashboard started in its own session (so it outlives the dashboard) and can stop."""

    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        """Its exit status once it has ended, else None."""
        return self.proc.poll()

    def running(self) -> bool:
        return self.proc.poll() is None

    def _terminate(self) -> None:
        """SIGTERM, which blipmon's processes take as "stop and record it"; nothing if it has ended."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


class LiveRun(DetachedProcess):
    """A run this dashboard started: ``run_dir``, ``stop()``, ``poll()``; leaving does not end it."""

    def __init__(self, cfg: dict[str, Any], out: Path | None = None) -> None:
        self.cfg = cfg
        self.stop_requested = False
        req = json.dumps({"config": cfg, "out": str(out) if out is not None else None})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blipmon.runner.supervise"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # no SIGINT/SIGHUP from our terminal: it outlives the dashboard
            close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(req.encode())
            self.proc.stdin.close()
            line = self.proc.stdout.readline().decode("utf-8", "replace").strip()
        except OSError as e:
            raise LaunchError(f"cannot start the run: {e}") from None
        finally:
            self.proc.stdout.close()
        if not line.startswith("run "):
            self.proc.wait()
            raise LaunchError(line[6:] if line.startswith("error ") else "the run could not be started")
        self.run_dir = Path(line[4:])
        self.log_path = self.run_dir / LOG

    def stop(self) -> None:
        """Ask the run to stop; the child records ``stopped`` and the supervisor (whose exit code
        ``poll`` returns: ``blipmon run``'s) its exit."""
        self.stop_requested = True
        self._terminate()
