"""A run's timeline as numpy columns: what ``RunData.samples`` holds and the charts slice.

Kept apart from ``core/run.py`` because it is one thing of its own (a growable column store with
per-rank views) that ``RunData`` only appends to; the bulk parser (``core/sample_lines.py``) fills it
a batch at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from blipmon.core.sample_lines import SampleBatch, sample_row

_COLUMN_NAMES = ("t", "host_rss", "allocated", "reserved", "device_used", "rank")
_MEMORY = ("host_rss", "allocated", "reserved", "device_used")  # the columns holding bytes
_OPTIONAL = ("allocated", "reserved", "device_used")


class Samples:
    """The timeline, column by column, so charts can slice it without building objects per point.

    Stored as float64 numpy columns (exact for byte counts below 2**53) because a day-long run has
    a million samples: as Python lists that is ~200 MB of objects and seconds to build. The list
    attributes (``t``, ``host_rss``, ``allocated``, ``reserved``, ``device_used``, ``rank``) are
    still there for callers that want them, built on first use; ``None`` stands for a figure not
    measured. ``rank`` is the sampling rank (0 for a single-rank run). Only ever appended to, so an
    ``arrays()`` view taken earlier never changes under its reader.
    """

    def __init__(
        self,
        t: list[float] | None = None,
        host_rss: list[int] | None = None,
        allocated: list[int | None] | None = None,
        reserved: list[int | None] | None = None,
        device_used: list[int | None] | None = None,
        rank: list[int] | None = None,
    ) -> None:
        self._cap = 0
        self._n = 0
        self._cols: dict[str, np.ndarray] = {c: np.empty(0, np.float64) for c in _COLUMN_NAMES}
        self._pending: list[tuple[float, ...]] = []
        self._lists: dict[str, list[Any]] = {}
        self._max: dict[str, float] = {}
        self._max_n = 0
        self._by_rank: dict[int, _RankPart] = {}  # filled only once a sample of a rank other than 0 arrives
        self._by_rank_n = 0  # how many samples ``_by_rank`` has looked at
        given = [t, host_rss, allocated, reserved, device_used]
        if any(v is not None for v in given):
            n = max(len(v) for v in given if v is not None)
            cols = [np.full(n, np.nan) if v is None else np.array(v, np.float64) for v in given]
            cols.append(np.zeros(n) if rank is None else np.array(rank, np.float64))
            self._push(cols)

    # -- writing ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n + len(self._pending)

    def append(self, ev: dict[str, Any]) -> None:
        self._pending.append(sample_row(ev)[: len(_COLUMN_NAMES)])
        if len(self._pending) >= 4096:
            self._flush()

    def extend_batch(self, batch: SampleBatch) -> None:
        if len(batch):
            self._flush()
            self._push([batch.t, batch.rss, batch.alloc, batch.res, batch.dev, batch.rank])

    def _flush(self) -> None:
        if self._pending:
            rows = np.array(self._pending, np.float64).reshape(len(self._pending), len(_COLUMN_NAMES))
            self._pending = []
            self._push([rows[:, i] for i in range(len(_COLUMN_NAMES))])

    def _push(self, cols: list[np.ndarray]) -> None:
        k = len(cols[0])
        need = self._n + k
        if need > self._cap:
            cap = max(need, 2 * self._cap, 1024)
            for name in _COLUMN_NAMES:
                grown = np.empty(cap, np.float64)
                grown[: self._n] = self._cols[name][: self._n]
                self._cols[name] = grown
            self._cap = cap
        for name, col in zip(_COLUMN_NAMES, cols, strict=True):
            self._cols[name][self._n : need] = col
        self._n = need

    # -- reading ------------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        """Read-only float64 views of every column (NaN = not measured), safe to keep while we grow."""
        self._flush()
        out = {}
        for name in _COLUMN_NAMES:
            view = self._cols[name][: self._n]
            view.flags.writeable = False
            out[name] = view
        return out

    def maxima(self) -> dict[str, int | None]:
        """The largest value of each column (None if never measured), kept up to date incrementally."""
        self._flush()
        if self._max_n < self._n:
            for name in _MEMORY:
                tail = self._cols[name][self._max_n : self._n]
                ok = tail[~np.isnan(tail)]
                if len(ok):
                    m = float(ok.max())
                    self._max[name] = max(m, self._max.get(name, m))
            self._max_n = self._n
        return {name: int(self._max[name]) if name in self._max else None for name in _MEMORY}

    def by_rank(self) -> dict[int, tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Each rank's samples apart: rank -> (their indices among all samples, their ``arrays()``).

        Empty while every sample is rank 0 (a single-rank run: ``arrays()`` already is rank 0's, and
        it pays one comparison per new sample, nothing more). Once another rank shows up, each
        rank's samples are copied into columns of their own as they arrive, so a dashboard showing
        one rank of a day-long run slices a prefix instead of filtering a million samples a second.
        Incremental, like ``maxima``; the views returned never change under their reader.
        """
        self._flush()
        n, done = self._n, self._by_rank_n
        if n > done:
            ranks = self._cols["rank"][done:n]
            if not self._by_rank and not ranks.any():
                self._by_rank_n = n
                return {}
            if not self._by_rank:
                done = 0  # the first other rank: everything so far was rank 0's (or is sorted out now)
                ranks = self._cols["rank"][:n]
            keys = np.unique(ranks) if len(ranks) > 1 else ranks
            for r in keys.tolist():
                pos = done + np.flatnonzero(ranks == r)
                part = self._by_rank.get(int(r))
                if part is None:
                    part = self._by_rank[int(r)] = _RankPart()
                part.add(pos, [self._cols[c][pos] for c in _COLUMN_NAMES])
            self._by_rank_n = n
        return {r: (part.positions(), part.samples.arrays()) for r, part in sorted(self._by_rank.items())}

    def _list(self, name: str) -> list[Any]:
        self._flush()
        cached = self._lists.setdefault(name, [])
        if len(cached) < self._n:
            tail = self._cols[name][len(cached) : self._n]
            if name == "t":
                cached.extend(tail.tolist())
            elif name in ("host_rss", "rank") or not np.isnan(tail).any():
                cached.extend(tail.astype(np.int64).tolist())
            else:
                cached.extend(None if v != v else int(v) for v in tail.tolist())
        return cached

    @property
    def t(self) -> list[float]:
        return self._list("t")

    @property
    def host_rss(self) -> list[int]:
        return self._list("host_rss")

    @property
    def allocated(self) -> list[int | None]:
        return self._list("allocated")

    @property
    def reserved(self) -> list[int | None]:
        return self._list("reserved")

    @property
    def device_used(self) -> list[int | None]:
        return self._list("device_used")

    @property
    def rank(self) -> list[int]:
        return self._list("rank")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Samples):
            return NotImplemented
        a, b = self.arrays(), other.arrays()
        return all(np.array_equal(a[c], b[c], equal_nan=True) for c in _COLUMN_NAMES)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Samples(n={len(self)})"


class _RankPart:
    """One rank's share of a ``Samples``: its own columns and where each of its samples sits in the whole."""

    def __init__(self) -> None:
        self.samples = Samples()
        self._pos = np.empty(0, np.int64)
        self._n = 0

    def add(self, pos: np.ndarray, cols: list[np.ndarray]) -> None:
        need = self._n + len(pos)
        if need > len(self._pos):
            grown = np.empty(max(need, 2 * len(self._pos), 1024), np.int64)
            grown[: self._n] = self._pos[: self._n]
            self._pos = grown
        self._pos[self._n : need] = pos
        self._n = need
        self.samples._push(cols)

    def positions(self) -> np.ndarray:
        view = self._pos[: self._n]
        view.flags.writeable = False
        return view
