"""Per-module memory as views: one boundary's tree, which boundary a view starts at, runs compared module by module.

``core/modules.py`` folds the records into ``ModuleRow``s; this module turns rows into what people look at, once,
for every consumer: ``show --modules`` and ``compare --modules`` (text, markdown, CSV, JSON through
``core/report.py``), the dashboard's module view and the compare view's module section. Pure data: no Textual,
no printing, so the command line and the dashboard cannot disagree about a figure, an order or a depth.

The tree is the recorded one. A module's parent is the longest dotted prefix of its path that was recorded (the
root ``""`` above the rest), and its depth counts recorded ancestors: the writer records every path down to
``runtime.module_depth`` levels (``core.modules.tree_levels``: ``language_model.model`` and, a single child being
no level of its own, ``language_model.model.decoder`` at the default 2), which nest here at depths 2 and 3;
``--depth 1`` shows the root's children. A tree with gaps (``language_model.model.decoder`` recorded without
``language_model.model``, as another writer could leave it) still nests: the decoder is ``language_model``'s
child, depth 2. Children are sorted by their total at the selected
boundary, largest first (ties by path, so the order never flickers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from blipmon.core.errors import UsageError
from blipmon.core.modules import (
    CURSOR_START,
    MODULE_CATEGORIES,
    PHASE_ORDER,
    ModuleRecords,
    ModuleRow,
    rows_from_json,
)

ROOT = ""
ROOT_LABEL = "(model)"  # how the root is named in tables and the dashboard: "" reads as nothing
PREDICTED_STEPS = (0, 1)  # the estimator models step 0 and the steady state from step 1 on
# Why a run has no per-module figures, in the user's words (show, compare and the dashboard say the same).
NO_MODULES = (
    "no per-module figures: module attribution was off (runtime.module_depth = 0), the profile was recorded before"
    " blipmon attributed memory to modules, or the run has not reached its first phase boundary yet"
)


class Boundary(NamedTuple):
    """One phase boundary of one rank: the same tuple as ``ModuleRow.boundary``."""

    rank: int
    step: int
    micro_step: int
    phase: str

    def label(self) -> str:
        """``step 3 after_fwd`` (with the micro-step and rank where they are not 0): how headers name it."""
        micro = f" micro-step {self.micro_step}" if self.micro_step else ""
        rank = f" rank {self.rank}" if self.rank else ""
        return f"step {self.step} {self.phase}{micro}{rank}"

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "micro_step": self.micro_step, "rank": self.rank, "phase": self.phase}


@dataclass(frozen=True)
class ModuleNode:
    """One module of one boundary's tree, its figures, its predicted figures (if any) and its sorted children."""

    path: str
    label: str  # its name below its parent (``model.decoder`` under ``language_model``), ROOT_LABEL for the root
    depth: int  # 0 for the root, 1 for its children, …
    row: ModuleRow
    predicted: ModuleRow | None = None
    children: tuple[ModuleNode, ...] = ()

    @property
    def total(self) -> int:
        return self.row.total


# -- the tree ---------------------------------------------------------------------------------------------------------


def parents(paths: Iterable[str]) -> dict[str, str | None]:
    """Each path's parent among ``paths``: its longest recorded dotted prefix, else the root (None for the root,
    and for a top-level path of a tree that has no root row)."""
    names = set(paths)
    top = ROOT if ROOT in names else None
    out: dict[str, str | None] = {}
    for p in names:
        if p == ROOT:
            out[p] = None
            continue
        parts = p.split(".")
        out[p] = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in names), top)
    return out


def depths(paths: Iterable[str]) -> dict[str, int]:
    """Each path's depth in the recorded tree: 0 for the root, 1 for what hangs from it directly, …"""
    up = parents(paths)
    out: dict[str, int] = {}

    def depth(p: str) -> int:
        if p not in out:
            par = up[p]
            out[p] = 0 if p == ROOT else 1 if par is None or par == ROOT else depth(par) + 1
        return out[p]

    for p in up:
        depth(p)
    return out


