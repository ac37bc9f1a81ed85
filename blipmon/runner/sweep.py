"""Running a sweep: every configuration in a fresh child, one after another, with progress on stderr.

This is the loop of seed 002 done for its reader: run each configuration of the lab table, write
down whether it fitted, how long it took and where the memory went, then compare them all. Each
configuration runs in a fresh child (``runner.launch.Launch``), exactly like ``blipmon run``, so one
run's allocator state, leaked tensors or OOM can never colour the next one's numbers.

What goes on after what:

- A configuration that preflight refuses (a GPU preset on a CPU machine, a feature not available
  yet) is reported as ``refused`` in the progress and in the table, and the sweep goes on.
- A run that ends in ``oom`` or ``error`` is recorded and the sweep goes on.
- Ctrl-C (or SIGTERM / SIGHUP to the sweep) stops the current run (it is recorded as ``stopped``),
  skips the rest and still prints the table of what ran. A second one kills the current run.

Layout: ``<out>/<UTC timestamp>-sweep[-group]/<run dir>`` for each run (``iter_run_dirs`` looks one
level down for exactly this), plus ``sweep.json`` (``core/sweep.py``: ``write_sweep_file``), rewritten
when each run starts and ends, so that anyone following the folder (the dashboard's sweep view) sees
the queue move without asking this process anything.

``--announce`` (how the dashboard starts a sweep, ``runner/sweep_control.py``: ``LiveSweep``): the
first line of stdout is ``sweep <dir>`` once the folder exists, then all output goes to
``<dir>/sweep.log``, so the sweep never writes to a dashboard that has gone away.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from blipmon.core.config import ConfigError
from blipmon.core.errors import ProfileError
from blipmon.core.layout import LOG, PROFILES, SWEEP_LOG
from blipmon.core.outcomes import EXIT_STOPPED, SWEEP_EXIT_CODES
from blipmon.core.profile import EventReader
from blipmon.core.report import oom_where
from blipmon.core.run import RunData, load_run
from blipmon.core.sweep import Entry, NotRun, sweep_eta, write_sweep_file
from blipmon.core.units import fmt_bytes, fmt_seconds
from blipmon.runner.launch import STOP_SIGNALS_FROM_OUTSIDE, make_run_dir, signals_handled
from blipmon.runner.preflight import preflight

_POLL_S = 0.5


# -- progress --------------------------------------------------------------------------------------
class Progress:
    """Lines on stderr: one when a run starts and one when it ends, plus a live line on a terminal."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.durations: list[float] = []
        self._live_len = 0

    def _write(self, text: str) -> None:
        self._clear()
        print(text, file=self.stream, flush=True)

    def _clear(self) -> None:
        if self._live_len:
            self.stream.write("\r\x1b[K")
            self._live_len = 0

    def eta(
        self, runs_left: int, current_left: float | None = None, current_elapsed: float | None = None
    ) -> float | None:
        """Seconds left (``sweep_eta`` over the runs finished so far)."""
        return sweep_eta(self.durations, runs_left, current_left, current_elapsed)

    @staticmethod
    def _eta_text(eta: float | None) -> str:
        return "ETA —" if eta is None else f"ETA {fmt_seconds(eta)}"

    def plan(self, sweep_dir: Path, entries: list[Entry]) -> None:
        refused = [e for e in entries if e.refused]
        extra = f", {len(refused)} refused here" if refused else ""
        self._write(f"blipmon: sweep of {len(entries)} configurations into {sweep_dir}{extra}")

    def refused(self, i: int, e: Entry) -> None:
        self._write(f"[{i}/{self.total}] {e.name}: refused: {e.refused}")

    def started(self, i: int, e: Entry, runs_left: int) -> None:
        self._write(f"[{i}/{self.total}] {e.name}: running ({self._eta_text(self.eta(runs_left + 1))} for the sweep)")

    def update(self, i: int, e: Entry, run: RunData, elapsed: float, runs_left: int) -> None:
        if not self.live:
            return
        total = run.plan.get("total_steps")
        done = len(run.steps)
        current_left = None
        step = ""
        if isinstance(total, int) and total > 0:
            step = f", step {done}/{total}"
            if done:
                current_left = elapsed / done * max(total - done, 0)
        elif done:
            step = f", step {done}"
        text = (
            f"[{i}/{self.total}] {e.name}: {run.status}{step}, {fmt_seconds(elapsed)} elapsed, "
            f"{self._eta_text(self.eta(runs_left, current_left, elapsed))}"
        )
        self.stream.write("\r\x1b[K" + text[:200])
        self.stream.flush()
        self._live_len = len(text)

    def finished(self, i: int, e: Entry, runs_left: int) -> None:
        if e.seconds is not None:
            self.durations.append(e.seconds)
        detail = _detail(e)
        left = f"; {runs_left} left, {self._eta_text(self.eta(runs_left))}" if runs_left else ""
        self._write(f"[{i}/{self.total}] {e.name}: {e.status} in {fmt_seconds(e.seconds)}{detail}{left}")

    def note(self, text: str) -> None:
        self._write(text)


