"""Controlling a sweep process: one this dashboard starts (``LiveSweep``) or one started elsewhere (``AttachedSweep``).

Why the dashboard never talks to a sweep: the sweep is an ordinary ``blipmon sweep`` started as a
detached child in its own session (``LiveSweep``), like a run's supervisor (``runner/supervise.py``),
so that leaving the dashboard or closing the terminal never ends it. Everything the view shows is
what that process writes anyway (``sweep.json`` and each run's profile, followed by
``runner/sweep_follow.py``), so nothing is lost when the dashboard goes away.

A sweep the dashboard did not start (``blipmon attach <sweep dir>``, a sweep left running, one
started in another terminal) is known only by the ``pid`` in its ``sweep.json``, and a pid can be
reused once the sweep has ended, so before signalling it (or believing it is alive)
``sweep_process`` checks with psutil that the process on that pid is a ``blipmon ... sweep``
started no later than the sweep itself, on this host.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

from blipmon.core.errors import LaunchError
from blipmon.core.layout import PROFILES, SWEEP_FILE
from blipmon.core.listing import listing_order, real_path
from blipmon.core.sweep import doc_exit_code, read_sweep_file
from blipmon.runner.detached import DetachedProcess


def sweep_command(configs: Sequence[str], overrides: Sequence[str] = (), out: Path | None = None) -> list[str]:
    """The argument list of the detached sweep (never a shell string); ``--`` keeps odd names configs."""
    cmd = [sys.executable, "-m", "blipmon", "sweep", "--out", str(out if out is not None else PROFILES)]
    for item in overrides:
        cmd += ["--set", item]
    return [*cmd, "--announce", "--", *configs]


class LiveSweep(DetachedProcess):
    """A sweep this dashboard started: ``sweep_dir``, ``stop()``, ``poll()``; leaving does not end it.

    Starting blocks until the sweep has validated and preflighted every configuration and made its
    folder (a few seconds: preflight imports torch), so call it from a worker thread in the UI.
    Before that line, the child's stderr goes to a temporary file rather than a pipe: a pipe nobody
    drains could fill and block it, and the file still gives us its error if it refuses to start.
    """

    owned = True

    def __init__(self, configs: Sequence[str], overrides: Sequence[str] = (), out: Path | None = None) -> None:
        self.configs = list(configs)
        self.command = sweep_command(self.configs, overrides, out)
        self.stops = 0
        with tempfile.TemporaryFile() as err:
            try:
                self.proc = subprocess.Popen(
                    self.command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    start_new_session=True,  # no SIGINT/SIGHUP from our terminal: it outlives the dashboard
                    close_fds=True,
                )
            except OSError as e:
                raise LaunchError(f"cannot start the sweep: {e}") from None
            assert self.proc.stdout is not None
            try:
                line = self.proc.stdout.readline().decode("utf-8", "replace").strip()
            finally:
                self.proc.stdout.close()
            if not line.startswith("sweep "):
                code = self.proc.wait()
                err.seek(0)
                lines = [ln.removeprefix("blipmon: ") for ln in err.read().decode("utf-8", "replace").splitlines()]
                message = "\n".join(ln for ln in lines if ln.strip())[-2000:]
                raise LaunchError(message or f"the sweep could not be started (exit {code})")
        self.sweep_dir = Path(line[6:])

    def stop(self) -> None:
        """Stop the sweep as Ctrl-C does: the current run is saved as stopped, the rest skipped.

        A second call kills the current run at once (the sweep's own second-interrupt rule).
        """
        self.stops += 1
        self._terminate()


class SweepControl(Protocol):
    """What the sweep view needs from a sweep process: ``LiveSweep`` (started here) or ``AttachedSweep``."""

    owned: bool  # started by this dashboard: leaving asks whether to stop it
    stops: int

    def poll(self) -> int | None: ...

    def running(self) -> bool: ...

    def stop(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int | None: ...


class NotTheSweep(Exception):
    """The pid in ``sweep.json`` cannot be taken for the sweep: the reason, and whether the sweep is surely gone.

    ``gone`` is False when we simply cannot tell (no pid recorded, another host, no permission): the
    sweep may still be running, so the view keeps following ``sweep.json`` but never signals anything.
    """

    def __init__(self, message: str, *, gone: bool) -> None:
        super().__init__(message)
        self.gone = gone


# A process started this long after the sweep's ``started`` stamp cannot be it (the stamp is taken
# after the sweep's own start-up, so the real one is always older); the slack absorbs clock rounding.
_START_SLACK_S = 2.0


def is_sweep_cmdline(cmdline: Sequence[str]) -> bool:
    """``python -m blipmon sweep ...`` or ``.../bin/blipmon sweep ...``: a ``blipmon`` word, then ``sweep``.

    Requiring ``sweep`` right after the program rather than anywhere keeps out, say, an editor on
    ``blipmon/commands/sweep.py`` or ``blipmon attach profiles/x-sweep``.
    """
    words = list(cmdline)
    return any(os.path.basename(w).startswith("blipmon") and words[i + 1] == "sweep" for i, w in enumerate(words[:-1]))


def sweep_process(doc: dict[str, Any] | None) -> psutil.Process:
    """The live process of the sweep ``doc`` (its ``sweep.json``) describes, or ``NotTheSweep`` saying why not."""
    pid = (doc or {}).get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise NotTheSweep("this sweep's sweep.json names no process", gone=False)
    host = (doc or {}).get("hostname")
    if isinstance(host, str) and host and host != socket.gethostname():
        raise NotTheSweep(f"this sweep runs on {host}, not on this machine: stop it there", gone=False)
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            raise NotTheSweep(f"the sweep (pid {pid}) has ended", gone=True)
        cmdline = proc.cmdline()
        created = proc.create_time()
    except psutil.NoSuchProcess:
        raise NotTheSweep(f"the sweep (pid {pid}) has ended", gone=True) from None
    except psutil.AccessDenied:
        raise NotTheSweep(
            f"pid {pid}: not allowed to check that it is the sweep, so it is not signalled", gone=False
        ) from None
    if not is_sweep_cmdline(cmdline):
        shown = " ".join(cmdline)[:80] or "?"
        raise NotTheSweep(f"pid {pid} is no longer this sweep (it is `{shown}`): nothing was signalled", gone=True)
    started = (doc or {}).get("started")
    if isinstance(started, (int, float)) and created > float(started) + _START_SLACK_S:
        raise NotTheSweep(
            f"pid {pid} started after this sweep did: the sweep has ended and its pid was reused", gone=True
        )
    return proc


def sweep_alive(doc: dict[str, Any] | None) -> bool:
    """Whether the sweep may still be running: False only when its process is surely gone."""
    try:
        sweep_process(doc)
    except NotTheSweep as e:
        return not e.gone
    return True


class AttachedSweep:
    """A sweep started elsewhere (another terminal, a dashboard that left it running), known by its folder.

    Same face as ``LiveSweep`` for the view. It is not our child, so there is no exit status to
    collect: whether it runs comes from the pid in ``sweep.json`` (checked by ``sweep_process``),
    and its exit code from the outcomes recorded there. ``stop()`` sends SIGTERM, which the sweep
    treats as Ctrl-C (the current run saved as stopped, the rest skipped); a second one kills the
    current run. It refuses, with ``NotTheSweep``, to signal a pid that is not this sweep.
    """

    owned = False

    def __init__(self, sweep_dir: Path) -> None:
        self.sweep_dir = Path(sweep_dir)
        self.stops = 0
        self._gone = False

    def doc(self) -> dict[str, Any] | None:
        return read_sweep_file(self.sweep_dir)

    @property
    def pid(self) -> int | None:
        pid = (self.doc() or {}).get("pid")
        return pid if isinstance(pid, int) and not isinstance(pid, bool) else None

    def running(self) -> bool:
        """False once the sweep's process is surely gone (and from then on: a pid never comes back)."""
        if not self._gone:
            self._gone = not sweep_alive(self.doc())
        return not self._gone

    def poll(self) -> int | None:
        return None if self.running() else doc_exit_code(self.doc())

    def stop(self) -> None:
        proc = sweep_process(self.doc())  # raises NotTheSweep: nothing is signalled
        try:
            proc.send_signal(signal.SIGTERM)  # psutil re-checks the pid's start time: never a reused pid
        except psutil.NoSuchProcess:
            raise NotTheSweep("the sweep has ended", gone=True) from None
        self.stops += 1

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running():
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.2)
        return self.poll()


