"""A saved run played back on a virtual clock: pause, speed, seek (``blipmon replay``).

A big profile is read in chunks on a loader thread, so the view opens at once and fills in behind
the playhead. Only files are read: nothing here starts, follows or signals a process.
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from blipmon.core.errors import ProfileError
from blipmon.core.layout import EVENTS, LOG
from blipmon.core.logtail import LOG_LINES, LogTail
from blipmon.core.phase_index import PhaseIndex
from blipmon.core.profile import EventReader
from blipmon.core.run import RunData
from blipmon.core.snapshot import ReplayState, RunSource, Snapshot, snapshot_of

Clock = Callable[[], float]
SPEEDS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
# How long a loader thread holds back before streaming if no view says its first frame is up
# (``RunSource.view_shown``): a source used without a dashboard still loads, a little later.
HOLD_S = 1.0
# Read before the first frame: the header, the configuration and a first stretch of timeline (~300 samples of a
# typical profile, more than the chart's columns). Every byte more is parsed in front of the first frame.
FIRST_CHUNK = 64 << 10


class ReplaySource(RunSource):
    """A saved run played back on a virtual clock.

    The profile is read in chunks on a loader thread (``background=True``); the playhead cannot run
    ahead of what is read, and the duration is known from the file's tail at once, so the view is
    up within moments even for a million samples.
    """

    mode = "replay"

    def __init__(
        self,
        run_dir: Path,
        speed: float = 1.0,
        *,
        clock: Clock = time.monotonic,
        background: bool = True,
        chunk_bytes: int = 2 << 20,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.clock = clock
        self.speed = float(speed)
        self.paused = False
        self.run = RunData(path=self.run_dir)
        self.reader = EventReader(self.run_dir)
        self._lock = threading.Lock()
        self._size = max((self.run_dir / EVENTS).stat().st_size, 1)
        self._chunk = chunk_bytes
        self._done = False
        self._problem: str | None = None
        self.duration = tail_last_t(self.run_dir / EVENTS)
        self._phase_t: list[float] = []
        self._step_t: list[float] = []
        self._rank_step_t: list[float] = []
        self.index = PhaseIndex()
        self.log = LogTail(self.run_dir / LOG, keep=LOG_LINES)
        self.log.poll()
        self._read_some(first=True)  # the header and the start, so the first snapshot has a name and a device
        if not self.run.header and self._problem is None:
            self._problem = f"{self.run_dir}: the run has recorded nothing readable yet"
        self.position = self._start_time()
        self._last_clock = clock()
        self._version = 0
        self._key: tuple[Any, ...] = ()
        self._last: Snapshot | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # The loader waits for the view's first frame (``view_shown``): parsing 2 MiB chunks holds the
        # GIL, and on a small machine it held a 1M-sample profile's first frame back by about a second.
        self._go = threading.Event()
        if not self._done:
            if background:
                self._thread = threading.Thread(target=self._load_rest, name="blipmon-replay-loader", daemon=True)
                self._thread.start()
            else:
                self._load_rest()

    @property
    def problem(self) -> str | None:
        """Why the profile cannot be read (any more), in the user's words; None while it can."""
        return self._problem

    # -- loading ------------------------------------------------------------------------------------
    def _read_some(self, first: bool = False) -> None:
        with self._lock:
            before = self.reader.offset
            try:
                follow_some(self.run, self.reader, min(self._chunk, FIRST_CHUNK) if first else self._chunk)
            except ProfileError as e:
                self._problem, self._done = str(e), True
                return
            self._phase_t.extend(float(p.get("t") or 0.0) for p in self.run.phases[len(self._phase_t) :])
            self.index.extend(self.run.phases)
            self._step_t.extend(float(s.get("t") or 0.0) for s in self.run.steps[len(self._step_t) :])
            rank_steps = self.run.rank_steps
            self._rank_step_t.extend(float(s.get("t") or 0.0) for s in rank_steps[len(self._rank_step_t) :])
            # Done when nothing more could be read: the end, or a truncated last line.
            self._done = self.reader.offset == before
            if self._done:
                self.duration = max(self.duration, self.run.last_t)
                self.run.warnings = list(self.reader.warnings)

    def _load_rest(self) -> None:
        if self._thread is not None:
            self._go.wait(HOLD_S)
        while not self._done and not self._stop.is_set():
            self._read_some()
            time.sleep(0.002)  # hand the GIL to the UI between chunks: the view stays responsive

    @property
    def loaded(self) -> float:
        return 1.0 if self._done else min(self.reader.offset / self._size, 0.999)

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until the whole profile is read (benchmarks and tests)."""
        self._go.set()
        if self._thread is not None:
            self._thread.join(timeout)
        return self._done

    def _start_time(self) -> float:
        arr = self.run.samples.arrays()["t"]
        firsts = [float(arr[0])] if len(arr) else []
        if self._phase_t:
            firsts.append(self._phase_t[0])
        return max(min(firsts) - 0.05, 0.0) if firsts else 0.0

    # -- controls -----------------------------------------------------------------------------------
    def _advance(self) -> None:
        now = self.clock()
        if not self.paused:
            self.position += (now - self._last_clock) * self.speed
        self._last_clock = now
        limit = self.duration if self._done else min(self.duration, self.run.last_t)
        if self.position >= limit:
            self.position = limit
            if self._done:
                self.paused = True

    def toggle_pause(self) -> None:
        self._advance()
        if self.paused and self.position >= self.duration and self._done:
            self.position = self._start_time()  # play again from the start
        self.paused = not self.paused

    def faster(self) -> None:
        self._advance()
        self.speed = next((s for s in SPEEDS if s > self.speed + 1e-9), SPEEDS[-1])

    def slower(self) -> None:
        self._advance()
        self.speed = next((s for s in reversed(SPEEDS) if s < self.speed - 1e-9), SPEEDS[0])

    def seek(self, delta: float) -> None:
        self._advance()
        self.seek_to(self.position + delta)

    def seek_to(self, position: float) -> None:
        self._advance()
        self.position = min(max(position, 0.0), self.duration)

    def seek_fraction(self, fraction: float) -> None:
        self.seek_to(self.duration * min(max(fraction, 0.0), 1.0))

    # -- snapshots ----------------------------------------------------------------------------------
    def poll(self) -> Snapshot:
        self._advance()
        pos = self.position
        with self._lock:
            run = self.run
            t = run.samples.arrays()["t"]
            ns = int(np.searchsorted(t, pos, side="right"))
            nph = bisect.bisect_right(self._phase_t, pos)
            nst = bisect.bisect_right(self._step_t, pos)
            nrs = bisect.bisect_right(self._rank_step_t, pos)
            at_end = self._done and pos >= self.duration - 1e-9
            status = run.status if at_end else "running"
            state = ReplayState(pos, self.duration, self.speed, self.paused, self.loaded)
            key = (ns, nph, nst, nrs, status, round(pos, 1), self.speed, self.paused, round(self.loaded, 2),
                   self._problem)  # fmt: skip
            if key != self._key or self._last is None:
                data_changed = key[:4] != self._key[:4]
                self._version += 1
                self._key = key
                snap = snapshot_of(
                    run,
                    self._version,
                    self._version if data_changed or self._last is None else self._last.data_version,
                    "replay",
                    status,
                    pos,
                    self.log.snapshot(),
                    self._problem,
                    n=(ns, nph, nst, nrs),
                    replay=state,
                    upto=None if at_end else pos,
                    index=self.index,
                )
                if at_end:
                    snap = replace(snap, finished=True)
                self._last = snap
            return self._last

    def view_shown(self) -> None:
        self._go.set()

    def close(self) -> None:
        self._stop.set()
        self._go.set()


def follow_some(run: RunData, reader: EventReader, max_bytes: int) -> int:
    """``run.follow`` of about ``max_bytes``, but always past a whole line longer than that.

    A line longer than one chunk (the run index of a big run: megabytes) would otherwise read as
    "nothing more", and a loader would stop there, before the run's ``end``. Returns the records read.
    """
    while True:
        before = reader.offset
        n = run.follow(reader, max_bytes=max_bytes)
        if reader.offset != before:
            return n
        try:
            size = reader.path.stat().st_size
        except OSError:
            return n
        if before + max_bytes >= size:  # truly nothing more, or a cut last line: wait for more
            return n
        max_bytes *= 2


def _tail_records(path: Path, size: int = 1 << 16) -> list[dict[str, Any]]:
    """The whole records among the last ``size`` bytes of a profile (a cut or corrupt line is skipped)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            end = fh.tell()
            fh.seek(max(end - size, 0))
            data = fh.read()
    except OSError:
        return []
    out = []
    for raw in data.split(b"\n")[1:] if end > size else data.split(b"\n"):
        try:
            rec = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def tail_status(path: Path) -> str | None:
    """How a run ended, from the ``end`` and ``exit`` records at the end of its file; None if neither is there.

    What a view shows while the rest of a big file streams in: the same status ``RunData`` gives once
    everything is read (``end`` first, then ``exit``), not a guess from whether its process still lives.
    """
    tail = RunData(path=path.parent)
    tail.extend([r for r in _tail_records(path) if r.get("type") in ("end", "exit")])
    if tail.end is None and tail.exit is None:
        return None
    return tail.status


def tail_last_t(path: Path, size: int = 1 << 16) -> float:
    """The latest ``t`` among the last records of a profile: its duration, without reading it all."""
    best = 0.0
    for rec in _tail_records(path, size):
        t = rec.get("t")
        if isinstance(t, (int, float)) and not isinstance(t, bool) and t > best:
            best = float(t)
    return best
