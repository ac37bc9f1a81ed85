"""Following a run while a process writes it (``run --live``, ``attach``), and what that process is doing.

``FileFollowSource`` reads only what is new in ``events.jsonl`` and ``child.log`` at each poll. When
nothing arrives for a while it asks psutil about the pid in the run's header (``process_state``), so
the view can say "pid 1234 stopped" rather than just "no data": that check of another process is why
it lives in the runner, not in core.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blipmon.core.errors import ProfileError
from blipmon.core.layout import EVENTS, LOG
from blipmon.core.logtail import LogTail
from blipmon.core.phase_index import PhaseIndex
from blipmon.core.profile import EventReader
from blipmon.core.replay import ReplaySource
from blipmon.core.run import RunData
from blipmon.core.snapshot import RunSource, Snapshot, Stall, snapshot_of

Clock = Callable[[], float]
STALL_SECONDS = 10.0  # a followed run that wrote no record for this long is said to have stalled


def process_state(pid: Any, host: Any, started: Any) -> str:
    """What the process on ``pid`` (from a run's header) is doing: see ``Stall.process``.

    A pid may have been reused since the run began, so a process created after the header's
    ``started`` stamp (written after the process started) is not the run's.
    """
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return "unknown"
    if isinstance(host, str) and host and host != socket.gethostname():
        return "elsewhere"
    import psutil

    try:
        proc = psutil.Process(pid)
        status = proc.status()
        created = proc.create_time()
    except psutil.NoSuchProcess:
        return "gone"
    except (psutil.AccessDenied, OSError):
        return "alive"  # it exists (someone else's): that is all we can tell
    if isinstance(started, (int, float)) and created > float(started) + _START_SLACK_S:
        return "gone"
    if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
        return "gone"
    if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
        return "stopped"
    return "alive"


_START_SLACK_S = 2.0  # clock rounding between a process's creation time and the stamp it wrote


class FileFollowSource(RunSource):
    """A run directory as it is being written, by our own child (``live``) or anyone's (``attach``).

    A run that writes nothing for ``stall_after`` seconds (its sampler alone writes several records a
    second; for a run sampling slower than 0.3 Hz, three of its sampling periods) gets a ``Stall`` in
    its snapshots, with what its process is doing, until records come again.
    The wait starts from the events file's last change, so attaching to a run stopped an hour ago
    says so at once.
    """

    def __init__(
        self, run_dir: Path, *, mode: str = "attach", clock: Clock = time.time, stall_after: float = STALL_SECONDS
    ) -> None:
        self.run_dir = Path(run_dir)
        self.mode = mode
        self.clock = clock
        self.stall_after = stall_after
        self.run = RunData(path=self.run_dir)
        self.reader = EventReader(self.run_dir)
        self.log = LogTail(self.run_dir / LOG)
        self.index = PhaseIndex()
        self._version = 0
        self._data_version = 0
        self._counts: tuple[int, ...] = ()
        self._status = ""
        self._problem: str | None = None
        self._last_second = -1
        self._last: Snapshot | None = None
        self._stall: Stall | None = None
        # When the last record arrived, on ``clock``: the file's age (in real time) before now. What the
        # file already holds is not news: only records past its size now restart the quiet time.
        try:
            st = (self.run_dir / EVENTS).stat()
            age, self._old_bytes = max(time.time() - st.st_mtime, 0.0), st.st_size
        except OSError:
            age, self._old_bytes = 0.0, 0
        self._last_data = clock() - age

    @property
    def problem(self) -> str | None:
        """Why the profile cannot be read (any more), in the user's words; None while it can."""
        return self._problem

    def poll(self) -> Snapshot:
        arrived = 0
        if self._problem is None:
            try:
                arrived = self.run.follow(self.reader)
            except ProfileError as e:
                self._problem = str(e)
        log_changed = self.log.poll()
        run = self.run
        counts = (len(run.samples), len(run.phases), len(run.steps), len(run.rank_steps), len(run.notes))
        status = run.status if run.header else "starting"
        now = self._elapsed()
        stall = self._check_stall(arrived, status)
        changed = counts != self._counts or status != self._status or log_changed or int(now) != self._last_second
        changed = changed or (self._last is not None and self._last.problem != self._problem) or stall != self._stall
        if counts[:4] != self._counts[:4]:
            self._data_version += 1
        if changed or self._last is None:
            self._version += 1
            self._counts, self._status, self._last_second, self._stall = counts, status, int(now), stall
            self.index.extend(run.phases)
            self._last = snapshot_of(
                run,
                self._version,
                self._data_version,
                self.mode,
                status,
                now,
                self.log.snapshot(),
                self._problem,
                index=self.index,
                stall=stall,
            )
        return self._last

    def _check_stall(self, arrived: int, status: str) -> Stall | None:
        """A ``Stall`` once nothing has arrived for ``stall_after`` s while the run is not over; else None."""
        t = self.clock()
        if arrived and self.reader.offset > self._old_bytes:
            self._last_data = t
            return None
        quiet = t - self._last_data
        if status not in ("running", "starting") or quiet < self._quiet_allowed():
            return None
        h = self.run.header
        pid = h.get("pid") if isinstance(h.get("pid"), int) else None
        host = h.get("hostname") if isinstance(h.get("hostname"), str) else None
        return Stall(int(quiet), process_state(pid, host, h.get("started")), pid, host)

    def _quiet_allowed(self) -> float:
        """``stall_after``, or three sampling periods of a run that samples slower (0.1 Hz: 30 s)."""
        runtime = self.run.config.get("runtime")
        hz = runtime.get("sample_hz") if isinstance(runtime, dict) else None
        if isinstance(hz, (int, float)) and not isinstance(hz, bool) and hz > 0:
            return max(self.stall_after, 3.0 / float(hz))
        return self.stall_after

    def _elapsed(self) -> float:
        run = self.run
        if run.finished and run.header:
            return run.last_t
        started = run.header.get("started")
        if isinstance(started, (int, float)):
            return max(self.clock() - float(started) + float(run.header.get("t") or 0.0), run.last_t)
        return run.last_t


def open_source(run_dir: Path, mode: str, **kw: Any) -> RunSource:
    """The right source for a mode: ``replay`` plays back, ``live`` and ``attach`` follow the file."""
    if mode == "replay":
        return ReplaySource(run_dir, **kw)
    return FileFollowSource(run_dir, mode=mode, **kw)
