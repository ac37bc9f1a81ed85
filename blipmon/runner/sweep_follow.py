"""Following a sweep folder while its process writes it: ``sweep.json`` and the current run, as ``QueueState``.

The current run is followed incrementally (only new bytes each poll); a finished run is read once
and remembered, so a long sweep costs the same per poll at its tenth run as at its first. Whether
the sweep's process is still there comes from its pid (``runner/sweep_control.py``), so this lives
in the runner; the queue it returns is plain data (``core/sweep.py``) that the sweep view draws.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blipmon.core.errors import ProfileError
from blipmon.core.layout import LOG
from blipmon.core.outcomes import SWEEP_EXIT_CODES
from blipmon.core.profile import EventReader
from blipmon.core.run import RunData, load_run
from blipmon.core.sweep import QueueRow, QueueState, queue_note, read_sweep_file, steps_text, sweep_eta
from blipmon.runner.sweep_control import sweep_alive


def _queue_peak(run: RunData) -> int | None:
    """The run's headline peak for the queue: nothing measured yet (0 B of host RSS) shows as "—"."""
    return run.headline_peak().bytes or None


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
            steps_text(run) if run is not None and run.header else "—",
            _queue_peak(run) if run is not None else None,
            queue_note(run, status) or ("" if run is not None and run.header else f"nothing recorded; see {LOG}"),
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
                steps, peak = steps_text(run), _queue_peak(run)
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
            if status in SWEEP_EXIT_CODES and status != "refused" and seconds is not None:
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
