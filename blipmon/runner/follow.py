"""Following a run while a process writes it (``run --live``, ``attach``), and what that process is doing.

``FileFollowSource`` reads only what is new in ``events.jsonl`` and ``child.log`` at each poll. When
nothing arrives for a while it asks psutil about the pid in the run's header (``process_state``), so
the view can say "pid 1234 stopped" rather than just "no data": that check of another process is why
it lives in the runner, not in core.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blipmon.core.errors import ProfileError
from blipmon.core.layout import EVENTS, LOG
from blipmon.core.logtail import LogTail
from blipmon.core.phase_index import PhaseIndex
from blipmon.core.profile import EventReader
from blipmon.core.replay import HOLD_S, ReplaySource, follow_some, tail_last_t, tail_status
from blipmon.core.run import RunData
from blipmon.core.snapshot import RunSource, Snapshot, Stall, snapshot_of

Clock = Callable[[], float]
STALL_SECONDS = 10.0  # a followed run that wrote no record for this long is said to have stalled
BACKLOG_BYTES = 8 << 20  # a file bigger than this when attached to is read in the background, in chunks
HEAD_BYTES = 64 << 10  # read before the first frame when a backlog streams in: header, config, a first timeline


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
        self,
        run_dir: Path,
        *,
        mode: str = "attach",
        clock: Clock = time.time,
        stall_after: float = STALL_SECONDS,
        backlog_bytes: int = BACKLOG_BYTES,
        chunk_bytes: int = 2 << 20,
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
        # A big file (a long run attached to late, a finished one) is read progressively, as a replay is:
        # the head now, the rest in chunks on a loader thread once the view is up (``view_shown``);
        # polls show what is read so far and follow the file themselves once the loader has caught up.
        self._lock = threading.Lock()
        self._go = threading.Event()
        self._stop = threading.Event()
        self._chunk = chunk_bytes
        self._loader: threading.Thread | None = None
        self._tail_status: str | None = None
        self._tail_t = 0.0
        if self._old_bytes > backlog_bytes:
            self._read_chunk(HEAD_BYTES)
            self._tail_status = tail_status(self.run_dir / EVENTS)
            self._tail_t = tail_last_t(self.run_dir / EVENTS)
            self._loader = threading.Thread(target=self._catch_up, name="blipmon-follow-loader", daemon=True)
            self._loader.start()

    @property
    def catching_up(self) -> bool:
        """Whether the loader is still reading what the file held when it was opened."""
        return self._loader is not None and self._loader.is_alive()

    def _read_chunk(self, max_bytes: int) -> int:
        with self._lock:
            try:
                return follow_some(self.run, self.reader, max_bytes)
            except ProfileError as e:
                self._problem = str(e)
                return 0

    def _catch_up(self) -> None:
        self._go.wait(HOLD_S)
        while not self._stop.is_set() and self._problem is None and self.reader.offset < self._old_bytes:
            before = self.reader.offset
            self._read_chunk(self._chunk)
            if self.reader.offset == before:  # a truncated last line: the polls take it from here
                break
            time.sleep(0.002)  # hand the GIL to the UI between chunks

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until the backlog is read (benchmarks and tests); True when it is."""
        self._go.set()
        if self._loader is not None:
            self._loader.join(timeout)
        return not self.catching_up

    def view_shown(self) -> None:
        self._go.set()

    def close(self) -> None:
        self._stop.set()
        self._go.set()

    @property
    def problem(self) -> str | None:
        """Why the profile cannot be read (any more), in the user's words; None while it can."""
        return self._problem

    def poll(self) -> Snapshot:
        with self._lock:
            return self._poll()

    def _poll(self) -> Snapshot:
        arrived = 0
        loading = self.catching_up
        if self._problem is None and not loading:
            try:
                arrived = self.run.follow(self.reader)
            except ProfileError as e:
                self._problem = str(e)
        log_changed = self.log.poll()
        run = self.run
        counts = (len(run.samples), len(run.phases), len(run.steps), len(run.rank_steps), len(run.notes))
        status = run.status if run.header else "starting"
        if loading:  # the end of the file says how the run ended; its process may be long gone
            status = self._tail_status or "running"
        now = self._tail_t if loading and self._tail_status else self._elapsed()
        stall = None if loading else self._check_stall(arrived, status)
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
