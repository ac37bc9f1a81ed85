"""The sweep view: a sweep's queue as it runs, the current run's live view, and the comparison at the end.

Why the view follows files instead of talking to the sweep: the sweep is an ordinary
``blipmon sweep`` started as a detached child in its own session (``LiveSweep``), like a run's
supervisor (``ui/supervise.py``), so that leaving the dashboard or closing the terminal never ends
it. Everything shown here is what that child writes anyway: ``sweep.json`` (rewritten atomically
when each run starts and ends: every configuration with its status and run directory) and each
run's ``events.jsonl`` (the current run's steps and peak). So nothing is lost when the dashboard
goes away, and the headless sweep and this view can never disagree.

``SweepFollower`` (no Textual) turns those files into ``QueueState``; ``SweepScreen`` shows it.

The same screen opens on a sweep this dashboard did not start (``blipmon attach <sweep dir>``, a
sweep left running, one started in another terminal) through ``AttachedSweep``, and on a finished
one (``blipmon replay <sweep dir>``) with no process at all. An attached sweep is known only by the
``pid`` in its ``sweep.json``, and a pid can be reused once the sweep has ended, so before signalling
it (or believing it is alive) ``sweep_process`` checks with psutil that the process on that pid is
a ``blipmon ... sweep`` started no later than the sweep itself, on this host.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from blipmon.commands.sweep import EXIT_CODES, load_sweep_runs, read_sweep_file, sweep_eta, sweep_exit_code
from blipmon.core.profile import EventReader, ProfileError
from blipmon.core.report import oom_where
from blipmon.core.run import RunData, load_run
from blipmon.core.safe_text import one_line
from blipmon.core.units import fmt_bytes, fmt_seconds
from blipmon.ui.control import DetachedProcess, LaunchError
from blipmon.ui.dialogs import ConfirmScreen, HelpScreen, StopOrLeaveScreen, binding_keys

PROFILES = Path("profiles")
REFRESH_SECONDS = 0.5
FINAL = frozenset(EXIT_CODES) | {"not run"}  # statuses a configuration keeps once the sweep is past it
STATUS_STYLE = {
    "queued": "dim",
    "running": "bold cyan",
    "ok": "green",
    "oom": "bold red",
    "error": "red",
    "refused": "yellow",
    "stopped": "magenta",
    "killed": "magenta",
    "not run": "dim",
}


# -- the sweep process -----------------------------------------------------------------------------
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


def doc_exit_code(doc: dict[str, Any] | None) -> int | None:
    """``blipmon sweep``'s exit code for what ``sweep.json`` says, once its process has gone.

    We are not its parent, so nobody tells us its exit status. A configuration still ``running``
    or ``pending`` (a refused one is ``pending`` with its reason until the sweep reaches it) means
    the sweep died before the end: "stopped or killed", 4, as for one that was interrupted.
    """
    if doc is None:
        return None
    codes: list[int | None] = []
    for c in doc["configs"]:
        status = str(c.get("status") or "pending")
        if status == "pending" and c.get("reason"):
            status = "refused"
        codes.append(4 if status in ("running", "pending", "not run") else EXIT_CODES.get(status))
    return sweep_exit_code(codes)


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


# -- the queue, from the sweep's files (no Textual) --------------------------------------------------
@dataclass(frozen=True)
class QueueRow:
    """One configuration as the queue shows it."""

    index: int
    name: str
    status: str  # queued | running | ok | oom | error | refused | stopped | killed | not run
    run_dir: Path | None
    steps: str
    peak: int | None
    seconds: float | None
    note: str  # the refusal reason, the error, where it ran out of memory


@dataclass(frozen=True)
class QueueState:
    """The whole sweep at one moment."""

    sweep_dir: Path
    rows: tuple[QueueRow, ...]
    elapsed: float
    eta: float | None
    finished: bool
    readable: bool  # False until sweep.json exists (a moment after the folder)

    @property
    def current(self) -> QueueRow | None:
        return next((r for r in self.rows if r.status == "running"), None)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def exit_code(self) -> int:
        """``blipmon sweep``'s exit code for what the queue shows (when the process's own is not known)."""
        return sweep_exit_code(
            [EXIT_CODES.get(r.status) for r in self.rows] + [4 if self.counts().get("not run") else 0]
        )


def _peak(run: RunData) -> int | None:
    p = run.peaks()
    return p["allocated"] if p["allocated"] is not None else (p["host_rss"] or None)


def _steps_text(run: RunData) -> str:
    total = run.plan.get("total_steps")
    done = len(run.steps)
    if isinstance(total, int) and total > 0:
        return f"{done}/{total}"
    if run.config.get("job", {}).get("kind") in ("load", "generate") and not done:
        return run.config["job"]["kind"]
    return str(done) if done or run.header else "—"


def _note(run: RunData | None, status: str) -> str:
    if run is None:
        return ""
    if status == "oom" and run.oom:
        return f"out of memory at {oom_where(run)}"
    if status == "error" and run.error:
        msg = str(run.error.get("message", "")).strip().splitlines()
        return msg[0] if msg else "error"
    return ""


@dataclass
class _Finished:
    steps: str
    peak: int | None
    note: str


class SweepFollower:
    """Follows a sweep folder: ``poll()`` reads ``sweep.json`` and the current run's new events.

    The current run is followed incrementally (only new bytes each poll); a finished run is read
    once and remembered, so a long sweep costs the same per poll at its tenth run as at its first.
    ``ended`` says whether the sweep process is gone (it may die without writing ``finished``).
    """

    def __init__(
        self, sweep_dir: Path, *, ended: Callable[[], bool] | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.sweep_dir = Path(sweep_dir)
        self.ended = ended or self._pid_gone
        self.clock = clock
        self.doc: dict[str, Any] | None = None
        self._current: tuple[Path, RunData, EventReader] | None = None
        self._done: dict[Path, _Finished] = {}
        self._last_elapsed = 0.0

    def _pid_gone(self) -> bool:
        # Not just "is the pid alive": once the sweep has ended its pid may be another process's.
        if self.doc is None:
            return False
        return not sweep_alive(self.doc)

    def _follow(self, run_dir: Path) -> RunData:
        if self._current is None or self._current[0] != run_dir:
            self._current = (run_dir, RunData(path=run_dir), EventReader(run_dir))
        _, run, reader = self._current
        try:
            run.follow(reader)
        except (ProfileError, OSError):
            pass  # not there yet, or cut mid-record: the next poll reads on
        return run

    def _finished(self, run_dir: Path, status: str) -> _Finished:
        cached = self._done.get(run_dir)
        if cached is not None:
            return cached
        run: RunData | None
        if self._current is not None and self._current[0] == run_dir:
            run = self._follow(run_dir)  # read its last records; no need to read it all again
            self._current = None
        else:
            try:
                run = load_run(run_dir)
            except (ProfileError, OSError):
                run = None
        facts = _Finished(
            _steps_text(run) if run is not None and run.header else "—",
            _peak(run) if run is not None else None,
            _note(run, status) or ("" if run is not None and run.header else "nothing recorded; see child.log"),
        )
        self._done[run_dir] = facts
        return facts

    def poll(self) -> QueueState:
        doc = read_sweep_file(self.sweep_dir)
        if doc is not None:
            self.doc = doc
        doc = self.doc
        ended = self.ended()
        if doc is None:
            return QueueState(self.sweep_dir, (), 0.0, None, ended, False)
        finished = bool(doc.get("finished")) or ended
        now = self.clock()
        rows: list[QueueRow] = []
        durations: list[float] = []
        current_left: float | None = None
        runs_left = 0
        for i, c in enumerate(doc["configs"], 1):
            name = str(c.get("name") or "run")
            status = str(c.get("status") or "pending")
            reason = c.get("reason")
            rd = c.get("run_dir")
            run_dir = self.sweep_dir / rd if isinstance(rd, str) and rd else None
            seconds = c.get("seconds") if isinstance(c.get("seconds"), (int, float)) else None
            steps, peak, note = "—", None, ""
            if status == "refused" or (status == "pending" and reason):
                status, note = "refused", str(reason or "")
            elif status == "pending":
                status = "queued"
                runs_left += 1
            elif status == "running" and run_dir is not None:
                run = self._follow(run_dir)
                steps, peak = _steps_text(run), _peak(run)
                started = run.header.get("started")
                seconds = max(now - started, 0.0) if isinstance(started, (int, float)) else run.last_t
                total = run.plan.get("total_steps")
                if isinstance(total, int) and total > 0 and run.steps:
                    current_left = seconds / len(run.steps) * max(total - len(run.steps), 0)
                if finished:  # the sweep died under it: say what the run itself recorded
                    status = run.status
            elif status == "not run":
                note = "skipped: the sweep was stopped"
            elif run_dir is not None:
                facts = self._finished(run_dir, status)
                steps, peak, note = facts.steps, facts.peak, facts.note
            if status in EXIT_CODES and status != "refused" and seconds is not None:
                durations.append(float(seconds))
            rows.append(QueueRow(i, name, status, run_dir, steps, peak, seconds, note))
        started = doc.get("started")
        if isinstance(doc.get("ended"), (int, float)) and isinstance(started, (int, float)):
            elapsed = float(doc["ended"]) - float(started)
        elif finished:
            elapsed = self._last_elapsed
        else:
            elapsed = max(now - float(started), 0.0) if isinstance(started, (int, float)) else 0.0
        self._last_elapsed = elapsed
        running = any(r.status == "running" for r in rows)
        current_seconds = next((r.seconds for r in rows if r.status == "running"), None)
        eta = None if finished else sweep_eta(durations, runs_left, current_left if running else None, current_seconds)
        return QueueState(self.sweep_dir, tuple(rows), elapsed, eta, finished, True)


# -- the screen --------------------------------------------------------------------------------------
class SweepResult:
    """How the user left the sweep view: the sweep's exit code if known, and whether it was left running."""

    def __init__(self, code: int | None, left_running: bool = False, sweep_dir: Path | None = None) -> None:
        self.code = code
        self.left_running = left_running
        self.sweep_dir = sweep_dir