# -- the sweep folders under profiles/ ---------------------------------------------------------------
@dataclass(frozen=True)
class SweepEntry:
    """A sweep folder as the list shows it: running or done, and how its configurations ended."""

    path: Path
    running: bool
    summary: str  # "2 ok · 1 oom · 1 queued"
    started: float


def list_sweeps(root: Path = PROFILES) -> list[SweepEntry]:
    """Sweep folders (with a readable ``sweep.json``) directly under ``root``, newest first.

    Read afresh each time (a ``sweep.json`` is a few hundred bytes), because "still running" can
    change without the file changing: the sweep may die.
    """
    if not root.is_dir():
        return []
    out: list[SweepEntry] = []
    try:
        children = sorted(root.iterdir(), key=listing_order)
    except OSError:
        return []
    seen: set[Path] = set()
    for p in children:
        if not (p / SWEEP_FILE).is_file():
            continue
        real = real_path(p)
        if real in seen:  # a symlink to a folder already listed (or to profiles/ itself)
            continue
        seen.add(real)
        doc = read_sweep_file(p)
        if doc is None:
            continue
        counts: dict[str, int] = {}
        for c in doc["configs"]:
            status = str(c.get("status") or "pending").replace("pending", "queued")
            counts[status] = counts.get(status, 0) + 1
        running = not doc.get("finished") and sweep_alive(doc)
        started = doc.get("started")
        out.append(
            SweepEntry(
                p,
                running,
                " · ".join(f"{n} {st}" for st, n in counts.items()),
                float(started) if isinstance(started, (int, float)) else 0.0,
            )
        )
    out.sort(key=lambda e: (e.started, e.path.name), reverse=True)
    return out