def _label(path: str, parent: str | None) -> str:
    if path == ROOT:
        return ROOT_LABEL
    return path[len(parent) + 1 :] if parent else path


def build_tree(rows: Sequence[ModuleRow], predicted: Mapping[str, ModuleRow] | None = None) -> tuple[ModuleNode, ...]:
    """One boundary's rows as a tree (normally one root node); children sorted by total, largest first."""
    by_path = {r.module: r for r in rows}
    up = parents(by_path)
    deep = depths(by_path)
    kids: dict[str | None, list[str]] = {}
    for p, par in up.items():
        kids.setdefault(par, []).append(p)

    def node(p: str) -> ModuleNode:
        children = sorted(kids.get(p, ()), key=lambda c: (-by_path[c].total, c))
        return ModuleNode(
            p, _label(p, up[p]), deep[p], by_path[p], (predicted or {}).get(p), tuple(node(c) for c in children)
        )

    return tuple(node(p) for p in sorted(kids.get(None, ()), key=lambda c: (-by_path[c].total, c)))


def walk(
    roots: Sequence[ModuleNode], *, max_depth: int | None = None, expanded: Iterable[str] | None = None
) -> list[ModuleNode]:
    """The nodes in display order (each before its children): down to ``max_depth`` (None: all), and into a
    node's children only where its path is in ``expanded`` (None: every node is open)."""
    open_ = None if expanded is None else set(expanded)
    out: list[ModuleNode] = []

    def visit(n: ModuleNode) -> None:
        if max_depth is not None and n.depth > max_depth:
            return
        out.append(n)
        if open_ is None or n.path in open_:
            for c in n.children:
                visit(c)

    for r in roots:
        visit(r)
    return out


def check_depth(depth: int | None) -> None:
    """``--depth``: 0 or more (0 = the root alone, 1 = its children, …); None = the whole recorded tree."""
    if depth is not None and depth < 0:
        raise UsageError(f"--depth {depth}: must be 0 or more (0 = the model alone, 1 = its children, …)")


# -- which boundary ---------------------------------------------------------------------------------------------------


def boundary_of(row: ModuleRow) -> Boundary:
    return Boundary(*row.boundary)


def rows_at(records: ModuleRecords, b: Boundary) -> list[ModuleRow]:
    return records.at(b.step, b.phase, rank=b.rank, micro_step=b.micro_step)


def default_boundary(records: ModuleRecords, peak_phase: Mapping[str, Any] | None) -> Boundary | None:
    """Where a view of one run starts: the run's peak phase record's boundary (what ``show`` marks ``<- peak``),
    else (no module figures there: a step recorded without them, a run stopped before) the last one recorded,
    rank 0's where it has any. None when the run has no module figures."""
    if peak_phase is not None:
        rank, step, micro = peak_phase.get("rank") or 0, peak_phase.get("step"), peak_phase.get("micro_step") or 0
        phase = peak_phase.get("phase")
        if isinstance(step, int) and isinstance(phase, str):
            b = Boundary(int(rank), step, int(micro), phase)
            if rows_at(records, b):
                return b
    every = records.boundaries(0) or records.boundaries()
    return Boundary(*every[-1]) if every else None


def _ranges(values: Iterable[int]) -> str:
    """``0-3, 5, 7-8``: recorded steps in few characters."""
    nums = sorted(set(values))
    out: list[str] = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ", ".join(out)


def _root_total(records: ModuleRecords, b: Boundary) -> int:
    return next((r.total for r in rows_at(records, b) if r.module == ROOT), 0)