COLUMNS = (("#", "index"), ("configuration", "name"), ("status", "status"), ("steps", "steps"),
           ("peak", "peak"), ("time", "time"), ("note", "note"))  # fmt: skip


def row_cells(row: QueueRow) -> tuple[Text, ...]:
    """A queue row as the table's cells (pure, for tests).

    ``Text``, never markup strings: names, statuses and notes come from ``sweep.json`` and the runs'
    profiles (a status ``[/]``, an error quoting ``[/INST]``), with control characters made visible.
    """
    note = one_line(row.note)
    note = note if len(note) <= 48 else note[:47] + "…"
    name = one_line(row.name)
    return (
        Text(str(row.index), style="dim"),
        Text(name if len(name) <= 28 else name[:27] + "…"),
        Text(one_line(row.status), style=STATUS_STYLE.get(row.status, "")),
        Text(one_line(row.steps)),
        Text(fmt_bytes(row.peak) if row.peak else "—"),
        Text(fmt_seconds(row.seconds) if row.seconds is not None else "—"),
        Text(note, style="dim"),
    )


def header_text(state: QueueState, mode: str) -> Text:
    """The two lines above the queue: where the sweep writes, how far it is, elapsed and ETA.

    Plain ``Text``: the folder and the statuses come from disk (a status ``[/]`` in a hand-edited
    ``sweep.json`` is shown as it is, never read as markup).
    """
    n = len(state.rows)
    text = Text.assemble(
        ("sweep", "bold"),
        f" of {n} configuration{'s' if n != 1 else ''}  [{mode}]  ",
        (one_line(state.sweep_dir), "dim"),
        "\n",
    )
    if not state.readable:
        text.append("starting…")
        return text
    counts = state.counts()
    order = ("running", "queued", "ok", "oom", "error", "refused", "stopped", "killed", "not run")
    parts = [f"{counts[s]} {s}" for s in order if counts.get(s)]
    parts += [f"{k} {one_line(s)}" for s, k in counts.items() if s not in order]  # what a newer sweep may write
    done = sum(1 for r in state.rows if r.status in FINAL)
    if state.finished:
        text.append("done", "bold")
        text.append(f" in {fmt_seconds(state.elapsed)} — c compares")
    else:
        eta = "ETA —" if state.eta is None else f"ETA {fmt_seconds(state.eta)}"
        text.append(f"{done}/{n} done · elapsed {fmt_seconds(state.elapsed)} · {eta}")
    text.append(f"  ·  {' · '.join(parts)}")
    return text