class AnnouncingProgress(Progress):
    """``--announce``: say where the sweep is on stdout, then write everything to its ``sweep.log``.

    The dashboard that started this sweep reads that one line to learn the folder, and may be gone
    a minute later; output written to its pipe would then fail (or block). So after the line both
    stdout and stderr are pointed, at the file-descriptor level, at ``sweep.log`` in the folder.
    """

    def plan(self, sweep_dir: Path, entries: list[Entry]) -> None:
        try:
            print(f"sweep {sweep_dir}", flush=True)
        except OSError:  # the dashboard went away before reading it; the sweep goes on regardless
            pass
        try:
            fd = os.open(sweep_dir / SWEEP_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError:
            fd = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self.live = False
        super().plan(sweep_dir, entries)


def _detail(e: Entry) -> str:
    run = e.run
    if run is None or isinstance(run, NotRun):
        if e.status == "stopped":
            return " (while it was starting)"
        return f" (nothing recorded; see {e.run_dir}/{LOG})" if e.run_dir else ""
    if e.status == "oom":
        return f" (out of memory at {oom_where(run)})"
    if e.status == "error":
        msg = str((run.error or {}).get("message", "")).strip().splitlines()
        return f" ({msg[0][:160]}; see {e.run_dir}/{LOG})" if msg else f" (see {e.run_dir}/{LOG})"
    n = len(run.steps)
    steps = f"{n} step{'' if n == 1 else 's'}" if n or run.status == "ok" else ""
    peak = run.headline_peak()
    parts = [p for p in (steps, f"{peak.label} {fmt_bytes(peak.bytes)}" if peak.bytes else "") if p]
    return f" ({', '.join(parts)})" if parts else ""


# -- the sweep -------------------------------------------------------------------------------------
def _run_one(
    i: int,
    e: Entry,
    sweep_dir: Path,
    progress: Progress,
    runs_left: int,
    on_started: Callable[[], None] | None = None,
) -> bool:
    """Run one configuration in a fresh child; returns False when the user interrupted the sweep.

    ``on_started`` runs once the child is started (the sweep file is rewritten then, so a follower
    learns which run directory is the current one).
    """
    from blipmon.runner.launch import Launch  # looked up at each run: tests stand a fake in for it

    launch = Launch(e.cfg, sweep_dir)
    e.run_dir = launch.run_dir
    e.status = "running"
    progress.started(i, e, runs_left)
    t0 = time.monotonic()
    launch.start()
    live = RunData(path=launch.run_dir)
    reader = EventReader(launch.run_dir)
    # A Ctrl-C while the child was being started has already stopped it (Launch handles it, so no
    # KeyboardInterrupt reaches us): it still counts as the user interrupting the sweep.
    interrupts = 1 if getattr(launch, "interrupted", False) else 0
    if interrupts:
        progress.note(f"blipmon: stopping {e.name}; the rest of the sweep is skipped")
    while True:
        try:
            if on_started is not None:  # inside the try: a stop arriving meanwhile still stops the child
                notify, on_started = on_started, None
                notify()
            if launch.poll() is not None:
                break
            time.sleep(_POLL_S)
            try:
                live.extend(reader.poll())
            except ProfileError:
                pass
            progress.update(i, e, live, time.monotonic() - t0, runs_left)
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts == 1:
                progress.note(f"blipmon: stopping {e.name} (Ctrl-C again to kill it); the rest of the sweep is skipped")
                launch.stop(signal.SIGTERM)
            else:
                launch.stop(signal.SIGKILL)
    e.seconds = time.monotonic() - t0
    try:
        e.run = load_run(launch.run_dir)
        e.status = e.run.status if e.run.status in SWEEP_EXIT_CODES else "error"
    except ProfileError:  # the child ended before writing its header (stopped while starting, or broken)
        e.status = "stopped" if interrupts else "killed" if launch.exit_code() == EXIT_STOPPED else "error"
        e.run = NotRun(e.name, e.cfg, e.status)
    return interrupts == 0


def _raise_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _stop_signals_interrupt() -> contextlib.AbstractContextManager[None]:
    """SIGTERM and SIGHUP end the sweep the way Ctrl-C does: the current run is stopped and recorded.

    Without this, a scheduler's ``kill`` or a closed ssh session would kill the sweep and leave its
    current child training, unrecorded and holding the GPU.
    """
    return signals_handled(STOP_SIGNALS_FROM_OUTSIDE, _raise_interrupt)


def run_sweep(
    entries: list[Entry], out: Path | None, label: str = "sweep", progress: Progress | None = None
) -> tuple[Path, list[Entry]]:
    """Preflight every entry, then run the runnable ones in order; returns the sweep folder and the entries."""
    with _stop_signals_interrupt():
        return _run_sweep(entries, out, label, progress)


def _run_sweep(
    entries: list[Entry], out: Path | None, label: str, progress: Progress | None
) -> tuple[Path, list[Entry]]:
    for e in entries:
        try:
            preflight(e.cfg)
        except ConfigError as err:
            e.refused = str(err)
    try:
        sweep_dir = make_run_dir({"name": label}, out)
    except OSError as err:
        where = out if out is not None else PROFILES
        raise ConfigError(f"--out {where}: cannot create the sweep directory there ({err.strerror or err})") from None
    progress = progress or Progress(len(entries))
    started = time.time()
    write_sweep_file(sweep_dir, entries, started, finished=False)  # before plan(): --announce points here
    progress.plan(sweep_dir, entries)
    runnable_left = sum(1 for e in entries if not e.refused)
    interrupted = False
    for i, e in enumerate(entries, 1):
        if interrupted:
            e.status = "not run"
            continue
        if e.refused:
            e.status = "refused"
            progress.refused(i, e)
            continue
        runnable_left -= 1
        interrupted = not _run_one(
            i, e, sweep_dir, progress, runnable_left, lambda: write_sweep_file(sweep_dir, entries, started, False)
        )
        progress.finished(i, e, 0 if interrupted else runnable_left)
        write_sweep_file(sweep_dir, entries, started, finished=False)
    if interrupted:
        progress.note("blipmon: sweep interrupted; " + f"{sum(e.status == 'not run' for e in entries)} not run")
    write_sweep_file(sweep_dir, entries, started, finished=True)
    return sweep_dir, entries