def select_boundary(
    records: ModuleRecords, peak_phase: Mapping[str, Any] | None, *, step: int | None = None, phase: str | None = None
) -> Boundary:
    """``show --modules [--step S] [--phase P]``'s boundary (rank 0, the step's last micro-step).

    Neither: ``default_boundary``. A step alone: that step's phase with the largest total (its peak among the
    recorded boundaries). A phase alone: the default boundary's step when it has that phase, else the last step
    that does. Raises ``UsageError`` (exit 2) naming what was recorded when the choice does not exist.
    """
    if phase is not None and phase not in PHASE_ORDER:
        raise UsageError(f"--phase {phase!r}: not a phase; one of {', '.join(PHASE_ORDER)}")
    if step is not None and step < 0:
        raise UsageError(f"--step {step}: steps count from 0")
    start = default_boundary(records, peak_phase)
    if start is None:
        raise UsageError("no module figures recorded")
    if step is None and phase is None:
        return start
    mine = [Boundary(*b) for b in (records.boundaries(start.rank) or records.boundaries())]
    recorded = _ranges(b.step for b in mine)
    if step is not None:
        at_step = [b for b in mine if b.step == step]
        if not at_step:
            raise UsageError(f"--step {step}: no module figures at that step; recorded at steps {recorded}")
        if phase is None:
            last = {b.phase: b for b in at_step}  # each phase's last micro-step
            return max(last.values(), key=lambda b: (_root_total(records, b), -PHASE_ORDER[b.phase]))
        found = [b for b in at_step if b.phase == phase]
        if not found:
            has = ", ".join(p for p in PHASE_ORDER if any(b.phase == p for b in at_step))
            raise UsageError(
                f"--step {step} --phase {phase}: no module figures at that boundary; step {step} has {has}"
            )
        return found[-1]
    with_phase = [b for b in mine if b.phase == phase]
    if not with_phase:
        raise UsageError(f"--phase {phase}: no module figures at that phase in any step (steps {recorded})")
    same_step = [b for b in with_phase if b.step == start.step]
    return (same_step or with_phase)[-1]


# -- predicted beside measured ----------------------------------------------------------------------------------------


def predicted_rows(prediction: Any) -> list[ModuleRow]:
    """The per-module rows of a saved prediction (``RunData.prediction``), [] when it has none."""
    return rows_from_json(prediction.get("modules")) if isinstance(prediction, dict) else []


def predicted_at(predicted: Sequence[ModuleRow], step: int, phase: str) -> dict[str, ModuleRow]:
    """The predicted rows for a measured boundary, by path: the estimate's step 0 for step 0, its step 1 (the
    steady state, optimizer state held) for every later step; {} where it predicted no such phase."""
    want = min(step, max(PREDICTED_STEPS))
    rows = [r for r in predicted if r.phase == phase and r.step <= want]
    if not rows:
        return {}
    best = max(r.step for r in rows)
    return {r.module: r for r in rows if r.step == best}


def boundary_tree(records: ModuleRecords, b: Boundary, prediction: Any = None) -> tuple[ModuleNode, ...]:
    """The tree of one boundary, with the prediction's figures beside each module where the run saved them."""
    return build_tree(rows_at(records, b), predicted_at(predicted_rows(prediction), b.step, b.phase))


def tree_json(nodes: Sequence[ModuleNode]) -> list[dict[str, Any]]:
    """``show --modules --json``: the shown nodes as the summary's fixed ``modules`` objects, in display order,
    plus ``depth`` (in the recorded tree) and ``predicted`` (the saved prediction's four figures, or null; only
    when the run saved a per-module prediction)."""
    with_pred = any(n.predicted is not None for n in nodes)
    out = []
    for n in nodes:
        obj = {**n.row.to_json(), "depth": n.depth}
        if with_pred:
            obj["predicted"] = None if n.predicted is None else {c: getattr(n.predicted, c) for c in MODULE_CATEGORIES}
        out.append(obj)
    return out


