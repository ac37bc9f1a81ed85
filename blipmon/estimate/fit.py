"""The fit advisor: the largest batch that fits, and the ranked changes that make a configuration fit.

``fit(cfg)`` answers the user's real question before a run: *what is the biggest batch that fits, and what is the
cheapest change that makes this fit?* It asks the estimator (``blipmon estimate``'s own verdict, so ``fit`` and
``estimate`` never disagree: a suggestion's ``changes`` given to ``blipmon estimate`` as ``--set`` give the same
peak) about the configuration as it is, then about the seed lab's knobs (``fit_knobs``): single changes first, a
knob together with a smaller micro-batch where the knob alone is not enough, then the smallest combinations of
knobs when no single change fits. Every figure is a real estimate; the search only decides which to ask for
(``fit_search``). docs/fit.md describes the search, the safety margin and the speed.

UI-free and silent: the command (``commands/fit.py``) and the launcher's fit view (``ui/fit.py``) render the
``FitResult``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blipmon.core.config import SCHEMA, ConfigError, validate
from blipmon.core.units import fmt_bytes
from blipmon.estimate import fit_knobs
from blipmon.estimate.fit_knobs import COST_ACCUMULATE, COST_SMALLER_BATCH, Move, Skipped
from blipmon.estimate.fit_search import Outcome, Probe, largest_batch, largest_of, scaled_guess

# A "fits" with less headroom than this share of the memory judged against is reported as "tight": the estimate
# packs live tensors into fresh allocator segments and leaves out the free space that churn leaves in partly used
# segments (fragmentation), and kernel workspaces besides cuBLAS's (docs/memory-model.md, "What is left out").
# 2 % of an 80 GB card is 1.58 GiB: more than the allocator terms the estimate does model on the seed lab's
# configurations (0.1-1.3 GiB), and the margin below which docs/memory-model.md already says "may not fit".
TIGHT_FRACTION = 0.02
MAX_COMBINATION = 3  # knobs in one suggestion at most (a micro-batch change counts as one)
COMBINATION_BUDGET = 40  # estimates the search for combinations may make (the singles and the batch are not counted)


def margin_bytes(capacity_bytes: int) -> int:
    """The headroom below which a configuration that fits is "tight" (``TIGHT_FRACTION`` of the capacity)."""
    return int(capacity_bytes * TIGHT_FRACTION)


@dataclass(frozen=True)
class Suggestion:
    """One change that makes the configuration fit, with its predicted peak and what it costs the user."""

    changes: dict[str, Any]  # dotted keys -> values, as ``--set`` takes them
    peak_bytes: int
    verdict: str  # "fits" | "tight"
    headroom_bytes: int
    effective_batch: int  # batch_size x accumulate_grad_batches x ranks
    notes: tuple[str, ...]
    knobs: tuple[str, ...]  # the knobs turned ("batch", "act_ckpt", "adam_8bit", ...)
    cost: int  # sum of the knobs' cost ranks (fit_knobs): the order among suggestions of one tier

    def to_json(self) -> dict[str, Any]:
        return {
            "changes": dict(self.changes),
            "peak_bytes": self.peak_bytes,
            "verdict": self.verdict,
            "effective_batch": self.effective_batch,
            "notes": list(self.notes),
            "headroom_bytes": self.headroom_bytes,
        }


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` found. ``to_json()`` is the fixed ``blipmon fit --json`` object (plus optional fields)."""

    name: str
    device: str  # "cuda" | "cpu": whose memory the verdicts are about
    verdict: str  # as configured: "fits" | "tight" | "oom"
    peak_bytes: int
    headroom_bytes: int
    capacity_bytes: int
    capacity_source: str
    margin_bytes: int
    batch_size: int
    effective_batch: int
    max_batch_size: int | None
    max_batch_note: str  # why the largest batch is where it is, when the data set bounds it
    suggestions: tuple[Suggestion, ...]
    skipped: tuple[Skipped, ...]
    seconds: float
    estimates: int  # estimates made (the rest came from the memo or the estimator's cache)
    runs_out: str = ""  # where the configuration as it is runs out ("" when it fits)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def runtime_bytes(self) -> int:
        """What the verdict adds to the peak: the GPU overheads (or the interpreter, on a CPU run)."""
        return self.capacity_bytes - self.headroom_bytes - self.peak_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "peak_bytes": self.peak_bytes,
            "gpu_memory_bytes": self.capacity_bytes,
            "max_batch_size": self.max_batch_size,
            "suggestions": [s.to_json() for s in self.suggestions],
            "seconds": round(self.seconds, 3),
            "headroom_bytes": self.headroom_bytes,
            "margin_bytes": self.margin_bytes,
            "capacity_source": self.capacity_source,
            "device": self.device,
            "batch_size": self.batch_size,
            "effective_batch": self.effective_batch,
            "max_batch_note": self.max_batch_note,
            "skipped": [s.to_json() for s in self.skipped],
            "estimates": self.estimates,
            "notes": list(self.notes),
            "runs_out": self.runs_out,
            "name": self.name,
        }


