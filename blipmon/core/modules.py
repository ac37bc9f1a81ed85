"""Per-module memory as data: the ``module_tree`` and ``modules`` records folded into rows (issue 12).

A run that attributes memory to the model's modules writes, per rank, one ``module_tree`` record naming the
modules it attributes to (dotted paths from the transformers model's ``named_modules()``, ``""`` = the root,
parents before their children), then one ``modules`` record per phase boundary it records in full, holding
four lists (params, grads, optim, acts; bytes, inclusive of children) aligned with that tree. Names are written
once and figures as bare lists so attribution at every boundary costs little in the profile
(docs/profile-format.md, "module_tree" and "modules").

Every consumer (``show --modules``, ``compare --modules``, the dashboard's module view, the JSON summary)
reads ``ModuleRow``s from here, so they cannot disagree. A record that does not match its tree (another
length, a negative or non-integer figure) is dropped whole: a wrong row is worse than a missing one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MODULE_CATEGORIES = ("params", "grads", "optim", "acts")
PHASE_ORDER = {"before_fwd": 0, "after_fwd": 1, "after_bwd": 2, "after_opt_step": 3}
# The boundary each of the job's cursors (an ``oom`` record's ``phase``) starts from.
CURSOR_START = {"forward": "before_fwd", "backward": "after_fwd", "optimizer_step": "after_bwd"}


@dataclass(frozen=True)
class ModuleRow:
    """One module's memory at one phase boundary of one rank (bytes, the module's children included)."""

    step: int
    micro_step: int
    rank: int
    phase: str
    module: str  # dotted path, "" for the model's root
    params: int
    grads: int
    optim: int
    acts: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optim + self.acts

    @property
    def boundary(self) -> tuple[int, int, int, str]:
        """(rank, step, micro_step, phase): which boundary the row belongs to."""
        return (self.rank, self.step, self.micro_step, self.phase)

    def to_json(self) -> dict[str, Any]:
        """The object of the JSON summary's ``modules`` list (DESIGN.md, fixed keys)."""
        return {
            "step": self.step,
            "micro_step": self.micro_step,
            "rank": self.rank,
            "phase": self.phase,
            "module": self.module,
            "params": self.params,
            "grads": self.grads,
            "optim": self.optim,
            "acts": self.acts,
        }


