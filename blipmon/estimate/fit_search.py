"""The fit advisor's search machinery: one memo of verdicts per configuration, and the exact largest batch.

Every figure ``fit`` reports is a real estimate (``Probe.judge``), never an interpolation: the batch search only
uses a straight line through two estimates to *guess* where the boundary is, then verifies the guess and its
neighbour with real estimates (``largest_batch``). A training step's activations are close to linear in the batch
(every saved tensor has the batch as its first dimension), so the first guess is usually the answer, and the
search costs two to four estimates instead of a bisection's eight or nine. The GPU overheads move in steps (the
caching allocator rounds blocks), which is why a guess is verified and the search goes on until an estimate that
fits sits right next to one that does not.

Estimates themselves reuse the estimator's process cache (``timeline.estimate`` keys meta models by what decides
the parameters and activation profiles by what decides the traced step: model, quantization, batch, caption
length, precision, checkpointing, LoRA/QLoRA and device, never the optimizer or the accumulation), so the probe
only orders its questions so that the cache answers most of them: every optimizer alternative at a batch already
traced costs a few milliseconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blipmon.core.config import ConfigError, get, merge, validate


@dataclass(frozen=True)
class Outcome:
    """One configuration's verdict, or why it could not be estimated (``error``)."""

    changes: dict[str, Any]
    verdict: str = "oom"  # "fits" | "tight" | "oom" (``error`` set: not estimated)
    peak_bytes: int = 0
    headroom_bytes: int = 0
    capacity_bytes: int = 0
    host_bytes: int | None = None  # host RAM the configuration puts there (DeepSpeed offload), when known
    phase_totals: tuple[int, ...] = ()  # every interval's predicted peak (the estimate's phases, in order)
    runtime_bytes: int = 0  # what the verdict adds to the peak (GPU overheads, or the interpreter on a CPU)
    # Of each interval's peak, the part that does not grow with the batch (parameters, gradients, optimizer state,
    # quantization state and buffers in the forward and backward; all of the other intervals), and the gradients'
    # bytes: what ``scaled_guess`` needs to predict another batch from this one estimate.
    phase_fixed: tuple[int, ...] = ()
    phase_names: tuple[str, ...] = ()
    grads_bytes: int = 0
    judgement: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Fits with the safety margin (``tight`` and ``oom`` do not count)."""
        return self.error is None and self.verdict == "fits"

    @property
    def fits_at_all(self) -> bool:
        """What ``blipmon estimate`` calls "fits": margin or not."""
        return self.error is None and self.verdict in ("fits", "tight")


def nested(changes: dict[str, Any]) -> dict[str, Any]:
    """``{"train.lora.enabled": True}`` -> ``{"train": {"lora": {"enabled": True}}}`` (what ``merge`` takes)."""
    out: dict[str, Any] = {}
    for key, value in changes.items():
        d = out
        parts = key.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
    return out


def changes_key(changes: dict[str, Any]) -> str:
    return json.dumps(changes, sort_keys=True, default=str)


@dataclass
class Probe:
    """Estimates of a configuration with changes applied, each asked once (memo by the changes)."""

    cfg: dict[str, Any]
    judge: Callable[[dict[str, Any]], Any]  # a validated configuration -> Outcome fields (see ``fit.FitJudge``)
    progress: Callable[[int, str], None] | None = None
    memo: dict[str, Outcome] = field(default_factory=dict)
    estimates: int = 0  # estimates actually made (memo misses)

    def config(self, changes: dict[str, Any]) -> dict[str, Any]:
        """The configuration with ``changes`` applied and validated (ConfigError names what is wrong)."""
        return validate(merge(self.cfg, nested(changes)))

    def normal(self, changes: dict[str, Any]) -> dict[str, Any]:
        """``changes`` without the keys already set to that value (the same configuration is asked once)."""
        out: dict[str, Any] = {}
        for k, v in changes.items():
            try:
                same = get(self.cfg, k) == v and type(get(self.cfg, k)) is type(v)
            except (KeyError, TypeError):
                same = False
            if not same:
                out[k] = v
        return out

    def outcome(self, changes: dict[str, Any], label: str = "") -> Outcome:
        changes = self.normal(changes)
        key = changes_key(changes)
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        self.estimates += 1
        if self.progress is not None:
            self.progress(self.estimates, label or describe_changes(changes))
        try:
            cfg = self.config(changes)
            out = self.judge(cfg)
            out = Outcome(changes=dict(changes), **out)
        except ConfigError as e:
            out = Outcome(changes=dict(changes), error=str(e).strip().replace("\n", " "))
        self.memo[key] = out
        return out


def describe_changes(changes: dict[str, Any]) -> str:
    """``train.batch_size=16, train.accumulate_grad_batches=4``: what a progress line or a file name shows."""
    if not changes:
        return "as configured"
    return ", ".join(f"{k}={_value(v)}" for k, v in changes.items())


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def largest_batch(probe: Probe, base: dict[str, Any], *, start: int, limit: int, threshold: int = 0) -> int | None:
    """The exact largest ``train.batch_size`` that fits with ``threshold`` bytes to spare, ``base`` changes applied.

    Exact in the estimator's terms: at the answer the estimate fits with at least ``threshold`` bytes of headroom,
    at the answer + 1 it does not (or the answer is ``limit``, the largest batch the data set allows); None when
    not even a batch of 1 does. ``threshold`` 0 is ``blipmon estimate``'s own "fits"; ``fit`` asks again with its
    safety margin for the batches it suggests. Assumes more batch never needs less memory (true of every term of
    the estimate up to the allocator's rounding steps; the verification makes the boundary exact either way).

    ``start`` is the batch known to be interesting (the configured one). Every estimate the probe has already made
    with these changes is reused, so a second search with another threshold costs one or two more estimates.
    """

    def ok(o: Outcome) -> bool:
        return o.error is None and o.verdict != "oom" and o.headroom_bytes >= threshold

    def at(b: int) -> Outcome:
        return probe.outcome({**base, "train.batch_size": b}, label=_batch_label(base, b))

    b0 = int(probe.cfg["train"]["batch_size"])
    rest_of_base = probe.normal(base)

    def known() -> dict[int, Outcome]:
        out: dict[int, Outcome] = {}
        for o in probe.memo.values():
            rest = {k: v for k, v in o.changes.items() if k != "train.batch_size"}
            if rest == rest_of_base and o.error is None:
                out[int(o.changes.get("train.batch_size", b0))] = o
        return out

    start = max(1, min(start, limit))
    if at(start).error is not None:
        return None
    for rounds in range(200):  # the bracket shrinks every round; bisection from the fifth round on
        pts = known()
        good = [b for b, o in pts.items() if ok(o)]
        lo = max(good) if good else None
        above = [b for b, o in pts.items() if not ok(o) and (lo is None or b > lo)]
        hi = min(above) if above else None
        if lo is None:
            if 1 in pts:
                return None
            xs = sorted(pts)
            if len(xs) == 1:
                guess = scaled_guess(pts[xs[0]], xs[0], threshold)
            else:
                guess = predict(pts, xs[0], xs[1], threshold)
            at(guess if guess is not None and 1 < guess < xs[0] else 1)
            continue
        if hi is None and lo >= limit:
            return limit
        if hi is not None and hi == lo + 1:
            return lo
        top = limit + 1 if hi is None else hi
        if len(pts) < 2:  # one estimate: scale its batch-dependent part
            guess = scaled_guess(pts[lo], lo, threshold)
        else:
            guess = predict(pts, lo, hi, threshold) if rounds < 4 else None
        if guess is None:
            guess = min(limit, 2 * lo) if hi is None else (lo + hi) // 2
        at(min(top - 1, max(lo + 1, guess)))  # a right guess is confirmed by the next round asking its neighbour
    raise RuntimeError("batch search did not converge")  # pragma: no cover - the bracket shrinks every round


def predict(pts: dict[int, Outcome], lo: int, hi: int | None, threshold: int) -> int | None:
    """The largest batch that lines through two estimates predict to fit with ``threshold`` to spare (or None).

    Each interval's peak is close to linear in the batch (every saved tensor and temporary of the forward and
    backward has the batch as a dimension; parameters, gradients and optimizer state do not depend on it), but
    the *largest* interval is not: a small batch peaks in the optimizer step, a large one in the backward. So the
    prediction draws one line per interval (with the GPU overheads) through the bracket's two ends, or the two
    fitting estimates furthest apart, and takes the first batch at which any of them crosses the capacity. None
    without two usable points.
    """
    xs = sorted(pts)
    if hi is not None and lo in pts and hi in pts:
        a, b = min(lo, hi), max(lo, hi)
    else:
        below = [x for x in xs if x <= lo]
        if len(below) < 2:
            return None
        a, b = below[0], below[-1]  # the widest pair: the allocator's rounding steps matter least
    pa, pb = pts[a], pts[b]
    if len(pa.phase_totals) != len(pb.phase_totals) or not pa.phase_totals:
        return None
    room = pa.capacity_bytes - threshold
    best: float = math.inf
    for ta, tb in zip(pa.phase_totals, pb.phase_totals, strict=True):
        need_a = ta + pa.runtime_bytes
        per_sample = ((tb + pb.runtime_bytes) - need_a) / (b - a)
        if per_sample <= 0:
            if need_a > room:
                return None
            continue
        best = min(best, a + (room - need_a) / per_sample)
    if best == math.inf:
        return None
    return max(0, math.floor(best))


def scaled_guess(o: Outcome, batch: int, threshold: int, *, accumulating: bool = False) -> int | None:
    """The largest batch one estimate at ``batch`` predicts to fit with ``threshold`` to spare (None: not even 1).

    The forward's and backward's peaks beyond parameters, gradients, optimizer state, quantization state and
    buffers are activations, temporaries and the batch itself, all with the batch as a dimension: they are scaled
    by ``b / batch``; every other interval is taken as it is, and so are the GPU overheads. ``accumulating``: the
    guess is for a micro-batch with gradient accumulation where ``o`` has none, so the gradients are alive during
    the forward too (the runner's later micro-steps). A guess, verified by real estimates.
    """
    if not o.phase_fixed or len(o.phase_fixed) != len(o.phase_totals):
        return None
    room = o.capacity_bytes - threshold - o.runtime_bytes
    best = math.inf
    names = o.phase_names or ("",) * len(o.phase_totals)
    for name, total, fixed in zip(names, o.phase_totals, o.phase_fixed, strict=True):
        grows = total - fixed
        if accumulating and name == "after_fwd":  # the gradients of the earlier micro-steps, through the forward
            fixed += o.grads_bytes
        if fixed > room:
            return None
        if grows > 0:
            best = min(best, (room - fixed) * batch / grows)
    if best == math.inf:
        return None
    return math.floor(best) if best >= 1 else None


def largest_of(candidates: list[int], ok: Callable[[int], bool], guess: int | None = None) -> int | None:
    """The largest of ``candidates`` for which ``ok`` holds, assuming it holds for every smaller one (or None).

    With a ``guess`` (a predicted largest batch), the candidate at or below it is asked first and then the next
    one up, so a good guess settles it in two questions; without one, or when the guess was too high, the smallest
    is asked (if it does not fit, none does) and the rest halved (the divisors of an effective batch are few).
    """
    xs = sorted(set(candidates))
    if not xs:
        return None
    lo, hi = -1, len(xs)  # xs[: lo + 1] fit (lo = -1: none known), xs[hi:] do not
    if guess is not None:
        i = max((k for k, x in enumerate(xs) if x <= guess), default=0)
        if ok(xs[i]):
            lo = i
            while lo + 1 < hi and ok(xs[lo + 1]):
                lo += 1
            return xs[lo]
        hi = i
    if hi == 0 or not ok(xs[0]):
        return None
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(xs[mid]):
            lo = mid
        else:
            hi = mid
    return xs[lo]


def _batch_label(base: dict[str, Any], b: int) -> str:
    rest = describe_changes(base) if base else "as configured"
    return f"batch {b} ({rest})"