class FitJudge:
    """The verdict of one configuration: ``estimate.judge`` (``blipmon estimate``'s), plus the fit's "tight".

    The first configuration fixes the capacity (given, the lab's card of a card-named preset, the local GPU's free
    memory, or the host's available memory) and every later one is judged against that same figure, so a search on
    a machine whose free memory moves compares like with like.
    """

    def __init__(self, gpu_memory: int | None = None, host_memory: int | None = None) -> None:
        self.gpu_memory = gpu_memory
        self.host_memory = host_memory
        self.capacity: int | None = None
        self.device: str | None = None
        self.source = ""
        self.margin = 0

    def __call__(self, cfg: dict[str, Any]) -> dict[str, Any]:
        from blipmon.estimate.judge import judge

        j = judge(cfg, gpu_memory=self.gpu_memory, host_memory=self.host_memory)
        if self.capacity is None:
            self.device = "cpu" if j.device == "cpu" else "cuda"
            self.capacity, self.source = j.capacity_bytes, j.capacity_source
            self.margin = margin_bytes(j.capacity_bytes)
            if self.device == "cpu":
                self.host_memory = j.capacity_bytes  # a CPU run: later ones judged against the same host figure
            else:
                self.gpu_memory = j.capacity_bytes
        verdict = j.verdict
        limiting = j.device_judgement(j.limiting_device)
        if verdict == "fits" and j.headroom_bytes < margin_bytes(int(limiting.capacity_bytes or 0)):
            verdict = "tight"
        est = j.estimate
        return {
            "verdict": verdict,
            "peak_bytes": j.peak_bytes,
            "headroom_bytes": j.headroom_bytes,
            "capacity_bytes": j.capacity_bytes,
            "host_bytes": getattr(est, "host_optim_bytes", None) or None,
            "phase_totals": tuple(p.total for p in getattr(est, "phases", ())),
            "runtime_bytes": j.runtime_bytes,
            "phase_fixed": tuple(_fixed(est, p) for p in getattr(est, "phases", ())),
            "phase_names": tuple(p.phase for p in getattr(est, "phases", ())),
            "grads_bytes": max((p.grads for p in getattr(est, "phases", ())), default=0),
            "judgement": j,
        }


def _fixed(est: Any, p: Any) -> int:
    """The part of an interval's peak that does not grow with the batch (``fit_search.scaled_guess``)."""
    if p.phase not in ("after_fwd", "after_bwd"):
        return p.total
    resident = p.params + p.grads + p.optim + est.quant_state_bytes + est.buffer_bytes
    return min(p.total, resident)


Progress = Callable[[int, str], None]