def _count(v: Any) -> int | None:
    """A byte count from a record, or None (a bool, a string, a negative or non-finite number is no count)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if v >= 0 else None
    if isinstance(v, float) and math.isfinite(v) and v >= 0 and v.is_integer():
        return int(v)
    return None


def _index(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


@dataclass
class ModuleRecords:
    """The per-module records of one run, as rows in the order they were recorded."""

    trees: dict[int, tuple[str, ...]] = field(default_factory=dict)  # rank -> its tree's module names
    depths: dict[int, int] = field(default_factory=dict)  # rank -> the depth it was recorded at
    rows: list[ModuleRow] = field(default_factory=list)
    dropped: int = 0  # records that did not match their tree

    def apply(self, ev: dict[str, Any]) -> None:
        """Fold one ``module_tree`` or ``modules`` record in (other types are not this fold's)."""
        kind = ev.get("type")
        rank = _index(ev.get("rank", 0))
        if rank is None:
            self.dropped += kind in ("module_tree", "modules")
            return
        if kind == "module_tree":
            names = ev.get("modules")
            if (
                not isinstance(names, list)
                or not all(isinstance(n, str) for n in names)
                or len(set(names)) != len(names)
            ):
                self.dropped += 1
                return
            self.trees[rank] = tuple(names)
            depth = _index(ev.get("depth"))
            if depth is not None:
                self.depths[rank] = depth
        elif kind == "modules":
            self.rows.extend(self._rows_of(ev, rank))

    def _rows_of(self, ev: dict[str, Any], rank: int) -> list[ModuleRow]:
        names = self.trees.get(rank)
        step, micro, phase = _index(ev.get("step")), _index(ev.get("micro_step", 0)), ev.get("phase")
        if names is None or step is None or micro is None or phase not in PHASE_ORDER:
            self.dropped += 1
            return []
        columns: list[list[int]] = []
        for cat in MODULE_CATEGORIES:
            values = ev.get(cat)
            if not isinstance(values, list) or len(values) != len(names):
                self.dropped += 1
                return []
            counts = [_count(v) for v in values]
            if any(c is None for c in counts):
                self.dropped += 1
                return []
            columns.append(counts)  # type: ignore[arg-type]
        return [
            ModuleRow(step, micro, rank, str(phase), name, *(col[i] for col in columns)) for i, name in enumerate(names)
        ]

    # -- reading --------------------------------------------------------------------------------
    def __bool__(self) -> bool:
        return bool(self.rows)

    def unreadable(self) -> str | None:
        """What to tell the user about the records this fold dropped (``dropped``), or None when it dropped none.

        A dropped record is damage, not an absence: said as such, a view that finds no figures does not send the
        user looking for a setting (``runtime.module_depth``) that was on. Every view words it the same (``show``
        and ``compare`` print it as a warning).
        """
        n = self.dropped
        if not n:
            return None
        return (
            f"{n} per-module record{'s are' if n != 1 else ' is'} unreadable and left out (malformed, or not"
            " matching the module tree): the profile may be damaged"
        )

    def boundaries(self, rank: int | None = None) -> list[tuple[int, int, int, str]]:
        """Every recorded boundary (rank, step, micro_step, phase), in recording order, each once."""
        seen: dict[tuple[int, int, int, str], None] = {}
        for r in self.rows:
            if rank is None or r.rank == rank:
                seen.setdefault(r.boundary, None)
        return list(seen)

    def at(self, step: int, phase: str, *, rank: int = 0, micro_step: int | None = None) -> list[ModuleRow]:
        """The rows of one boundary; ``micro_step=None`` takes the step's last recorded micro-step for the phase
        (the one whose figures the phase table shows for an accumulating step)."""
        rows = [r for r in self.rows if r.rank == rank and r.step == step and r.phase == phase]
        if micro_step is None and rows:
            micro_step = max(r.micro_step for r in rows)
        return [r for r in rows if r.micro_step == micro_step]

    def last_before(self, step: int, micro_step: int, cursor: str | None, *, rank: int = 0) -> list[ModuleRow]:
        """The rows of the last boundary the run reached before an out-of-memory error in ``cursor``.

        ``cursor`` is the ``oom`` record's ``phase``: the job's cursor (``forward``, ``backward``,
        ``optimizer_step``), whose interval starts at ``before_fwd``, ``after_fwd``, ``after_bwd`` of that
        micro-step; a boundary name is taken as itself. ``None`` or another cursor (``load``, ``generate``) has no
        boundary of that step to point at: the last one recorded before the step.
        """
        start = CURSOR_START.get(cursor or "", cursor)
        limit = (step, micro_step, PHASE_ORDER[start]) if start in PHASE_ORDER else (step, 0, -1)
        best: tuple[int, int, int, str] | None = None
        for b in self.boundaries(rank):  # recording order is the run's order: the last one that qualifies
            if (b[1], b[2], PHASE_ORDER[b[3]]) <= limit:
                best = b
        if best is None:
            return []
        return [r for r in self.rows if r.boundary == best]

    def summary(self) -> list[dict[str, Any]]:
        """The JSON summary's ``modules`` list: every row, in recording order."""
        return [r.to_json() for r in self.rows]


def rows_from_json(items: Any) -> list[ModuleRow]:
    """``ModuleRow``s from a JSON ``modules`` list (a run summary, a saved prediction, ``estimate --json``).

    An estimate's rows have no ``micro_step``/``rank`` (they are 0). Malformed items are left out.
    """
    out: list[ModuleRow] = []
    if not isinstance(items, list):
        return out
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("module"), str) or it.get("phase") not in PHASE_ORDER:
            continue
        nums = [_index(it.get("step")), _index(it.get("micro_step", 0)), _index(it.get("rank", 0))]
        cats = [_count(it.get(c)) for c in MODULE_CATEGORIES]
        if any(v is None for v in nums + cats):
            continue
        out.append(ModuleRow(nums[0], nums[1], nums[2], it["phase"], it["module"], *cats))  # type: ignore[arg-type]
    return out


