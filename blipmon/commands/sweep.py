"""``blipmon sweep CONFIG... [--out DIR] [--format table|markdown|csv|json]``: a table of runs, one after another.

This is the loop of seed 002 done for its reader: run each configuration of the lab table, write
down whether it fitted, how long it took and where the memory went, then compare them all. Each
configuration runs in a fresh child (``runner.launch.Launch``), exactly like ``blipmon run``, so one
run's allocator state, leaked tensors or OOM can never colour the next one's numbers.

What goes on after what:

- Every configuration is resolved and validated before anything starts: a typo in the fifth file
  should cost a second, not the four runs before it (exit 2, nothing run).
- A configuration that preflight refuses (a GPU preset on a CPU machine, a feature not available
  yet) is reported as ``refused`` in the progress and in the table, and the sweep goes on.
- A run that ends in ``oom`` or ``error`` is recorded and the sweep goes on.
- Ctrl-C (or SIGTERM / SIGHUP to the sweep) stops the current run (it is recorded as ``stopped``),
  skips the rest and still prints the table of what ran. A second one kills the current run.

Layout: ``<out>/<UTC timestamp>-sweep[-group]/<run dir>`` for each run (``iter_run_dirs`` looks one
level down for exactly this), plus ``sweep.json`` listing every configuration with its status,
exit code and run directory (refused ones included), rewritten when each run starts and ends, so
that anyone following the folder (the dashboard's sweep view) sees the queue move without asking
this process anything. It also holds this process's ``pid`` and ``hostname``: ``blipmon attach
<sweep dir>`` uses them to tell a sweep still going from one that died, and to stop it (SIGTERM, as
Ctrl-C) after checking that the pid is still this sweep.

``--live`` opens the dashboard's sweep view instead (``blipmon.ui.sweep``), which starts this same
command as a detached child with the hidden ``--announce`` flag: that child prints ``sweep <dir>``
as its first line of stdout once the folder exists, then sends all its output to
``<dir>/sweep.log``, so it never writes to a dashboard that has gone away.

Exit code: 0 when every run is ``ok``; otherwise the most severe outcome, in this order:
4 stopped or killed > 1 error > 3 out of memory > 2 refused. (Numerically these are ``blipmon
run``'s codes; the order puts "something is broken" above "it did not fit" above "not for this
machine".)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from blipmon.core import presets
from blipmon.core.config import ConfigError, is_run_dir, resolve
from blipmon.core.profile import EventReader, ProfileError
from blipmon.core.report import oom_where, render_compare
from blipmon.core.run import RunData, load_run
from blipmon.core.units import fmt_bytes, fmt_seconds

FORMATS = ("table", "markdown", "csv", "json")
SWEEP_FILE = "sweep.json"
SWEEP_LOG = "sweep.log"  # the progress and the table of a sweep started with --announce (by the dashboard)
EXIT_CODES = {"ok": 0, "error": 1, "refused": 2, "oom": 3, "stopped": 4, "killed": 4}
# Most severe first: an interrupted sweep, then a broken run, then one that did not fit, then one not for this machine.
SEVERITY = (4, 1, 3, 2)
_POLL_S = 0.5


@dataclass
class Entry:
    """One configuration of the sweep and what became of it."""

    source: str  # the CONFIG argument it came from (a preset, a group, a file or a folder)
    cfg: dict[str, Any]
    refused: str | None = None  # preflight's reason, when it will not run here
    status: str = "pending"  # pending | running | refused | not run | a run status
    run_dir: Path | None = None
    seconds: float | None = None
    run: RunData | None = None

    @property
    def name(self) -> str:
        return str(self.cfg.get("name", "run"))

    @property
    def code(self) -> int | None:
        return EXIT_CODES.get(self.status)


class NotRun(RunData):
    """A table column for a configuration that has no run directory (refused, or its child wrote nothing)."""

    def __init__(self, name: str, cfg: dict[str, Any], label: str) -> None:
        super().__init__(header={"name": name}, config=cfg, environment={"device": ""})
        self.label = label

    @property
    def status(self) -> str:  # type: ignore[override]
        return self.label

    def peaks(self) -> dict[str, int | None]:
        # Nothing was measured: every figure is "—", host RSS included (RunData says 0 for a run without samples).
        return {"allocated": None, "reserved": None, "device_used": None, "host_rss": None}


def sweep_eta(
    durations: list[float], runs_left: int, current_left: float | None = None, current_elapsed: float | None = None
) -> float | None:
    """Seconds left: the current run's estimate plus the mean finished run for each one still to start.

    A current run with no step yet (still loading) is assumed to take the mean run (``current_elapsed``
    is how long it has run so far). One function for the terminal progress and the dashboard's queue,
    so both say the same ETA.
    """
    mean = sum(durations) / len(durations) if durations else None
    if current_left is None and current_elapsed is not None and mean is not None:
        current_left = max(mean - current_elapsed, 0.0)
    if runs_left == 0 and current_left is None:
        return None if current_elapsed is not None else 0.0
    if mean is None:
        return current_left if runs_left == 0 else None
    return (current_left or 0.0) + mean * runs_left


def sweep_exit_code(codes: list[int | None]) -> int:
    """0 if all ok, else the most severe code present (see the module docstring)."""
    present = {c for c in codes if c}
    for code in SEVERITY:
        if code in present:
            return code
    return 0


# -- expanding CONFIG arguments --------------------------------------------------------------------
def expand(sources: list[str], overrides: list[str] | None = None) -> list[Entry]:
    """Presets, groups (``h100/``), TOML files and folders of TOML files -> validated configurations.

    All errors are collected and raised together, naming each argument, so one edit fixes them all.
    """
    entries: list[Entry] = []
    errors: list[str] = []
    for src in sources:
        try:
            names = _names_for(src)
        except ConfigError as e:
            errors.append(str(e))
            continue
        for name in names:
            try:
                entries.append(Entry(source=src, cfg=resolve(name, overrides or [])))
            except ConfigError as e:
                errors.append(f"{name}: {e}" if name not in str(e) else str(e))
    if errors:
        raise ConfigError("the sweep was not started:\n  " + "\n  ".join(errors))
    if not entries:
        raise ConfigError("the sweep has no configurations")
    return entries


def _names_for(src: str) -> list[str]:
    """What one CONFIG argument stands for: itself (a preset, a file, a run), a folder's TOML files, or a group."""
    if presets.exists(src):
        return [src]
    path = Path(src)
    if is_run_dir(path):  # a saved run: its configuration again
        return [src]
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.toml"))
        if not files:
            raise ConfigError(f"{src}: a folder with no .toml configuration in it")
        return files
    group = presets.group(src) if not src.endswith(".toml") else []
    if group:
        return group
    if src.endswith("/"):
        groups = ", ".join(g + "/" for g in presets.GROUPS)
        raise ConfigError(f"{src!r}: neither a folder nor a preset group (groups: {groups})")
    return [src]  # a preset or a file: resolve() says what is wrong with it