# -- runs compared module by module -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleDiff:
    """One module across runs: its row in each (None where that run recorded no such module)."""

    path: str
    depth: int
    rows: tuple[ModuleRow | None, ...]
    name: str = ""  # its name below its parent (``model.decoder`` under ``language_model``), as trees show it

    @property
    def label(self) -> str:
        return ROOT_LABEL if self.path == ROOT else self.path

    def value(self, i: int, cat: str) -> int | None:
        """Run ``i``'s figure for ``cat`` (a category or ``total``), None where it has no such module."""
        r = self.rows[i]
        return None if r is None else r.total if cat == "total" else int(getattr(r, cat))

    def delta(self, i: int, cat: str) -> int | None:
        """Run ``i``'s figure minus the first run's, None where either has no such module."""
        a, b = self.value(0, cat), self.value(i, cat)
        return None if a is None or b is None else b - a

    @property
    def only_in(self) -> tuple[int, ...]:
        """The runs that recorded this module, when not all of them did (() when all did)."""
        present = tuple(i for i, r in enumerate(self.rows) if r is not None)
        return () if len(present) == len(self.rows) else present

    @property
    def changed(self) -> bool:
        """Whether any run's figures differ from the first run's (a module missing from a run is a change)."""
        if self.only_in:
            return True
        first = self.rows[0]
        assert first is not None
        return any(any(getattr(r, c) != getattr(first, c) for c in MODULE_CATEGORIES) for r in self.rows[1:] if r)


def compare_boundaries(runs: Sequence[Any]) -> list[Boundary | None]:
    """Each run's boundary for ``compare --modules``: the first run's default (its peak phase); every other run
    at the same step and phase where it recorded them (rank 0, last micro-step), so "act_ckpt vs not" compares
    the same moment; else its own default. None for a run without module figures."""
    out: list[Boundary | None] = []
    first: Boundary | None = None
    for i, run in enumerate(runs):
        own = default_boundary(run.modules, run.peak_phase())
        if i == 0:
            first = own
            out.append(own)
            continue
        same = run.modules.at(first.step, first.phase, rank=0) if first is not None else []
        out.append(boundary_of(same[0]) if same else own)
    return out


def compare_modules(per_run: Sequence[Sequence[ModuleRow]]) -> list[ModuleDiff]:
    """Every module recorded by any run, matched by path, in tree order (children by their largest total in any
    run, largest first): what ``compare --modules`` and the compare view show."""
    maps = [{r.module: r for r in rows} for rows in per_run]
    paths = {p for m in maps for p in m}
    up = parents(paths)
    deep = depths(paths)
    size = {p: max(m[p].total for m in maps if p in m) for p in paths}
    kids: dict[str | None, list[str]] = {}
    for p, par in up.items():
        kids.setdefault(par, []).append(p)
    out: list[ModuleDiff] = []

    def visit(p: str) -> None:
        out.append(ModuleDiff(p, deep[p], tuple(m.get(p) for m in maps), _label(p, up[p])))
        for c in sorted(kids.get(p, ()), key=lambda c: (-size[c], c)):
            visit(c)

    for p in sorted(kids.get(None, ()), key=lambda c: (-size[c], c)):
        visit(p)
    return out


def run_module_diffs(runs: Sequence[Any]) -> tuple[list[Boundary | None], list[ModuleDiff]]:
    """The boundaries ``compare_boundaries`` picks and the modules compared at them (runs are ``RunData``)."""
    bounds = compare_boundaries(runs)
    rows = [rows_at(r.modules, b) if b is not None else [] for r, b in zip(runs, bounds, strict=True)]
    return bounds, compare_modules(rows)


# -- the dashboard's module view (ui/widgets/modules.py draws it) -------------------------------------------------------


def rows_seen(rows: Sequence[ModuleRow], phases: Sequence[Mapping[str, Any]], n_phases: int) -> int:
    """How many of a run's ``rows`` (recording order) a replay has reached when it shows ``phases[:n_phases]``.

    A boundary's module figures are seen with its phase record: a row is in when its boundary is at or before
    its rank's last phase record shown. Rows are recorded in the run's order, so the rows in form a prefix,
    found by bisection (a replay asks on every frame; a long run holds tens of thousands of rows).
    """
    last: dict[int, tuple[int, int, int]] = {}
    ranks = ({r.rank for r in rows[-64:]} | {rows[0].rank}) if rows else set()
    for i in range(n_phases - 1, max(n_phases - 1 - 64 * max(len(ranks), 1), -1), -1):
        p = phases[i]
        rank = p.get("rank") or 0
        if rank not in last:
            last[rank] = (int(p.get("step") or 0), int(p.get("micro_step") or 0), PHASE_ORDER.get(p.get("phase"), -1))
        if ranks <= set(last):
            break

    def seen(r: ModuleRow) -> bool:
        at = last.get(r.rank)
        return at is not None and (r.step, r.micro_step, PHASE_ORDER[r.phase]) <= at

    lo, hi = 0, len(rows)
    while lo < hi:
        mid = (lo + hi) // 2
        if seen(rows[mid]):
            lo = mid + 1
        else:
            hi = mid
    return lo