# -- the tree a writer attributes to (pure: the probe and the estimator build theirs with these) ----------------
# A wrapper's prefix on a module path: DDP's and DeepSpeed's ``module.``, PEFT's ``base_model.model.``. Dropped so
# a LoRA or DDP run names the same modules as a plain one.
WRAPPER_PREFIXES = ("module.", "base_model.model.")


def canonical_name(name: str) -> str:
    """A module or parameter path without the wrappers' prefixes (``module.base_model.model.x`` -> ``x``)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
        if name in ("module", "base_model.model"):  # the wrapped model itself
            return ""
    return name


def tree_levels(names: list[str]) -> dict[str, int]:
    """Each module path's level below the root, where a module with a single child module is no level of its own.

    A wrapper around one module (OPT's ``OPTModel`` holds only ``decoder``; ``language_model.model`` and
    ``language_model.model.decoder`` hold the same bytes) would spend a level of ``runtime.module_depth`` on a copy
    of its child: its child counts at the wrapper's level instead, so the default depth reaches
    ``language_model.model.decoder`` (issue 12's example) as well as ``vision_model.encoder``. The root's children
    are always level 1. Paths come parents first, as ``named_modules()`` lists them; one whose parent is missing
    counts its dots."""
    children: dict[str, int] = {}
    for n in names:
        if n:
            parent = n.rpartition(".")[0]
            children[parent] = children.get(parent, 0) + 1
    levels = {"": 0}
    for n in names:
        if not n or n in levels:
            continue
        parent = n.rpartition(".")[0]
        above = levels.get(parent)
        if above is None:
            levels[n] = n.count(".") + 1
        else:
            levels[n] = above + (0 if parent and children.get(parent) == 1 else 1)
    return levels


def tree_names(names: list[str], depth: int) -> list[str]:
    """The module paths of a ``module_tree`` from ``named_modules()``'s paths: the root and every path at most
    ``depth`` levels below it (``tree_levels``), in the order given (``named_modules()`` lists parents before
    children)."""
    levels = tree_levels(names)
    out = [""]
    seen = {""}
    for n in names:
        if n and n not in seen and levels[n] <= depth:
            seen.add(n)
            out.append(n)
    return out


def below_tree(path: str, index: Mapping[str, int]) -> bool:
    """Whether a module path is one level below the tree (``index``: the tree's paths): not in it, its parent is.

    The probe hooks these too (a model may call a grandchild directly, skipping its tree parent's forward), under
    their parent's slot; the estimator follows the same rule."""
    return path not in index and path.rpartition(".")[0] in index


def tree_parents(names: list[str] | tuple[str, ...]) -> list[int]:
    """Each module's parent in the tree (its nearest ancestor path that is in the tree); -1 for the root."""
    index = {n: i for i, n in enumerate(names)}
    parents = []
    for n in names:
        if n == "":
            parents.append(-1)
            continue
        parent = 0
        parts = n.split(".")
        for k in range(len(parts) - 1, 0, -1):
            i = index.get(".".join(parts[:k]))
            if i is not None:
                parent = i
                break
        parents.append(parent)
    return parents


def owner_index(names: list[str] | tuple[str, ...], path: str, index: dict[str, int] | None = None) -> int:
    """The tree slot a tensor path (``a.b.c.weight``) or module path belongs to: its deepest ancestor in the tree
    (the root, 0, when none is)."""
    index = {n: i for i, n in enumerate(names)} if index is None else index
    parts = path.split(".")
    for k in range(len(parts), 0, -1):
        i = index.get(".".join(parts[:k]))
        if i is not None:
            return i
    return index.get("", 0)


def inclusive(parents: list[int], own: list[int]) -> list[int]:
    """Inclusive figures from each module's own (exclusive) bytes: a module's figure adds its children's.

    Parents come before their children, so one pass from the end adds every subtree into its parent; the root's
    figure is the sum of every module's own bytes (the phase's total).
    """
    out = list(own)
    for i in range(len(out) - 1, 0, -1):
        p = parents[i]
        if p >= 0:
            out[p] += out[i]
    return out