def fit(
    cfg: dict[str, Any],
    *,
    gpu_memory: int | None = None,
    host_memory: int | None = None,
    progress: Progress | None = None,
    deepspeed: bool | None = None,
) -> FitResult:
    """The configuration's verdict, its exact largest batch, and the ranked changes that make it fit.

    ``gpu_memory`` / ``host_memory`` as ``blipmon estimate``'s ``--gpu-memory`` / ``--host-memory``; ``progress``
    is called before each estimate made (its count and what it is about); ``deepspeed`` overrides whether
    DeepSpeed counts as installed (tests). Raises ``ConfigError`` when the configuration itself cannot be
    estimated (a bad key, a GPU configuration with no capacity to judge against, a step that cannot run).
    """
    t0 = time.perf_counter()
    cfg = validate(cfg)
    kind = cfg["job"]["kind"]
    judge = FitJudge(gpu_memory, host_memory)
    probe = Probe(cfg, judge, progress)
    base = probe.outcome({}, label="as configured")
    if base.error is not None:
        raise ConfigError(base.error)
    t = cfg["train"]
    b0, acc0 = int(t["batch_size"]), int(t["accumulate_grad_batches"])
    ranks = int(t["devices"]) * int(t["num_nodes"])
    note = ""
    if kind == "train":
        limit = -(-int(t["num_train_samples"]) // ranks)  # the data set's per-rank share: the largest valid batch
        max_batch = largest_batch(probe, {}, start=b0, limit=limit, threshold=0)
        if max_batch == limit:
            note = f"limited by the data set: train.num_train_samples = {t['num_train_samples']} over {ranks} rank(s)"
    elif kind == "generate":  # generate's batch is train.batch_size (its images at once); no data set bounds it
        acc0, ranks = 1, 1
        limit = int(SCHEMA["train.batch_size"].maximum or b0)
        max_batch = largest_batch(probe, {}, start=b0, limit=limit, threshold=0)
        if max_batch == limit:
            note = f"limited by train.batch_size's largest value, {limit}"
    else:
        acc0, ranks, limit, max_batch = 1, 1, b0, None
        note = "a load job has no batch"
    # A load job has no batch: its suggestions carry an effective batch of 0.
    search = _Search(probe, cfg, b0 if kind != "load" else 0, acc0, ranks, limit, judge.margin, host_memory)
    suggestions: list[Suggestion] = []
    skipped: list[Skipped] = []
    if not base.ok:
        suggestions, skipped = search.run(deepspeed)
    return FitResult(
        name=str(cfg.get("name", "")),
        device=judge.device or "cuda",
        verdict=base.verdict,
        peak_bytes=base.peak_bytes,
        headroom_bytes=base.headroom_bytes,
        capacity_bytes=base.capacity_bytes,
        capacity_source=judge.source,
        margin_bytes=judge.margin,
        batch_size=b0,
        effective_batch=b0 * acc0 * ranks if kind != "load" else 0,
        max_batch_size=max_batch,
        max_batch_note=note,
        notes=tuple(search.notes),
        suggestions=tuple(suggestions),
        skipped=tuple(skipped),
        seconds=time.perf_counter() - t0,
        estimates=probe.estimates,
        runs_out=_runs_out(base),
    )


@dataclass
class _Search:
    """The suggestions of one ``fit``: singles, a knob with a smaller micro-batch, then combinations."""

    probe: Probe
    cfg: dict[str, Any]
    b0: int
    acc0: int
    ranks: int
    limit: int
    margin: int
    host_memory: int | None
    notes: list[str] = field(default_factory=list)

    def run(self, deepspeed: bool | None) -> tuple[list[Suggestion], list[Skipped]]:
        knobs = fit_knobs.moves_for(self.cfg, deepspeed=deepspeed)
        skipped = list(knobs.skipped)
        found: dict[str, Suggestion] = {}
        usable: list[Move] = []
        failing: list[Move] = []
        # Tier 1: each knob alone; the micro-batch alone (with accumulation keeping the effective batch).
        for move in knobs.moves:
            o = self.probe.outcome(move.changes, label=move.name)
            if o.error is not None:
                skipped.append(Skipped(dict(move.changes), o.error))
                continue
            usable.append(move)
            if o.fits_at_all:
                self._add(found, o, (move,))
            if not o.ok:  # not enough alone, or tight: also with a smaller micro-batch beside it
                failing.append(move)
        outcomes = [self.probe.outcome(m.changes) for m in usable] + [self.probe.outcome({})]
        floor = min(o.runtime_bytes for o in outcomes)
        if floor > self.probe.outcome({}).capacity_bytes - self.margin:
            self.notes.append(
                f"what the run needs besides its tensors ({fmt_bytes(floor)}: the CUDA context, cuBLAS workspaces, "
                "or the interpreter) is more than the capacity leaves: no knob can make it fit"
            )
            return [], skipped
        for s in self._with_batch(()):
            found.setdefault(_key(s.changes), s)
        # Tier 2: a knob that is not enough alone (or leaves it tight), with the largest micro-batch that fits
        # beside it with the margin (the lab's "8-bit optimizer with a small batch").
        for move in failing:
            for s in self._with_batch((move,), keep_only=True):
                found.setdefault(_key(s.changes), s)
        # Combinations of knobs only when no single change fits, smallest first, the most promising first: each
        # knob that lowered the peak alone, combined with knobs of other groups, ordered by the peak their separate
        # savings add up to (a guess; the estimate decides), within a budget of estimates.
        base = self.probe.outcome({})
        saving = {m.name: base.peak_bytes - self.probe.outcome(m.changes).peak_bytes for m in usable}
        helpers = [m for m in usable if saving[m.name] > 0]
        spent = self.probe.estimates
        for size in range(2, MAX_COMBINATION + 1):
            if self.notes or any(s.verdict == "fits" for s in found.values()):
                break
            combos = [c for c in itertools.combinations(helpers, size) if len({m.group for m in c}) == size]
            combos.sort(key=lambda c: -sum(saving[m.name] for m in c))
            for combo in combos:
                if self.probe.estimates - spent >= COMBINATION_BUDGET:
                    self.notes.append(
                        f"the search for combinations stopped after {COMBINATION_BUDGET} estimates; "
                        "the knobs most likely to help were tried first"
                    )
                    break
                o = self.probe.outcome(_merged(combo), label=" + ".join(m.name for m in combo))
                if o.error is not None:
                    continue
                if o.fits_at_all:
                    self._add(found, o, combo)
                elif size < MAX_COMBINATION:
                    for s in self._with_batch(combo, keep_only=True):
                        found.setdefault(_key(s.changes), s)
        ranked = sorted(found.values(), key=lambda s: (s.verdict != "fits", len(s.knobs), s.cost, s.peak_bytes))
        return ranked, skipped

    def _move_notes(self, o: Outcome, moves: tuple[Move, ...]) -> list[str]:
        """What each change costs, in words; offload adds the host RAM its state needs."""
        notes = [mv.note for mv in moves]
        for mv in moves:
            if mv.name == "offload":
                extra = fit_knobs.offload_host_note(o.host_bytes or _host_bytes(o), self.host_memory)
                if extra:
                    notes.append(extra)
        return notes

    def _add(self, found: dict[str, Suggestion], o: Outcome, moves: tuple[Move, ...]) -> None:
        notes = self._move_notes(o, moves) + self._verdict_notes(o)
        eff = self.b0 * self.acc0 * self.ranks
        s = Suggestion(
            changes=dict(o.changes),
            peak_bytes=o.peak_bytes,
            verdict=o.verdict,
            headroom_bytes=o.headroom_bytes,
            effective_batch=eff,
            notes=tuple(notes),
            knobs=tuple(m.name for m in moves),
            cost=sum(m.cost for m in moves),
        )
        found.setdefault(_key(s.changes), s)

    def _verdict_notes(self, o: Outcome) -> list[str]:
        if o.verdict == "tight":
            return [
                f"tight: {fmt_bytes(o.headroom_bytes)} to spare, under the {fmt_bytes(self.margin)} safety margin for "
                "the allocator's fragmentation"
            ]
        return []

    def _with_batch(self, moves: tuple[Move, ...], *, keep_only: bool = False) -> list[Suggestion]:
        """The knobs with a smaller micro-batch: the largest that divides the effective batch and fits (with the
        margin) with accumulation keeping it; with ``keep_only`` False (the micro-batch alone) also the largest
        micro-batch that fits with the accumulation as configured, whose effective batch is smaller.

        The divisors are few and shared by every knob, so an optimizer's alternatives reuse the traces of the
        batches asked for before (the activations do not depend on the optimizer). The first divisor asked is the
        one at or below the batch the lines through two estimates predict (``fit_search.predict``).
        """
        base = _merged(moves)
        per_rank = self.b0 * self.acc0
        names = " + ".join(x.name for x in moves) or "as configured"
        out: list[Suggestion] = []
        kind = self.cfg["job"]["kind"]
        if kind == "load":
            return out  # nothing to batch
        if kind == "generate":  # fewer images at once: no accumulation in generation
            m = largest_batch(self.probe, base, start=self.b0, limit=self.limit, threshold=self.margin)
            if m is not None and m < self.b0:
                plain = self.probe.outcome({**base, "train.batch_size": m})
                if plain.ok:
                    out.append(self._batch_suggestion(plain, moves, m, 1))
            return out

        def kept(d: int) -> Outcome:
            changes = {**base, "train.batch_size": d, "train.accumulate_grad_batches": per_rank // d}
            return self.probe.outcome(changes, label=f"batch {d} x {per_rank // d} ({names})")

        divisors = [d for d in range(1, self.b0) if per_rank % d == 0]
        m = None
        if keep_only:  # a guess from the knob's estimate at the configured batch, with accumulation's gradients
            here = self.probe.outcome(base)
            guess = (
                scaled_guess(here, self.b0, self.margin, accumulating=self.acc0 == 1) if here.error is None else None
            )
        else:
            m = largest_batch(self.probe, base, start=self.b0, limit=self.limit, threshold=self.margin)
            guess = m
            divisors = [d for d in divisors if m is not None and d <= m]
        d = largest_of(divisors, lambda d: kept(d).ok, guess)
        if d is not None:
            out.append(self._batch_suggestion(kept(d), moves, d, per_rank // d))
        if not keep_only and m is not None and m < self.b0 and m != d:
            plain = self.probe.outcome({**base, "train.batch_size": m})
            if plain.ok:
                out.append(self._batch_suggestion(plain, moves, m, self.acc0))
        return out

    def _batch_suggestion(self, o: Outcome, moves: tuple[Move, ...], batch: int, acc: int) -> Suggestion:
        eff = batch * acc * self.ranks
        old = self.b0 * self.acc0 * self.ranks
        notes = self._move_notes(o, moves)
        notes.append(fit_knobs.accumulate_note(batch, acc, eff, old))
        notes += self._verdict_notes(o)
        cost = sum(mv.cost for mv in moves) + (COST_ACCUMULATE if eff == old else COST_SMALLER_BATCH)
        return Suggestion(
            changes=dict(o.changes),
            peak_bytes=o.peak_bytes,
            verdict=o.verdict,
            headroom_bytes=o.headroom_bytes,
            effective_batch=eff,
            notes=tuple(notes),
            knobs=(*(mv.name for mv in moves), "batch"),
            cost=cost,
        )


def _host_bytes(o: Outcome) -> int | None:
    return getattr(getattr(o.judgement, "estimate", None), "host_optim_bytes", None) or None


def _runs_out(o: Outcome) -> str:
    """Where the configuration as it is runs out, for people ("" when it fits)."""
    if o.verdict != "oom" or o.judgement is None:
        return ""
    j = o.judgement
    if j.limiting_device == "cpu" and j.device != "cpu":
        return "the host: its RAM is short for what the run keeps there"
    if j.estimate.__class__.__name__ == "LoadEstimate":  # load and generate: about the limiting device
        return str(j.estimate.runs_out_text(j.device_judgement(j.limiting_device)))
    text = getattr(j.estimate, "runs_out_text", None)
    return text() if callable(text) else ""


def _merged(moves: tuple[Move, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in moves:
        out.update(m.changes)
    return out


def _key(changes: dict[str, Any]) -> str:
    from blipmon.estimate.fit_search import changes_key

    return changes_key(changes)