class SweepScreen(Screen[SweepResult]):
    """The queue of a sweep: every configuration's status, the current run's steps and peak, the ETA."""

    DEFAULT_CSS = """
    SweepScreen #sweep-header { height: 2; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    SweepScreen #sweep-queue { height: 1fr; border: round $primary-darken-2; }
    SweepScreen #sweep-detail { height: auto; max-height: 4; padding: 0 1; color: $text-muted; }
    """

    BINDINGS = [
        # priority: the table's own enter would hide this one from the footer
        Binding("enter", "open", "open run", priority=True),
        Binding("l", "live", "live view"),
        Binding("s", "stop", "stop sweep"),
        Binding("c", "compare", "compare"),
        Binding("q,escape", "leave", "leave"),
        Binding("question_mark", "help", "help", key_display="?"),
    ]

    export_name = "sweep"

    def __init__(
        self,
        sweep_dir: Path,
        live: SweepControl | None = None,
        *,
        replay: bool = False,
        speed: float = 1.0,
        refresh: float = REFRESH_SECONDS,
        follower: SweepFollower | None = None,
    ) -> None:
        """``live``: the sweep's process, to stop it (``LiveSweep`` started here, ``AttachedSweep``).

        ``replay``: a finished sweep, nothing followed or stopped (``blipmon replay <sweep dir>``);
        ``speed`` is then the speed its runs replay at. With neither, the view follows the folder
        and can stop nothing (what tests use with a hand-written folder).
        """
        super().__init__()
        self.sweep_dir = Path(sweep_dir)
        self.live = live
        self.replay = replay and live is None
        self.speed = speed
        self.refresh_seconds = refresh
        ended: Callable[[], bool] | None = None
        if live is not None:
            ended = lambda: not live.running()  # noqa: E731
        elif self.replay:
            ended = lambda: True  # noqa: E731 - nothing to wait for, whatever pid sweep.json names
        self.follower = follower or SweepFollower(self.sweep_dir, ended=ended)
        self.state: QueueState | None = None
        self._shown: tuple[tuple[str, ...], ...] = ()
        self._compared = False  # the automatic comparison at the end happens once
        self._compare_pending = False
        self._saw_unfinished = False  # only a sweep seen ending opens the comparison by itself
        self._follow_current: int | None = None  # the running row the cursor was on, to move with it
        self._leaving = False

    @property
    def owned(self) -> bool:
        """Started by this dashboard: leaving asks whether to stop it."""
        return self.live is not None and self.live.owned

    @property
    def mode(self) -> str:
        if self.owned:
            return "live"
        return "replay" if self.replay else "attached"

    def compose(self) -> ComposeResult:
        yield Static("", id="sweep-header")
        yield DataTable(id="sweep-queue", cursor_type="row", zebra_stripes=True)
        yield Static("", id="sweep-detail")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.border_title = "queue"
        for label, key in COLUMNS:
            table.add_column(label, key=key)
        self.tick()
        self.set_interval(self.refresh_seconds, self.tick)
        table.focus()

    # -- data -------------------------------------------------------------------------------------
    def tick(self) -> None:
        state = self.follower.poll()
        self.show(state)
        if state.readable and not state.finished:
            self._saw_unfinished = True
        if state.finished and not self._compared:
            self._compared = True
            self.refresh_bindings()
            if not (self._saw_unfinished or self.owned):
                # Opened on a sweep that had already ended (attach or replay): the user came for the
                # queue; `c` compares.
                return
            if self.is_active:
                self.action_compare()
            else:
                self._compare_pending = True
                self.notify("the sweep is done: the comparison opens when you go back to the queue", timeout=8)

    def show(self, state: QueueState) -> None:
        was = self.state
        self.state = state
        self.query_one("#sweep-header", Static).update(header_text(state, self.mode))
        table = self.query_one(DataTable)
        cells = [row_cells(r) for r in state.rows]
        plain = tuple(tuple(c.plain for c in row) for row in cells)
        if plain != self._shown:
            if len(plain) != len(self._shown):
                table.clear()
                for r, row in zip(state.rows, cells, strict=True):
                    table.add_row(*row, key=str(r.index))
            else:
                for r, row, old in zip(state.rows, cells, self._shown, strict=True):
                    for (_, key), cell, before in zip(COLUMNS, row, old, strict=True):
                        if cell.plain != before:
                            table.update_cell(str(r.index), key, cell, update_width=True)
            self._shown = plain
        self._cursor_follows(state)
        self._show_detail()
        if was is None or was.finished != state.finished or (was.current is None) != (state.current is None):
            self.refresh_bindings()

    def _cursor_follows(self, state: QueueState) -> None:
        """Keep the cursor on the running configuration, unless the user has moved it elsewhere."""
        current = state.current
        if current is None:
            return
        table = self.query_one(DataTable)
        at = table.cursor_row + 1
        if (at == self._follow_current or (self._follow_current is None and at == 1)) and at != current.index:
            table.move_cursor(row=current.index - 1)
        self._follow_current = current.index

    def selected(self) -> QueueRow | None:
        if self.state is None or not self.state.rows:
            return None
        i = self.query_one(DataTable).cursor_row
        return self.state.rows[i] if 0 <= i < len(self.state.rows) else None

    def _show_detail(self) -> None:
        row = self.selected()
        detail = self.query_one("#sweep-detail", Static)
        if row is None:
            detail.update("")
            return
        text = Text.assemble(
            (f"{row.index}. {one_line(row.name)}", "bold"),
            "  ",
            (one_line(row.status), STATUS_STYLE.get(row.status, "")),
        )
        if row.note:
            text.append(f" — {one_line(row.note)}")
        if row.run_dir is not None:
            hint = "enter: its live view" if row.status == "running" and not self.replay else "enter: replay it"
            text.append("\n")
            text.append(one_line(row.run_dir), "dim")
            text.append(f"  {hint}")
        detail.update(text)

    @on(DataTable.RowHighlighted, "#sweep-queue")
    def _highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    @on(DataTable.RowSelected, "#sweep-queue")
    def _selected(self, _event: DataTable.RowSelected) -> None:
        self.action_open()

    def on_screen_resume(self) -> None:
        if self._compare_pending:
            self._compare_pending = False
            self.action_compare()

    # -- which keys exist ---------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        state = self.state
        if action == "stop":
            return self.live is not None and not (state is not None and state.finished)
        if action == "live":
            return state is not None and state.current is not None and not state.finished
        if action == "compare":
            return state is not None and any(r.run_dir is not None and r.status in FINAL for r in state.rows)
        return True

    def visible_actions(self) -> set[str]:
        return {b.action for b in self.BINDINGS if isinstance(b, Binding) and self.check_action(b.action, ())}

    # -- actions ------------------------------------------------------------------------------------
    def action_help(self) -> None:
        keys = binding_keys(self.BINDINGS, self.visible_actions()) + [("↑/↓", "move in the queue")]
        self.app.push_screen(HelpScreen(f"sweep ({self.mode})", keys))

    def action_open(self) -> None:
        row = self.selected()
        if row is None:
            return
        if row.run_dir is None or not (row.run_dir / "events.jsonl").exists():
            why = {"queued": "it has not started yet", "refused": "it was refused: nothing ran"}
            self.notify(f"{row.name}: {why.get(row.status, 'nothing was recorded')}", severity="warning")
            return
        self._open_run(row)

    def action_live(self) -> None:
        row = self.state.current if self.state is not None else None
        if row is None or row.run_dir is None:
            self.notify("no run is going on now", severity="warning")
            return
        self._open_run(row)

    def _open_run(self, row: QueueRow) -> None:
        from blipmon.core.source import FileFollowSource, ReplaySource
        from blipmon.ui.live import RunScreen

        assert row.run_dir is not None
        try:
            if row.status == "running" and not self.replay:
                source: Any = FileFollowSource(row.run_dir, mode="live" if self.owned else "attach")
            else:
                source = ReplaySource(row.run_dir, speed=self.speed)
        except (ProfileError, OSError) as err:
            self.notify(str(err), severity="error")
            return
        problem = getattr(source, "_problem", None)
        if problem:
            source.close()
            self.notify(problem, severity="error")
            return
        self.app.push_screen(RunScreen(source))

    def action_stop(self) -> None:
        if self.live is None or (self.state is not None and self.state.finished):
            return
        live = self.live
        if live.stops:
            question = "The sweep is already stopping. Kill its current run at once (saved as killed)?"
        else:
            question = (
                "Stop the sweep? The current run is stopped and saved as stopped, the configurations "
                "not started yet are skipped, and the comparison opens with what ran."
            )

        def answer(value: str | None) -> None:
            if value == "yes":
                try:
                    live.stop()
                except NotTheSweep as e:  # an attached sweep whose pid is not (or no longer) the sweep
                    self.notify(f"the sweep was not stopped: {e}", severity="error", timeout=10)
                    return
                self.notify("stopping the sweep…", timeout=4)

        self.app.push_screen(ConfirmScreen(question), answer)

    def action_compare(self) -> None:
        self.notify("reading the sweep's runs…", timeout=3)
        self._load_compare()

    @work(thread=True, exclusive=True, group="compare")
    def _load_compare(self) -> None:
        try:
            runs = load_sweep_runs(self.sweep_dir)
        except ProfileError as e:
            self.app.call_from_thread(self.notify, str(e), severity="error")
            return
        self.app.call_from_thread(self._show_compare, runs)

    def _show_compare(self, runs: list[RunData]) -> None:
        from blipmon.ui.compare import CompareScreen

        if not runs:
            self.notify("nothing ran in this sweep: there is nothing to compare", severity="warning")
            return
        if not self.is_active:  # the user went into a run meanwhile: show it when they come back
            self._compare_pending = True
            return
        dirs = [r.path for r in runs if r.path is not None]
        self.app.push_screen(CompareScreen(dirs, runs=runs))

    def action_leave(self) -> None:
        if self._leaving:
            return
        live = self.live
        if live is not None and not live.owned:  # attached: leaving never stops it, as for a run
            going = live.running() and not (self.state is not None and self.state.finished)
            self._finish(
                SweepResult(None if going else self._result().code, left_running=going, sweep_dir=self.sweep_dir)
            )
            return
        if live is not None and live.running() and not (self.state is not None and self.state.finished):

            def answer(value: str | None) -> None:
                if value == "stop":
                    self._stop_and_leave()
                elif value == "leave":
                    self._finish(SweepResult(None, left_running=True, sweep_dir=self.sweep_dir))

            self.app.push_screen(
                StopOrLeaveScreen(
                    "sweep", "the current run is saved as stopped", "`blipmon attach <sweep folder>` shows it again"
                ),
                answer,
            )
            return
        self._finish(self._result())

    @work(thread=True, exclusive=True, group="stop")
    def _stop_and_leave(self) -> None:
        assert self.live is not None
        self._leaving = True
        self.app.call_from_thread(self.notify, "stopping the sweep…", timeout=10)
        self.live.stop()
        code = self.live.wait(timeout=60)
        self.app.call_from_thread(self._finish, SweepResult(code if code is not None else 4, sweep_dir=self.sweep_dir))

    def _result(self) -> SweepResult:
        code: int | None = None
        if self.live is not None:
            code = self.live.poll()
            if code is None and self.owned and self.state is not None and self.state.finished:
                code = self.live.wait(timeout=30)  # sweep.json says finished; the table is being printed
        if code is None and self.state is not None and self.state.finished:
            code = self.state.exit_code()
        return SweepResult(code, sweep_dir=self.sweep_dir)

    def _finish(self, result: SweepResult) -> None:
        self._leaving = True
        self.dismiss(result)


__all__ = [
    "AttachedSweep",
    "LiveSweep",
    "NotTheSweep",
    "QueueRow",
    "QueueState",
    "SweepControl",
    "SweepFollower",
    "SweepResult",
    "SweepScreen",
    "doc_exit_code",
    "is_sweep_cmdline",
    "sweep_alive",
    "sweep_command",
    "sweep_process",
]