class RowIndex:
    """Where each boundary's rows lie in a run's append-only row list, extended as a view sees more of it.

    The dashboard's module view asks for one boundary's rows on every frame; scanning every row of a long run
    each time would cost the view its idle CPU. Held by one reader (the dashboard's UI thread), so it needs no
    lock; a replay seeking back (fewer rows) trims it.
    """

    def __init__(self) -> None:
        self.n = 0
        self.spans: dict[Boundary, list[tuple[int, int]]] = {}  # first-seen order = recording order

    def update(self, rows: Sequence[ModuleRow]) -> None:
        n = len(rows)
        if n < self.n:
            self.spans = {b: [(a, min(z, n)) for a, z in sp if a < n] for b, sp in self.spans.items()}
            self.spans = {b: sp for b, sp in self.spans.items() if sp}
        for i in range(min(self.n, n), n):
            b = Boundary(*rows[i].boundary)
            sp = self.spans.setdefault(b, [])
            if sp and sp[-1][1] == i:
                sp[-1] = (sp[-1][0], i + 1)
            else:
                sp.append((i, i + 1))
        self.n = n

    def boundaries(self, rank: int) -> list[Boundary]:
        """The rank's boundaries in recording order, each micro-step's apart."""
        return [b for b in self.spans if b.rank == rank]

    def rows(self, rows: Sequence[ModuleRow], b: Boundary) -> list[ModuleRow]:
        return [rows[i] for a, z in self.spans.get(b, ()) for i in range(a, z)]


@dataclass(frozen=True)
class ModulePanel:
    """What the run view's module view draws: one boundary's tree, opened where the user opened it."""

    boundary: Boundary | None
    following: bool  # True: the view follows the run (the latest step); False: a boundary the user chose
    position: int  # the boundary's place among the rank's boundaries (0-based), for "3/12"
    count: int  # how many boundaries the rank has recorded
    nodes: tuple[ModuleNode, ...] = ()  # the open part of the tree, in display order
    openable: frozenset[str] = frozenset()  # paths that have children
    expanded: frozenset[str] = frozenset()
    with_prediction: bool = False
    oom: str | None = None  # where the run ran out of memory (``in language_model.x (backward)``), if it did
    oom_paths: frozenset[str] = frozenset()  # the recorded modules on the way to the one running then


def oom_text(oom: Mapping[str, Any] | None) -> str | None:
    """``in language_model.model.decoder.layers.1 (backward)``: the module an OOM record names, or None."""
    mod = oom.get("module") if oom else None
    if not isinstance(mod, str):
        return None
    how = oom.get("module_pass") if oom else None
    return f"in {ROOT_LABEL if mod == ROOT else mod}" + (f" ({how})" if isinstance(how, str) else "")


def boundary_before_oom(bounds: Sequence[Boundary], oom: Mapping[str, Any]) -> Boundary | None:
    """Of a rank's boundaries (recording order), the last one reached before the OOM (``ModuleRecords.last_before``'s
    rule: the job's cursor names the interval it failed in, which starts at a boundary of that micro-step)."""
    step, micro = oom.get("step"), oom.get("micro_step") or 0
    cursor = oom.get("phase")
    start = CURSOR_START.get(cursor, cursor) if isinstance(cursor, str) else None
    if not isinstance(step, int) or not isinstance(micro, int):
        return None
    limit = (step, micro, PHASE_ORDER[start]) if start in PHASE_ORDER else (step, 0, -1)
    found = [b for b in bounds if (b.step, b.micro_step, PHASE_ORDER[b.phase]) <= limit]
    return found[-1] if found else None


