"""Where the dashboard's data comes from: one interface whether a run is live, attached or replayed.

A ``RunSource`` is polled; each ``poll()`` returns a ``Snapshot``, an immutable picture of the run
as it should be shown at that moment. Widgets only ever read snapshots, so they cannot tell (and
need not care) whether the file is still growing, was written by another process, or is being
played back at 8x. Tests inject a source built from a recorded profile and a frozen clock.

- ``FileFollowSource`` follows a run directory as its child writes it (``live`` and ``attach``).
- ``ReplaySource`` plays a saved run back on a virtual clock: pause, speed, seek. A big profile is
  read in chunks on a loader thread, so the view opens at once and fills in behind the playhead.

No Textual here (an import-linter contract says so): the same sources drive benchmarks and tests.
"""

from __future__ import annotations

import bisect
import codecs
import json
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from blipmon.core.profile import EVENTS, LOG, EventReader, ProfileError
from blipmon.core.run import PHASES, RunData, phase_total
from blipmon.core.safe_text import one_line
from blipmon.core.schedule import schedule
from blipmon.core.timeline import ACTIVITIES, PHASE_ACTIVITY
from blipmon.core.units import fmt_bytes

Clock = Callable[[], float]
LOG_LINES = 400
LOG_TAIL_BYTES = 1 << 20  # the most of child.log read at once; beyond it the start is skipped (and said)
STALL_SECONDS = 10.0  # a followed run that wrote no record for this long is said to have stalled


class Prefix(Sequence[Any]):
    """The first ``n`` items of an append-only list, without copying it: a snapshot stays O(1) to make."""

    __slots__ = ("_items", "_n")

    def __init__(self, items: list[Any], n: int) -> None:
        self._items = items
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            start, stop, step = i.indices(self._n)
            return self._items[start:stop:step]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._items[i]

    def __iter__(self) -> Iterator[Any]:
        items = self._items
        for i in range(self._n):
            yield items[i]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Sequence)
            and len(other) == self._n
            and all(a == b for a, b in zip(self, other, strict=True))
        )

    __hash__ = None  # type: ignore[assignment]


_KIND = {name: i for i, name in enumerate(ACTIVITIES)}


