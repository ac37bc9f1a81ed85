"""Per-module memory as views: one boundary's tree, which boundary a view starts at, runs compared module by module.

``core/modules.py`` folds the records into ``ModuleRow``s; this module turns rows into what people look at, once,
for every consumer: ``show --modules`` and ``compare --modules`` (text, markdown, CSV, JSON through
``core/report.py``), the dashboard's module view and the compare view's module section. Pure data: no Textual,
no printing, so the command line and the dashboard cannot disagree about a figure, an order or a depth.

The tree is the recorded one. A module's parent is the longest dotted prefix of its path that was recorded (the
root ``""`` above the rest), and its depth counts recorded ancestors, so ``language_model.model.decoder``
recorded under ``language_model`` (the writer skips single-child wrappers) is depth 2, as the recording depth
counts it: ``--depth 1`` shows the root's children. Children are sorted by their total at the selected
boundary, largest first (ties by path, so the order never flickers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from blipmon.core.errors import UsageError
from blipmon.core.modules import MODULE_CATEGORIES, PHASE_ORDER, ModuleRecords, ModuleRow, rows_from_json

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
        out.append(ModuleDiff(p, deep[p], tuple(m.get(p) for m in maps)))
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


__all__ = [
    "NO_MODULES",
    "ROOT",
    "ROOT_LABEL",
    "Boundary",
    "ModuleDiff",
    "ModuleNode",
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
    "rows_at",
    "run_module_diffs",
    "select_boundary",
    "tree_json",
    "walk",
]