def _label(sources: list[str]) -> str:
    groups = [s.rstrip("/") for s in sources if not presets.exists(s) and presets.group(s) and not Path(s).is_dir()]
    if groups and len(groups) == len(sources):
        return "sweep-" + "-".join(dict.fromkeys(g.replace("/", "-") for g in groups))
    return "sweep"


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
        return f" (nothing recorded; see {e.run_dir}/child.log)" if e.run_dir else ""
    if e.status == "oom":
        return f" (out of memory at {oom_where(run)})"
    if e.status == "error":
        msg = str((run.error or {}).get("message", "")).strip().splitlines()
        return f" ({msg[0][:160]}; see {e.run_dir}/child.log)" if msg else f" (see {e.run_dir}/child.log)"
    n = len(run.steps)
    steps = f"{n} step{'' if n == 1 else 's'}" if n or run.status == "ok" else ""
    peaks = run.peaks()
    peak = peaks["allocated"] if peaks["allocated"] is not None else peaks["host_rss"]
    what = "peak allocated" if peaks["allocated"] is not None else "peak host RSS"
    parts = [p for p in (steps, f"{what} {fmt_bytes(peak)}" if peak else "") if p]
    return f" ({', '.join(parts)})" if parts else ""


# -- the sweep -------------------------------------------------------------------------------------
def _write_sweep_file(sweep_dir: Path, entries: list[Entry], started: float, finished: bool) -> None:
    doc = {
        "format_version": 1,
        "started": started,
        "finished": finished,
        "ended": time.time() if finished else None,
        "pid": os.getpid(),  # so a follower can tell a sweep that died (SIGKILL) from one still going
        # ... and so `blipmon attach` on another machine (a shared disk) never reads this pid as one of its own
        "hostname": socket.gethostname(),
        "configs": [
            {
                "name": e.name,
                "source": e.source,
                "status": e.status,
                "exit_code": e.code,
                "run_dir": e.run_dir.name if e.run_dir else None,
                "seconds": e.seconds,
                "reason": e.refused,
            }
            for e in entries
        ],
    }
    tmp = sweep_dir / (SWEEP_FILE + ".tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, sweep_dir / SWEEP_FILE)
    except OSError as e:  # the runs themselves are what matters; say so and go on
        print(f"blipmon: could not write {sweep_dir / SWEEP_FILE}: {e}", file=sys.stderr)


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
    from blipmon.runner.launch import Launch

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
        e.status = e.run.status if e.run.status in EXIT_CODES else "error"
    except ProfileError:  # the child ended before writing its header (stopped while starting, or broken)
        e.status = "stopped" if interrupts else "killed" if launch.exit_code() == 4 else "error"
        e.run = NotRun(e.name, e.cfg, e.status)
    return interrupts == 0


def _raise_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the sweep the way Ctrl-C does: the current run is stopped and recorded.

    Without this, a scheduler's ``kill`` or a closed ssh session would kill the sweep and leave its
    current child training, unrecorded and holding the GPU.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_sweep(
    entries: list[Entry], out: Path | None, label: str = "sweep", progress: Progress | None = None
) -> tuple[Path, list[Entry]]:
    """Preflight every entry, then run the runnable ones in order; returns the sweep folder and the entries."""
    with _stop_signals_interrupt():
        return _run_sweep(entries, out, label, progress)


def _run_sweep(
    entries: list[Entry], out: Path | None, label: str, progress: Progress | None
) -> tuple[Path, list[Entry]]:
    from blipmon.runner.launch import make_run_dir, preflight

    for e in entries:
        try:
            preflight(e.cfg)
        except ConfigError as err:
            e.refused = str(err)
    try:
        sweep_dir = make_run_dir({"name": label}, out)
    except OSError as err:
        where = out if out is not None else Path("profiles")
        raise ConfigError(f"--out {where}: cannot create the sweep directory there ({err.strerror or err})") from None
    progress = progress or Progress(len(entries))
    started = time.time()
    _write_sweep_file(sweep_dir, entries, started, finished=False)  # before plan(): --announce points here
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
            i, e, sweep_dir, progress, runnable_left, lambda: _write_sweep_file(sweep_dir, entries, started, False)
        )
        progress.finished(i, e, 0 if interrupted else runnable_left)
        _write_sweep_file(sweep_dir, entries, started, finished=False)
    if interrupted:
        progress.note("blipmon: sweep interrupted; " + f"{sum(e.status == 'not run' for e in entries)} not run")
    _write_sweep_file(sweep_dir, entries, started, finished=True)
    return sweep_dir, entries