class PhaseIndex:
    """Running figures over a run's phase records, kept as they arrive so every prefix is cheap.

    The dashboard asks the same questions of every snapshot (the peak so far, each phase's highest
    total, where the phase boundaries are); over a long run that is tens of thousands of records,
    so the numbers are pulled out once, as they arrive, and the maxima are kept as numpy running
    maxima (recomputed in C only when records were added).
    """

    _PHASE_NO = {ph: i for i, ph in enumerate(PHASES)}

    def __init__(self) -> None:
        self.t: list[float] = []
        self.kind: list[int] = []
        self.step_start: list[bool] = []  # a step begins here, on rank 0 (the whole run's step marks)
        self.begins: list[bool] = []  # a step begins here, on the record's own rank (one rank's step marks)
        self.vals: list[tuple[float, float, float, float, int]] = []  # alloc peak, reserved, rss, total, phase no
        self._cache: tuple[int, dict[str, np.ndarray]] | None = None
        # Where each rank's records are (indices into the run's phases, ascending), so one rank's latest
        # step or peaks is found without scanning the other ranks' records; a rank's first index tells
        # which ranks a prefix of the run has heard from.
        self.rank_pos: dict[int, list[int]] = {}
        self._rank_cache: dict[int, tuple[int, dict[str, np.ndarray]]] = {}
        self._rank_bounds: dict[int, tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        # Figures derived from a whole history (one rank's steps, the steps combined across ranks)
        # that successive snapshots share while their inputs did not grow: kind -> (inputs, value).
        # The view asks again every second (the elapsed clock); the answer changes once a step.
        self.memo: dict[Any, tuple[Any, Any]] = {}

    def remember(self, kind: Any, inputs: Any, make: Callable[[], Any]) -> Any:
        """``make()``, or its value from the last call of this ``kind`` if ``inputs`` are the same."""
        hit = self.memo.get(kind)
        if hit is not None and hit[0] == inputs:
            return hit[1]
        value = make()
        self.memo[kind] = (inputs, value)
        return value

    def __len__(self) -> int:
        return len(self.vals)

    def extend(self, phases: list[dict[str, Any]]) -> None:
        kinds, nums = _KIND, self._PHASE_NO
        for p in phases[len(self.vals) :]:
            ph = p.get("phase", "")
            self.rank_pos.setdefault(_rank_of(p), []).append(len(self.vals))
            self.t.append(float(p.get("t") or 0.0))
            self.kind.append(kinds[PHASE_ACTIVITY.get(ph, "data")])
            begins = ph == "before_fwd" and not p.get("micro_step")
            self.step_start.append(begins and not p.get("rank"))
            self.begins.append(begins)
            self.vals.append(
                (_num_or(p.get("peak") or p.get("allocated")), _num_or(p.get("reserved")), _num_or(p.get("host_rss")),
                 float(phase_total(p)), nums.get(ph, -1))
            )  # fmt: skip

    def _arrays(self) -> dict[str, np.ndarray]:
        # a loader may be mid-append
        m = min(len(self.t), len(self.kind), len(self.step_start), len(self.begins), len(self.vals))
        if self._cache is None or self._cache[0] != m:
            v = np.array(self.vals[:m], np.float64).reshape(m, 5)
            out = {
                "t": np.array(self.t[:m]),
                "kind": np.array(self.kind[:m], np.int8),
                "start": np.array(self.step_start[:m], bool),
                "begin": np.array(self.begins[:m], bool),
                "alloc": np.maximum.accumulate(v[:, 0]) if m else v[:, 0],
                "res": np.maximum.accumulate(v[:, 1]) if m else v[:, 1],
                "rss": np.maximum.accumulate(v[:, 2]) if m else v[:, 2],
            }
            for i, ph in enumerate(PHASES):
                col = np.where(v[:, 4] == i, v[:, 3], -1.0)
                out[ph] = np.maximum.accumulate(col) if m else col
            self._cache = (m, out)
        return self._cache[1]

    def peak(self, key: str, n: int) -> float | None:
        arr = self._arrays()[key]
        n = min(n, len(arr))
        if n <= 0 or arr[n - 1] < 0:
            return None
        return float(arr[n - 1])

    def phase_peaks(self, n: int) -> dict[str, int]:
        a = self._arrays()
        n = min(n, len(a["t"]))
        if n <= 0:
            return {}
        return {ph: int(a[ph][n - 1]) for ph in PHASES if a[ph][n - 1] >= 0}

    def arrays(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(time, activity index, starts a step) of the first ``n`` boundaries, as numpy arrays."""
        a = self._arrays()
        return a["t"][:n], a["kind"][:n], a["start"][:n]

    # -- per rank (several ranks of a DDP run share one phase stream) -------------------------------
    def ranks(self, n: int) -> tuple[int, ...]:
        """The ranks with at least one record among the first ``n``."""
        return tuple(sorted(r for r, pos in list(self.rank_pos.items()) if pos and pos[0] < n))

    def rank_positions(self, rank: int, n: int) -> list[int]:
        """Indices of ``rank``'s records among the first ``n`` (a copy: the list grows under a loader)."""
        pos = self.rank_pos.get(rank)
        if not pos:
            return []
        return pos[: bisect.bisect_left(pos, n)]

    def _rank_arrays(self, rank: int, n: int) -> tuple[int, dict[str, np.ndarray]]:
        """Running maxima over ``rank``'s records among the first ``n``: how many there are, and the arrays.

        Kept apart from ``_arrays`` so a single-rank run never pays for it; computed only when a
        view asks for one rank, and again only when that rank's records grew.
        """
        pos = self.rank_pos.get(rank) or []
        # Only positions below n: those records were complete when the snapshot was made (a loader
        # thread may be mid-append beyond them).
        k = bisect.bisect_left(pos, n)
        if k <= 0:
            return 0, {}
        cached = self._rank_cache.get(rank)
        if cached is None or cached[0] < k:
            v = np.array([self.vals[i] for i in pos[:k]], np.float64).reshape(k, 5)
            out: dict[str, np.ndarray] = {
                "alloc": np.maximum.accumulate(v[:, 0]),
                "res": np.maximum.accumulate(v[:, 1]),
                "rss": np.maximum.accumulate(v[:, 2]),
            }
            for i, ph in enumerate(PHASES):
                out[ph] = np.maximum.accumulate(np.where(v[:, 4] == i, v[:, 3], -1.0))
            cached = (k, out)
            self._rank_cache[rank] = cached
        return k, cached[1]

    def rank_arrays(self, rank: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like ``arrays``, over ``rank``'s boundaries among the first ``n``: (time, activity index,
        starts one of that rank's steps), read-only.

        Picked out of the whole run's arrays by ``rank_pos`` (no scan of the other ranks' records),
        once per rank and again only when that rank's records grew; a shorter prefix (a replay
        seeking back) is a slice of what is kept.
        """
        pos = self.rank_pos.get(rank) or []
        k = bisect.bisect_left(pos, n)  # only records complete when the snapshot was made (see ``_rank_arrays``)
        cached = self._rank_bounds.get(rank)
        if cached is None or cached[0] < k:
            a = self._arrays()
            idx = np.array(pos[:k], np.intp)
            t, kind, begin = (_read_only(a[key][idx]) for key in ("t", "kind", "begin"))
            cached = (k, (t, kind, begin))
            self._rank_bounds[rank] = cached
        t, kind, begin = cached[1]
        return t[:k], kind[:k], begin[:k]

    def rank_phase_peaks(self, rank: int, n: int) -> dict[str, int]:
        """Like ``phase_peaks``, over ``rank``'s records only: running maxima over that rank's subsequence."""
        k, arrays = self._rank_arrays(rank, n)
        if k <= 0:
            return {}
        return {ph: int(arrays[ph][k - 1]) for ph in PHASES if arrays[ph][k - 1] >= 0}

    def rank_peak(self, rank: int, key: str, n: int) -> float | None:
        """Like ``peak`` (``alloc``, ``res`` or ``rss``), over ``rank``'s records among the first ``n``."""
        k, arrays = self._rank_arrays(rank, n)
        if k <= 0 or arrays[key][k - 1] < 0:
            return None
        return float(arrays[key][k - 1])


def _rank_of(rec: dict[str, Any]) -> int:
    """A record's rank; a record without one comes from a single-rank writer, i.e. rank 0."""
    r = rec.get("rank")
    return r if isinstance(r, int) and not isinstance(r, bool) and r >= 0 else 0


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _num_or(v: Any, default: float = -1.0) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


@dataclass(frozen=True)
class Stall:
    """A followed run that has written no record for ``seconds``, and what its process is doing.

    ``process`` is what psutil says of the pid in the run's header: ``alive`` (running or
    sleeping: busy, or hung), ``stopped`` (SIGSTOP, or a debugger), ``gone`` (ended, or the pid now
    belongs to a newer process), ``elsewhere`` (another host: it cannot be checked from here) or
    ``unknown`` (no header yet, or no pid in it).
    """

    seconds: int
    process: str
    pid: int | None = None
    host: str | None = None

    def text(self) -> str:
        """One line for the header: how long nothing came, and whether the process is alive."""
        head = f"no data for {self.seconds} s"
        pid = self.pid
        return head + {
            "alive": f" · pid {pid} alive (busy or hung?)",
            "stopped": f" · pid {pid} stopped (SIGSTOP? `kill -CONT {pid}` resumes it)",
            "gone": f" · pid {pid} has ended",
            "elsewhere": f" · its process runs on {one_line(self.host)}: not checked from here",
        }.get(self.process, "")


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


@dataclass(frozen=True)
class ReplayState:
    """Where a replay stands: the playhead in run seconds, the speed, and how much is read yet."""

    position: float
    duration: float
    speed: float
    paused: bool
    loaded: float  # fraction of the profile read so far (1.0 once complete)


@dataclass(frozen=True)
class Snapshot:
    """What a run looks like at one moment; never changes after it is made.

    ``samples`` are read-only numpy views (NaN = not measured on this device); ``phases`` and
    ``steps`` are the records up to this moment. ``version`` changes whenever anything in it does,
    so a widget can skip work when nothing moved.
    """

    version: int
    mode: str  # "live" | "attach" | "replay"
    name: str
    path: Path | None
    status: str
    finished: bool
    now: float  # run seconds shown as elapsed
    header: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] | None = None
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    phases: Sequence[dict[str, Any]] = ()
    steps: Sequence[dict[str, Any]] = ()
    rank_steps: Sequence[dict[str, Any]] = ()  # the other ranks' ``rank_step`` records (``steps`` is rank 0's)
    # Each rank's samples apart, keyed like ``samples``; empty when every sample is rank 0's (one rank).
    rank_samples: Mapping[int, dict[str, np.ndarray]] = field(default_factory=dict)
    oom: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    exit: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()
    log: tuple[str, ...] = ()
    replay: ReplayState | None = None
    problem: str | None = None  # why the run cannot be read any more, in the user's words
    stall: Stall | None = None  # a followed run that has written nothing for a while, and its process
    data_version: int = 0  # changes only when samples, phases or steps do
    index: PhaseIndex | None = field(default=None, repr=False, compare=False)
    _memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # -- derived figures the views share ----------------------------------------------------------
    @property
    def n_samples(self) -> int:
        return len(self.samples.get("t", ()))

    @property
    def cuda(self) -> bool:
        return self.environment.get("device") == "cuda"

    @property
    def gpu_total(self) -> int | None:
        v = self.environment.get("gpu_total_bytes")
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def samples_of(self, rank: int | None) -> dict[str, np.ndarray]:
        """The samples of one rank, or every sample (``None``: all ranks, whose timeline is their envelope).

        A run whose samples are all rank 0's keeps no split: rank 0's are ``samples`` themselves,
        so a single-rank run draws from exactly the arrays it always did. A rank that has sampled
        nothing yet (announced, still starting) has no samples rather than someone else's.
        """
        if rank is None:
            return self.samples
        if not self.rank_samples:
            return self.samples if rank == 0 else {k: v[:0] for k, v in self.samples.items()}
        mine = self.rank_samples.get(rank)
        return mine if mine is not None else {k: v[:0] for k, v in self.samples.items()}

    def peaks(self, rank: int | None = None) -> dict[str, int | None]:
        """Peaks so far, by the same rules as ``RunData.peaks`` (allocator peaks at phases included).

        ``rank=None``: over the whole run (every rank). A rank: over its samples and its phase
        records only (and the load record, for rank 0, which writes it), so the figures beside one
        rank's timeline are that rank's.
        """
        memo_key = "peaks" if rank is None else ("peaks", rank)
        if memo_key in self._memo:
            return self._memo[memo_key]
        index = self.index
        if index is None:
            index = PhaseIndex()
            index.extend(list(self.phases))
        n = len(self.phases)
        samples = self.samples_of(rank)
        out: dict[str, int | None] = {}
        for key, col in (("allocated", "alloc"), ("reserved", "res"), ("device_used", "dev"), ("host_rss", "rss")):
            vals: list[float] = []
            arr = samples.get(col)
            if arr is not None and len(arr):
                m = np.nanmax(arr) if not np.isnan(arr).all() else np.nan
                if not np.isnan(m):
                    vals.append(float(m))
            if col in ("alloc", "res", "rss"):
                v = index.peak(col, n) if rank is None else index.rank_peak(rank, col, n)
                if v is not None:
                    vals.append(v)
            if (
                key == "allocated"
                and rank in (None, 0)
                and self.load
                and isinstance(self.load.get("peak"), (int, float))
            ):
                vals.append(float(self.load["peak"]))
            out[key] = int(max(vals)) if vals else None
        self._memo[memo_key] = out
        return out

    def latest_step(self, rank: int = 0) -> list[dict[str, Any]]:
        """The phase records of ``rank``'s newest step that has all four (last micro-step of each).

        A step still in progress would show half its bars; its predecessor is the steadier picture.
        Until one step is complete, the partial one is all there is. Always one rank's records:
        with several ranks interleaved in one stream, mixing them would draw a step nobody had.
        """
        mine = self.rank_records(rank, 96)
        if not mine:
            return []
        by_step: dict[Any, dict[str, dict[str, Any]]] = {}
        for p in mine:
            by_step.setdefault(p.get("step"), {})[p.get("phase", "")] = p
        steps = list(by_step)
        chosen = next((by_step[s] for s in reversed(steps) if all(ph in by_step[s] for ph in PHASES)), None)
        if chosen is None:
            chosen = by_step[steps[-1]]
        return [chosen[ph] for ph in PHASES if ph in chosen]

    def rank_records(self, rank: int, last: int) -> list[dict[str, Any]]:
        """``rank``'s newest ``last`` phase records, oldest first."""
        n = len(self.phases)
        if self.index is not None:
            return [self.phases[i] for i in self.index.rank_positions(rank, n)[-last:]]
        return [p for p in self.phases if _rank_of(p) == rank][-last:]

    def step_peaks(self, rank: int | None = None) -> dict[str, int]:
        """Highest total of each phase over all steps so far (what "each phase's peak" means).

        ``rank=None``: over every rank's records; otherwise over that rank's alone.
        """
        if self.index is not None:
            if rank is None:
                return self.index.phase_peaks(len(self.phases))
            return self.index.rank_phase_peaks(rank, len(self.phases))
        out: dict[str, int] = {}
        for p in self.phases:
            if rank is not None and _rank_of(p) != rank:
                continue
            ph, v = p.get("phase", ""), phase_total(p)
            if v > out.get(ph, -1):
                out[ph] = v
        return out

    def world_size(self) -> int:
        """How many ranks the run said it has (1 when it did not say: a single-rank run)."""
        for rec in (self.environment, self.plan, self.header):
            v = rec.get("world_size")
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return 1

    def ranks(self) -> tuple[int, ...]:
        """Every rank of the run: those it announced (``world_size``) and any heard from, ascending.

        The announced ones count before their first record arrives, so a live view offers rank 1
        from the start rather than growing a selector halfway through.
        """
        if "ranks" in self._memo:
            return self._memo["ranks"]
        index = self.index
        seen = set(index.ranks(len(self.phases))) if index is not None else {_rank_of(p) for p in self.phases}
        seen |= {_rank_of(s) for s in self.rank_steps}
        seen |= set(self.rank_samples)
        out = tuple(sorted(seen | set(range(self.world_size()))))
        self._memo["ranks"] = out
        return out

    def steps_of(self, rank: int) -> Sequence[dict[str, Any]]:
        """``rank``'s step records: ``steps`` for rank 0, its ``rank_step`` records for the others."""
        if rank == 0:
            return self.steps
        rank_steps = self.rank_steps

        def mine() -> tuple[dict[str, Any], ...]:
            return tuple(s for s in rank_steps if s.get("rank") == rank)

        if self.index is None:
            return mine()
        return self.index.remember(("steps_of", rank), (id(self.index), len(rank_steps)), mine)

    def boundaries(self, rank: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(time, activity index, starts a step) of the phase boundaries so far, as arrays: what the
        timeline's phase strip draws.

        ``rank=None``: every rank's boundaries, with rank 0's step starts (the whole run, and a
        single-rank run exactly as it always was). A rank: that rank's boundaries and its own step
        starts alone, so the strip under one rank's timeline is that rank's.
        """
        index = self.index
        if index is None:
            index = PhaseIndex()
            index.extend(list(self.phases))
        if rank is None:
            return index.arrays(len(self.phases))
        return index.rank_arrays(rank, len(self.phases))

    def total_steps(self) -> int | None:
        total = self.plan.get("total_steps")
        if isinstance(total, int) and total > 0:
            return total
        try:
            if self.config.get("job", {}).get("kind") == "train":
                return schedule(self.config).total_steps
        except (KeyError, TypeError, ZeroDivisionError, ValueError):
            return None
        return None

    def progress(self) -> tuple[int, int | None, float | None]:
        """Steps done, steps planned, and the estimated seconds left (None until it can be told)."""
        done = len(self.steps)
        total = self.total_steps()
        if total is None or done == 0 or self.finished:
            return done, total, None
        secs = [s["seconds"] for s in self.steps[-21:] if isinstance(s.get("seconds"), (int, float))]
        if len(secs) > 2:
            secs = secs[1:]  # the first step pays for warm-up
        recent = secs[-20:]
        per = sorted(recent)[len(recent) // 2] if recent else None
        eta = None if per is None else max(total - done, 0) * per
        return done, total, eta


class RunSource(ABC):
    """Anything the dashboard can show: ``poll()`` gives the current snapshot."""

    mode: str = "attach"
    run_dir: Path

    @abstractmethod
    def poll(self) -> Snapshot: ...

    def close(self) -> None:  # noqa: B027 - optional for sources holding nothing
        """Release threads or files; the default holds none."""


# -- the child's log -----------------------------------------------------------------------------


class LogTail:
    """The last lines of a growing text file, read incrementally; carriage returns end lines too,
    so a progress bar redrawn with ``\\r`` shows as its latest state rather than one huge line.

    Only the newest ``budget`` bytes are ever read at once: when more than that is waiting (a
    replay of a run that logged 30,000 warnings before its traceback, or an attach to a long run),
    the start is skipped and ``snapshot()`` begins with a line saying how much, so what ended the
    run is what the view shows. Every line comes out through ``safe_text.one_line``: escape
    sequences a child printed never reach the terminal, other control characters are made visible.
    """

    def __init__(self, path: Path, keep: int = LOG_LINES, budget: int = LOG_TAIL_BYTES) -> None:
        self.path = path
        self.lines: deque[str] = deque(maxlen=keep)
        self.budget = max(int(budget), 1)
        self.skipped = 0  # bytes at the start of the file left out to reach its tail (none shown)
        self._offset = 0
        self._partial = ""
        self._decoder = _utf8_decoder()
        self.version = 0

    def poll(self) -> bool:
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < self._offset:  # rewritten from the start: read it afresh
                    self._restart(0, 0)
                if size - self._offset > self.budget:
                    start = size - self.budget
                    fh.seek(start)
                    data = fh.read(self.budget)
                    # The line the cut falls in is partly skipped: drop it whole (unless it is all there is).
                    cut = data.find(b"\n")
                    drop = cut + 1 if 0 <= cut < len(data) - 1 else 0
                    self._restart(start + len(data), start + drop)  # lines read before are cleared too
                    data = data[drop:]
                else:
                    fh.seek(self._offset)
                    data = fh.read(self.budget)
                    self._offset += len(data)
        except OSError:
            return False
        if not data:
            return False
        text = self._partial + self._decoder.decode(data)
        parts = text.replace("\r\n", "\n").split("\n")
        self._partial = parts.pop()
        for part in parts:
            segs = [s for s in part.split("\r") if s.strip()]
            self.lines.append(one_line(segs[-1]) if segs else "")
        self.version += 1
        return True

    def _restart(self, offset: int, skipped: int) -> None:
        self.lines.clear()
        self._partial = ""
        self._decoder = _utf8_decoder()
        self._offset = offset
        self.skipped = skipped

    def skipped_line(self) -> str | None:
        """What the view says in place of the skipped start, or None when nothing was skipped."""
        if not self.skipped:
            return None
        return (
            f"[blipmon: {self.path.name} is long: its first {fmt_bytes(self.skipped)} ({self.skipped:,} bytes) "
            f"are skipped here; the whole log is {one_line(self.path)}]"
        )

    def snapshot(self) -> tuple[str, ...]:
        head = self.skipped_line()
        tail = (one_line(self._partial.split("\r")[-1]),) if self._partial.strip() else ()
        return ((head,) if head else ()) + tuple(self.lines) + tail


def _utf8_decoder() -> codecs.IncrementalDecoder:
    """UTF-8 across reads: a character split between two reads is decoded whole; invalid bytes become U+FFFD."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


# -- following a file ----------------------------------------------------------------------------


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
            self._last = _snapshot_of(
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
        if arrived and self.reader._offset > self._old_bytes:
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


def _snapshot_of(
    run: RunData,
    version: int,
    data_version: int,
    mode: str,
    status: str,
    now: float,
    log: tuple[str, ...],
    problem: str | None,
    *,
    n: tuple[int, int, int, int] | None = None,
    replay: ReplayState | None = None,
    upto: float | None = None,
    index: PhaseIndex | None = None,
    stall: Stall | None = None,
) -> Snapshot:
    arrays = run.samples.arrays()
    ns, nph, nst, nrs = n if n is not None else (len(arrays["t"]), len(run.phases), len(run.steps), len(run.rank_steps))
    samples = _sample_views(arrays, ns)
    # Each rank's samples among the first ``ns`` (nothing for a single-rank run, whose samples are all rank 0's).
    rank_samples = {
        r: _sample_views(cols, int(np.searchsorted(pos, ns))) for r, (pos, cols) in run.samples.by_rank().items()
    }

    def seen(ev: dict[str, Any] | None) -> dict[str, Any] | None:
        if ev is None or upto is None:
            return ev
        t = ev.get("t")
        return ev if not isinstance(t, (int, float)) or t <= upto else None

    return Snapshot(
        version=version,
        data_version=data_version,
        mode=mode,
        name=run.name,
        path=run.path,
        status=status,
        finished=status not in ("running", "starting"),
        now=now,
        header=run.header,
        config=run.config,
        environment=run.environment,
        plan=run.plan,
        load=seen(run.load),
        samples=samples,
        phases=Prefix(run.phases, nph),
        steps=Prefix(run.steps, nst),
        rank_steps=Prefix(run.rank_steps, nrs),
        rank_samples=MappingProxyType(rank_samples),
        oom=seen(run.oom),
        error=seen(run.error),
        exit=run.exit if upto is None else None,
        notes=tuple(run.notes),
        log=log,
        replay=replay,
        problem=problem,
        stall=stall,
        index=index,
    )


def _sample_views(arrays: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The first ``n`` samples of ``Samples.arrays()`` under the short names the dashboard uses."""
    return {
        "t": arrays["t"][:n],
        "rss": arrays["host_rss"][:n],
        "alloc": arrays["allocated"][:n],
        "res": arrays["reserved"][:n],
        "dev": arrays["device_used"][:n],
    }


# -- replay ---------------------------------------------------------------------------------------

SPEEDS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


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
        self.duration = _tail_last_t(self.run_dir / EVENTS)
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
        if not self._done:
            if background:
                self._thread = threading.Thread(target=self._load_rest, name="blipmon-replay-loader", daemon=True)
                self._thread.start()
            else:
                self._load_rest()

    # -- loading ------------------------------------------------------------------------------------
    def _read_some(self, first: bool = False) -> None:
        with self._lock:
            before = self.reader._offset
            try:
                self.run.follow(self.reader, max_bytes=min(self._chunk, 256 << 10) if first else self._chunk)
            except ProfileError as e:
                self._problem, self._done = str(e), True
                return
            self._phase_t.extend(float(p.get("t") or 0.0) for p in self.run.phases[len(self._phase_t) :])
            self.index.extend(self.run.phases)
            self._step_t.extend(float(s.get("t") or 0.0) for s in self.run.steps[len(self._step_t) :])
            rank_steps = self.run.rank_steps
            self._rank_step_t.extend(float(s.get("t") or 0.0) for s in rank_steps[len(self._rank_step_t) :])
            # Done when nothing more could be read: the end, or a truncated last line.
            self._done = self.reader._offset == before
            if self._done:
                self.duration = max(self.duration, self.run.last_t)
                self.run.warnings = list(self.reader.warnings)

    def _load_rest(self) -> None:
        while not self._done and not self._stop.is_set():
            self._read_some()
            time.sleep(0.002)  # hand the GIL to the UI between chunks: the view stays responsive

    @property
    def loaded(self) -> float:
        return 1.0 if self._done else min(self.reader._offset / self._size, 0.999)

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until the whole profile is read (benchmarks and tests)."""
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
                snap = _snapshot_of(
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

    def close(self) -> None:
        self._stop.set()


def _tail_last_t(path: Path, size: int = 1 << 16) -> float:
    """The latest ``t`` among the last records of a profile: its duration, without reading it all."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            end = fh.tell()
            fh.seek(max(end - size, 0))
            data = fh.read()
    except OSError:
        return 0.0
    best = 0.0
    for raw in data.split(b"\n")[1:] if len(data) == size else data.split(b"\n"):
        try:
            rec = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        t = rec.get("t") if isinstance(rec, dict) else None
        if isinstance(t, (int, float)) and not isinstance(t, bool) and t > best:
            best = float(t)
    return best


def open_source(run_dir: Path, mode: str, **kw: Any) -> RunSource:
    """The right source for a mode: ``replay`` plays back, ``live`` and ``attach`` follow the file."""
    if mode == "replay":
        return ReplaySource(run_dir, **kw)
    return FileFollowSource(run_dir, mode=mode, **kw)


__all__ = [
    "FileFollowSource",
    "LogTail",
    "ReplaySource",
    "ReplayState",
    "RunSource",
    "SPEEDS",
    "STALL_SECONDS",
    "Snapshot",
    "Stall",
    "open_source",
]