def step_peak_boundary(index: RowIndex, rows: Sequence[ModuleRow], bounds: Sequence[Boundary], step: int) -> Boundary:
    """Of one step's boundaries (each phase at its last micro-step), the one whose root holds the most; on a
    tie the earlier phase. ``bounds`` must hold at least one boundary of ``step``."""
    last = {b.phase: b for b in bounds if b.step == step}

    def root(b: Boundary) -> int:
        return next((r.total for r in index.rows(rows, b) if r.module == ROOT), 0)

    return max(last.values(), key=lambda b: (root(b), -PHASE_ORDER[b.phase]))


def module_panel(
    index: RowIndex,
    rows: Sequence[ModuleRow],
    *,
    rank: int = 0,
    step_hint: int | None = None,
    pinned: Boundary | None = None,
    expanded: Iterable[str] = (ROOT,),
    predicted: Sequence[ModuleRow] = (),
    oom: Mapping[str, Any] | None = None,
) -> ModulePanel:
    """The module view's content for the rows a snapshot holds (``index`` updated to them here).

    Following (no ``pinned`` boundary, or one the snapshot does not hold, as after a replay seeks back): the step
    the phase bars show (``step_hint``; else the newest step with module figures) at its largest phase; once the
    run has run out of memory (``oom``, the snapshot's record, on this rank), the last boundary before it. The
    prediction's figures stand beside each module where the run saved them (``predicted_at``).
    """
    index.update(rows)
    bounds = index.boundaries(rank)
    mine = oom if oom is not None and (oom.get("rank") or 0) == rank else None
    where = oom_text(mine)
    if not bounds:
        return ModulePanel(None, pinned is None, 0, 0, oom=where)
    before = boundary_before_oom(bounds, mine) if mine is not None else None
    if pinned is not None and pinned in index.spans and pinned.rank == rank:
        b, following = pinned, False
    elif before is not None:
        b, following = before, True
    else:
        steps = {x.step for x in bounds}
        step = step_hint if step_hint in steps else bounds[-1].step
        b, following = step_peak_boundary(index, rows, bounds, step), True
    mod = mine.get("module") if mine is not None else None
    on_way = frozenset()
    if isinstance(mod, str) and b == before:
        on_way = frozenset(r.module for r in index.rows(rows, b) if r.module == ROOT or mod == r.module
                           or mod.startswith(r.module + "."))  # fmt: skip
    open_ = frozenset(expanded)
    roots = build_tree(index.rows(rows, b), predicted_at(predicted, b.step, b.phase))
    every = walk(roots)
    return ModulePanel(
        b,
        following,
        bounds.index(b),
        len(bounds),
        tuple(walk(roots, expanded=open_)),
        frozenset(n.path for n in every if n.children),
        open_,
        any(n.predicted is not None for n in every),
        where if b == before else None,
        on_way,
    )


def step_boundary(index: RowIndex, rank: int, current: Boundary | None, delta: int) -> Boundary | None:
    """The boundary ``delta`` places from ``current`` among the rank's (clamped); None past the newest (follow
    the run again)."""
    bounds = index.boundaries(rank)
    if not bounds:
        return None
    i = bounds.index(current) if current in bounds else len(bounds) - 1
    j = i + delta
    if j >= len(bounds):
        return None
    return bounds[max(j, 0)]


__all__ = [
    "NO_MODULES",
    "ROOT",
    "ROOT_LABEL",
    "Boundary",
    "ModuleDiff",
    "ModuleNode",
    "ModulePanel",
    "RowIndex",
    "boundary_before_oom",
    "boundary_of",
    "boundary_tree",
    "build_tree",
    "check_depth",
    "compare_boundaries",
    "compare_modules",
    "default_boundary",
    "depths",
    "parents",
    "predicted_at",
    "predicted_rows",
    "module_panel",
    "oom_text",
    "rows_at",
    "rows_seen",
    "run_module_diffs",
    "select_boundary",
    "step_boundary",
    "step_peak_boundary",
    "tree_json",
    "walk",
]
