"""What the dashboard shows of a multi-rank run: one rank's figures, or the spread across all of them.

A DDP run writes every rank's phase records into one stream (``rank`` on each), rank 0's steps as
``step`` and the others' as ``rank_step``. The run view lets the user pick one rank or "all";
``rank_view`` turns a ``Snapshot`` and that choice into a ``RankView``: frozen, built once per
snapshot and selection, so the widgets only draw and never compute (or mutate) anything.

In "all" mode each phase shows the lowest and the highest total across ranks and which rank had
the highest — the figure that decides whether the job fits is the worst rank's, and a gap between
ranks (rank 0 holding extra buffers, say) is what one wants to spot.

No Textual here (an import-linter contract says so).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from blipmon.core.run import CATEGORIES, PHASES, counted, phase_total
from blipmon.core.snapshot import LATEST_WINDOW, Snapshot

ALL: None = None  # the selection meaning "every rank at once"
_RECENT = LATEST_WINDOW  # phase records per rank looked at for the latest step counted in full (micro-steps included)

Record = Mapping[str, Any]


@dataclass(frozen=True)
class PhaseSpread:
    """One phase across ranks: the lowest and highest total, which ranks, and the highest's categories.

    A total is the sum of the record's categories (``bar_total``), the figure one rank's bar shows;
    the allocator's peak, a different question, is ``peak``.
    """

    phase: str
    lo: int
    lo_rank: int
    hi: int
    hi_rank: int
    values: tuple[int, ...]  # the highest rank's params, grads, optim, acts, other (``CATEGORIES``)
    peak: int | None  # the highest peak of this phase on any rank (allocator peak, or highest total seen)
    peak_rank: int | None
    ranks: int  # how many ranks reported this phase

    @property
    def even(self) -> bool:
        """All ranks at the same total: nothing to point at."""
        return self.lo == self.hi


@dataclass(frozen=True)
class RankView:
    """The run view's rank-dependent data for one snapshot and one selection (``None`` = all ranks).

    ``latest``/``peaks`` feed the phase bars and ``steps`` the step charts for one rank; in "all"
    mode ``spread`` holds each phase's min..max across ranks and ``steps`` the steps every rank
    finished (slowest time, mean loss, summed throughput).
    """

    ranks: tuple[int, ...]
    selected: int | None
    latest: tuple[Record, ...] = ()
    peaks: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    steps: Sequence[Record] = ()
    spread: tuple[PhaseSpread, ...] = ()
    spread_steps: tuple[int, ...] = ()  # the step(s) compared: one when every rank had it complete
    rank_peaks: tuple[tuple[int, int], ...] = ()  # (rank, its highest phase total so far), all mode only

    @property
    def multi(self) -> bool:
        return len(self.ranks) > 1

    @property
    def all_ranks(self) -> bool:
        return self.multi and self.selected is None

    @property
    def sample_rank(self) -> int | None:
        """Whose samples and phase strip the timeline, and whose memory figures the header, show: the
        selected rank, or ``None`` for the whole run (all ranks' envelope, every rank's boundaries with
        rank 0's step starts; and a single-rank run, drawn as it always was)."""
        return self.selected if self.multi else None

    def label(self) -> str:
        """The selection in words for the header ("" for a single-rank run, which looks as it always did)."""
        if not self.multi:
            return ""
        if self.selected is None:
            return f"all {len(self.ranks)} ranks"
        return f"rank {self.selected} of {len(self.ranks)}"

    def title(self) -> str:
        """The phase panel's title: which rank the bars are."""
        if not self.multi:
            return "phases"
        return "all ranks" if self.selected is None else f"rank {self.selected}"

    @property
    def key(self) -> tuple[Any, ...]:
        """Changes whenever what the widgets draw would: for their redraw caches."""
        return (self.selected, self.ranks, len(self.steps), len(self.rank_peaks))


def next_rank(ranks: Sequence[int], selected: int | None) -> int | None:
    """The selection after ``selected``: each rank in turn, then all of them, then the first again."""
    if len(ranks) <= 1:
        return ranks[0] if ranks else 0
    if selected is None or selected not in ranks:
        return ranks[0]
    i = list(ranks).index(selected)
    return ranks[i + 1] if i + 1 < len(ranks) else ALL


def complete_steps(records: Sequence[Record]) -> dict[Any, dict[str, Record]]:
    """One rank's records by step, then phase (the last micro-step of each phase wins), in step order."""
    by_step: dict[Any, dict[str, Record]] = {}
    for p in records:
        by_step.setdefault(p.get("step"), {})[str(p.get("phase", ""))] = p
    return by_step


def bar_total(rec: Record) -> int:
    """The sum of a phase record's categories: the length of its stacked bar."""
    return sum(int(rec.get(c) or 0) for c in CATEGORIES)


def phase_peak(rec: Record | None, seen: int | None) -> int | None:
    """A phase's peak: the allocator's peak within it on a GPU, else the highest total it reached so far."""
    if rec is not None and isinstance(rec.get("peak"), (int, float)) and not isinstance(rec.get("peak"), bool):
        return int(rec["peak"])
    if seen is not None:
        return seen
    return phase_total(dict(rec)) if rec is not None else None


def choose_steps(per_rank: Mapping[int, Sequence[Record]]) -> tuple[dict[int, dict[str, Record]], tuple[int, ...]]:
    """Which step of each rank to compare: the newest step every rank has complete, else each rank's latest.

    Ranks of one DDP job move in lockstep, but a live view catches them mid-step (rank 1 a phase
    behind rank 0); comparing the same step keeps a rank that is merely late from looking smaller.
    """
    grouped = {r: complete_steps(recs) for r, recs in per_rank.items() if recs}
    if not grouped:
        return {}, ()
    done = [{s for s, phs in g.items() if all(ph in phs for ph in PHASES)} for g in grouped.values()]
    # The steps counted in full (``counted``) carry every category; the ones between them only params and the
    # allocator's figures, so a common counted step is the one to compare.
    full = [{s for s in d if counted(g[s]["after_fwd"])} for d, g in zip(done, grouped.values(), strict=True)]
    common = set.intersection(*full) or set.intersection(*done)
    if common:
        s = max(common, key=lambda v: (isinstance(v, int), v if isinstance(v, int) else 0))
        return {r: g[s] for r, g in grouped.items()}, (s,) if isinstance(s, int) else ()
    chosen: dict[int, dict[str, Record]] = {}
    for r, g in grouped.items():
        steps = list(g)
        complete = [g[s] for s in reversed(steps) if all(ph in g[s] for ph in PHASES)]
        chosen[r] = next((c for c in complete if counted(c["after_fwd"])), complete[0] if complete else g[steps[-1]])
    shown = sorted({p.get("step") for phs in chosen.values() for p in phs.values() if isinstance(p.get("step"), int)})
    return chosen, tuple(shown)


def phase_spread(
    chosen: Mapping[int, Mapping[str, Record]], peaks_by_rank: Mapping[int, Mapping[str, int]]
) -> tuple[PhaseSpread, ...]:
    """Each phase's lowest and highest total across ranks; ties go to the lowest rank. Pure, for tests."""
    out = []
    for ph in PHASES:
        have = sorted((r, phs[ph]) for r, phs in chosen.items() if ph in phs)
        if not have:
            continue
        totals = [(bar_total(rec), r) for r, rec in have]
        lo, lo_rank = min(totals, key=lambda x: (x[0], x[1]))
        hi, hi_rank = max(totals, key=lambda x: (x[0], -x[1]))
        hi_rec = dict(have)[hi_rank]
        peaks = [(v, r) for r, rec in have if (v := phase_peak(rec, peaks_by_rank.get(r, {}).get(ph))) is not None]
        peak, peak_rank = max(peaks, key=lambda x: (x[0], -x[1])) if peaks else (None, None)
        out.append(
            PhaseSpread(
                phase=ph,
                lo=lo,
                lo_rank=lo_rank,
                hi=hi,
                hi_rank=hi_rank,
                values=tuple(int(hi_rec.get(c) or 0) for c in CATEGORIES),
                peak=peak,
                peak_rank=peak_rank,
                ranks=len(have),
            )
        )
    return tuple(out)


def combine_steps(by_rank: Mapping[int, Sequence[Record]]) -> tuple[Record, ...]:
    """The steps every reporting rank finished, as one record each: the slowest rank's time (the job
    waits for it), the mean loss (what DDP's averaged gradients follow) and the summed throughput."""
    reporting = {r: steps for r, steps in by_rank.items() if steps}
    if not reporting:
        return ()
    per_step: dict[int, list[Record]] = {}
    for steps in reporting.values():
        for s in steps:
            if isinstance(s.get("step"), int):
                per_step.setdefault(s["step"], []).append(s)
    out = []
    for step in sorted(per_step):
        recs = per_step[step]
        if len(recs) < len(reporting):
            continue  # a rank has not finished it yet (or stopped before it)
        secs = [float(v) for s in recs if _is_num(v := s.get("seconds"))]
        loss = [float(v) for s in recs if _is_num(v := s.get("loss"))]
        rate = [float(v) for s in recs if _is_num(v := s.get("samples_per_s"))]
        out.append(
            MappingProxyType(
                {
                    "step": step,
                    "seconds": max(secs) if secs else None,
                    "loss": sum(loss) / len(loss) if loss else None,
                    "samples_per_s": sum(rate) if rate else None,
                }
            )
        )
    return tuple(out)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def rank_view(snap: Snapshot, selected: int | None = 0) -> RankView:
    """The rank-dependent figures of ``snap`` for ``selected`` (a rank, or ``ALL``); memoised per snapshot.

    A single-rank run gives exactly what the view showed before ranks existed (rank 0's latest
    step, peaks over every record, ``snap.steps``), whatever ``selected`` says.
    """
    key = ("rank_view", selected)
    if key in snap._memo:
        return snap._memo[key]
    ranks = snap.ranks()
    view: RankView
    if len(ranks) <= 1:
        only = ranks[0] if ranks else 0
        view = RankView(
            ranks=ranks or (0,),
            selected=only,
            latest=_frozen(snap.latest_step(only)),
            peaks=MappingProxyType(snap.step_peaks()),
            steps=snap.steps if only == 0 else _frozen(snap.steps_of(only)),
        )
    elif selected is not None:
        rank = selected if selected in ranks else ranks[0]
        view = RankView(
            ranks=ranks,
            selected=rank,
            latest=_frozen(snap.latest_step(rank)),
            peaks=MappingProxyType(snap.step_peaks(rank)),
            steps=snap.steps if rank == 0 else _frozen(snap.steps_of(rank)),
        )
    else:
        peaks_by_rank = {r: snap.step_peaks(r) for r in ranks}
        chosen, shown = choose_steps({r: snap.rank_records(r, _RECENT) for r in ranks})
        view = RankView(
            ranks=ranks,
            selected=ALL,
            peaks=MappingProxyType(snap.step_peaks()),
            steps=_combined_steps(snap, ranks),
            spread=phase_spread(chosen, peaks_by_rank),
            spread_steps=shown,
            rank_peaks=tuple((r, max(p.values())) for r, p in peaks_by_rank.items() if p),
        )
    snap._memo[key] = view
    return view


def _combined_steps(snap: Snapshot, ranks: tuple[int, ...]) -> tuple[Record, ...]:
    """``combine_steps`` of every rank, reused across snapshots until a step arrives (or a replay seeks)."""

    def make() -> tuple[Record, ...]:
        return combine_steps({r: snap.steps_of(r) for r in ranks})

    if snap.index is None:
        return make()
    return snap.index.remember("combined_steps", (ranks, len(snap.steps), len(snap.rank_steps)), make)


def _frozen(records: Sequence[dict[str, Any]]) -> tuple[Record, ...]:
    """Read-only views of records (no copy): a widget holding them cannot change the run under others."""
    return tuple(MappingProxyType(r) for r in records)


__all__ = [
    "ALL",
    "PhaseSpread",
    "bar_total",
    "RankView",
    "choose_steps",
    "combine_steps",
    "complete_steps",
    "next_rank",
    "phase_peak",
    "phase_spread",
    "rank_view",
]