def table_runs(entries: list[Entry]) -> list[RunData]:
    """The comparison's columns: every run, and every refused configuration as a ``refused`` column."""
    runs: list[RunData] = []
    for e in entries:
        if e.status == "refused":
            runs.append(NotRun(e.name, e.cfg, "refused"))
        elif e.run is not None:
            runs.append(e.run)
    return runs


def read_sweep_file(sweep_dir: Path) -> dict[str, Any] | None:
    """``sweep.json`` as written (atomically) by a sweep, or None while it does not exist or cannot be read."""
    try:
        doc = json.loads((Path(sweep_dir) / SWEEP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("configs"), list):
        return None
    doc["configs"] = [c for c in doc["configs"] if isinstance(c, dict)]
    return doc


def load_sweep_runs(sweep_dir: Path) -> list[RunData]:
    """The comparison's columns for a sweep folder, from its ``sweep.json``: what ``blipmon sweep`` prints.

    Every run that has a directory (its recorded run, or a column naming its status when it recorded
    nothing readable) and every refused configuration; configurations never started are left out.
    """
    doc = read_sweep_file(sweep_dir)
    if doc is None:
        raise ProfileError(f"{sweep_dir}: no readable {SWEEP_FILE}; is this a sweep folder?")
    runs: list[RunData] = []
    for c in doc["configs"]:
        name, status, run_dir = str(c.get("name") or "run"), str(c.get("status") or ""), c.get("run_dir")
        if status == "refused":
            runs.append(NotRun(name, {}, "refused"))
        elif isinstance(run_dir, str) and run_dir:
            try:
                runs.append(load_run(Path(sweep_dir) / run_dir))
            except ProfileError:
                runs.append(NotRun(name, {}, status if status in EXIT_CODES else "error"))
    return runs


def main(args: argparse.Namespace) -> int:
    """Entry point of ``blipmon sweep``."""
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
    sweep_dir, entries = run_sweep(entries, getattr(args, "out", None), _label(sources), progress)
    runs = table_runs(entries)
    if runs:
        sys.stdout.write(render_compare(runs, fmt))
        sys.stdout.flush()
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.status] = counts.get(e.status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    print(f"blipmon: sweep done ({summary}); runs in {sweep_dir}", file=sys.stderr)
    return sweep_exit_code([e.code for e in entries] + ([4] if counts.get("not run") else []))


__all__ = [
    "Entry",
    "NotRun",
    "expand",
    "load_sweep_runs",
    "main",
    "read_sweep_file",
    "run_sweep",
    "sweep_eta",
    "sweep_exit_code",
    "table_runs",
]
