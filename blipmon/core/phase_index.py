"""Running figures over a run's phase records, kept as they arrive so every snapshot's questions are cheap.

A module of its own because it is one data structure (lists plus numpy running maxima, per run and per
rank) that every ``Snapshot`` of a run shares; ``core/snapshot.py`` asks it, the sources feed it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

import numpy as np

from blipmon.core.run import PHASES, phase_total
from blipmon.core.timeline import ACTIVITIES, PHASE_ACTIVITY

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
            self.rank_pos.setdefault(rank_of(p), []).append(len(self.vals))
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
            t, kind, begin = (read_only(a[key][idx]) for key in ("t", "kind", "begin"))
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


def rank_of(rec: dict[str, Any]) -> int:
    """A record's rank; a record without one comes from a single-rank writer, i.e. rank 0."""
    r = rec.get("rank")
    return r if isinstance(r, int) and not isinstance(r, bool) and r >= 0 else 0


def read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _num_or(v: Any, default: float = -1.0) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default
