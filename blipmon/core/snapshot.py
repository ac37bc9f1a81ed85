"""What the dashboard draws from: ``Snapshot``, an immutable picture of a run at one moment, and ``RunSource``.

A ``RunSource`` is polled; each ``poll()`` returns a ``Snapshot``. Widgets only ever read snapshots,
so they cannot tell (and need not care) whether the file is still growing, was written by another
process, or is being played back at 8x. Tests inject a source built from a recorded profile and a
frozen clock. The sources: ``ReplaySource`` (core/replay.py) plays a saved run back;
``FileFollowSource`` (runner/follow.py) follows one being written, and checks on its process.

No Textual here (import-linter's layers contract says so): the same snapshots drive benchmarks and tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from blipmon.core.module_view import predicted_rows, rows_seen
from blipmon.core.modules import ModuleRow
from blipmon.core.phase_index import PhaseIndex, rank_of
from blipmon.core.run import PHASES, RunData, counted, phase_total
from blipmon.core.safe_text import one_line
from blipmon.core.schedule import schedule

# How many of a rank's newest phase records the phase bars look through for a step counted in full: steps 0 and 1
# and every ``runtime.module_every``-th are (default 10: 40 records apart without gradient accumulation).
LATEST_WINDOW = 1024


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
    # Per-module figures (issue 12): the rows recorded so far (a replay: those of the boundaries it has reached),
    # and the prediction the run saved when it started (its ``modules`` are the predicted rows).
    module_rows: Sequence[ModuleRow] = ()
    modules_unreadable: str | None = None  # per-module records dropped as damaged, in the user's words
    prediction: dict[str, Any] | None = None
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
        """The phase records of ``rank``'s newest step that has all four (last micro-step of each) and was counted
        in full.

        A step still in progress would show half its bars; its predecessor is the steadier picture. The steps
        between those counted in full (``runtime.module_every``) carry no grads, optimizer state or activations,
        so the bars stay on the newest counted one. Until one such step is complete, the newest is all there is.
        Always one rank's records: with several ranks interleaved in one stream, mixing them would draw a step
        nobody had.
        """
        by_step, complete = self._recent_steps(rank)
        if not by_step:
            return []
        chosen = next((c for c in complete if counted(c["after_fwd"])), complete[0] if complete else None)
        if chosen is None:
            chosen = by_step[next(reversed(by_step))]
        return [chosen[ph] for ph in PHASES if ph in chosen]

    def newest_complete_step(self, rank: int = 0) -> Any:
        """The newest step of ``rank`` with all four phases recorded, counted in full or not (None: none yet).

        When it is newer than ``latest_step``'s, the bars show an older step, the newest counted in full."""
        _by_step, complete = self._recent_steps(rank)
        return complete[0]["after_fwd"].get("step") if complete else None

    def _recent_steps(self, rank: int) -> tuple[dict[Any, dict[str, dict[str, Any]]], list[dict[str, dict[str, Any]]]]:
        """``rank``'s newest records by step, then phase (the last micro-step of each), and the steps with all four
        phases, newest first; once per snapshot and rank, for ``latest_step`` and ``newest_complete_step``."""
        key = ("recent_steps", rank)
        if key not in self._memo:
            by_step: dict[Any, dict[str, dict[str, Any]]] = {}
            for p in self.rank_records(rank, LATEST_WINDOW):
                by_step.setdefault(p.get("step"), {})[p.get("phase", "")] = p
            complete = [phs for phs in reversed(by_step.values()) if all(ph in phs for ph in PHASES)]
            self._memo[key] = (by_step, complete)
        return self._memo[key]

    def rank_records(self, rank: int, last: int) -> list[dict[str, Any]]:
        """``rank``'s newest ``last`` phase records, oldest first."""
        n = len(self.phases)
        if self.index is not None:
            return [self.phases[i] for i in self.index.rank_positions(rank, n)[-last:]]
        return [p for p in self.phases if rank_of(p) == rank][-last:]

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
            if rank is not None and rank_of(p) != rank:
                continue
            ph, v = p.get("phase", ""), phase_total(p)
            if v > out.get(ph, -1):
                out[ph] = v
        return out

    def predicted_modules(self) -> list[ModuleRow]:
        """The saved prediction's per-module rows ([] when it saved none), read once per snapshot."""
        if "predicted_modules" not in self._memo:
            self._memo["predicted_modules"] = predicted_rows(self.prediction)
        return self._memo["predicted_modules"]

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
        seen = set(index.ranks(len(self.phases))) if index is not None else {rank_of(p) for p in self.phases}
        seen |= {rank_of(s) for s in self.rank_steps}
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

    @property
    def problem(self) -> str | None:
        """Why the run cannot be read (any more), in the user's words; None while it can."""
        return None

    def view_shown(self) -> None:  # noqa: B027 - optional for sources that read everything at once
        """The view has drawn its first frame: a source reading a big profile in the background starts now.

        Until then its loader holds back (a second at most), so parsing the rest of the file does not
        compete with the first frame for the interpreter.
        """

    def close(self) -> None:  # noqa: B027 - optional for sources holding nothing
        """Release threads or files; the default holds none."""


def snapshot_of(
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
    samples = sample_views(arrays, ns)
    # Each rank's samples among the first ``ns`` (nothing for a single-rank run, whose samples are all rank 0's).
    rank_samples = {
        r: sample_views(cols, int(np.searchsorted(pos, ns))) for r, (pos, cols) in run.samples.by_rank().items()
    }

    def seen(ev: dict[str, Any] | None) -> dict[str, Any] | None:
        if ev is None or upto is None:
            return ev
        t = ev.get("t")
        return ev if not isinstance(t, (int, float)) or t <= upto else None

    rows = run.modules.rows
    n_rows = len(rows) if upto is None else rows_seen(Prefix(rows, len(rows)), run.phases, nph)
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
        module_rows=Prefix(rows, n_rows),
        modules_unreadable=run.modules.unreadable(),
        prediction=seen(run.prediction),
    )


def sample_views(arrays: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The first ``n`` samples of ``Samples.arrays()`` under the short names the dashboard uses."""
    return {
        "t": arrays["t"][:n],
        "rss": arrays["host_rss"][:n],
        "alloc": arrays["allocated"][:n],
        "res": arrays["reserved"][:n],
        "dev": arrays["device_used"][:n],
    }
