"""Sample lines parsed in bulk: the timeline's numbers cut out of the byte buffer with numpy.

Sample lines are written by one writer in one fixed shape, ``{"type":"sample","t":T,"rss":N,...}``,
so their numbers can be cut out of the byte buffer with numpy instead of building a dict per line.
Anything that does not fit that shape exactly (another key order, a string, an exponent, a
corrupt line) falls back to ``json.loads`` for that line, so the result is always what the
per-line path would give. Nothing is ever evaluated: this only reads digits.

A module of its own: ``EventReader`` (core/profile.py) calls it for every chunk it reads, and
``Samples`` (core/samples.py) stores what it returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

SAMPLE_COLUMNS = ("t", "rss", "alloc", "res", "dev", "rank")
_SAMPLE_PREFIX = b'{"type":"sample","t":'
_KEY_OK = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


@dataclass(frozen=True)
class SampleBatch:
    """Samples as float64 columns; NaN where a figure is absent (``t``, ``rss`` and ``rank`` never are).

    ``rank`` is the sampler's rank (a DDP run's ranks all append to one stream); a sample without
    one comes from a single-rank writer or rank 0, and reads as 0. It is kept as float64 like the
    other columns so the bulk parser, ``fill`` and ``merge`` treat every column alike.
    """

    t: np.ndarray
    rss: np.ndarray
    alloc: np.ndarray
    res: np.ndarray
    dev: np.ndarray
    rank: np.ndarray
    last_t: float | None = None

    def __len__(self) -> int:
        return len(self.t)

    @staticmethod
    def empty() -> SampleBatch:
        e = np.empty(0, np.float64)
        return SampleBatch(e, e, e, e, e, e)

    @staticmethod
    def concat(batches: list[SampleBatch]) -> SampleBatch:
        if not batches:
            return SampleBatch.empty()
        if len(batches) == 1:
            return batches[0]
        cols = [np.concatenate([getattr(b, c) for b in batches]) for c in SAMPLE_COLUMNS]
        lasts = [b.last_t for b in batches if b.last_t is not None]
        return SampleBatch(*cols, last_t=max(lasts) if lasts else None)

    def fill(self, where: np.ndarray, rows: list[tuple[float, ...]], keep: np.ndarray) -> SampleBatch:
        """Put the rows parsed one by one back at their places; drop the lines that were not samples."""
        cols = [getattr(self, c).copy() for c in SAMPLE_COLUMNS]
        kept = where[keep[where]]
        last = self.last_t
        if rows:
            arr = np.array(rows, np.float64).reshape(len(rows), len(SAMPLE_COLUMNS) + 1)
            for i, col in enumerate(cols):
                col[kept] = arr[:, i]
            lasts = arr[:, -1][~np.isnan(arr[:, -1])]
            if len(lasts):
                last = float(lasts.max()) if last is None else max(last, float(lasts.max()))
        if not keep.all():
            cols = [c[keep] for c in cols]
        return SampleBatch(*cols, last_t=last)

    def merge(self, order: np.ndarray, rows: list[tuple[int, tuple[float, ...]]]) -> SampleBatch:
        """Insert rows read one by one (keyed by line index) among samples at line indices ``order``."""
        extra = np.array([r for _, r in rows], np.float64).reshape(len(rows), len(SAMPLE_COLUMNS) + 1)
        idx = np.concatenate([order, np.array([i for i, _ in rows], order.dtype)])
        perm = np.argsort(idx, kind="stable")
        cols = [np.concatenate([getattr(self, c), extra[:, k]])[perm] for k, c in enumerate(SAMPLE_COLUMNS)]
        lasts = extra[:, -1][~np.isnan(extra[:, -1])]
        last = self.last_t
        if len(lasts):
            last = float(lasts.max()) if last is None else max(last, float(lasts.max()))
        return SampleBatch(*cols, last_t=last)


def _as_int(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return np.nan
    return float(int(v))


def _as_rank(v: Any) -> float:
    """A sample's rank: a non-negative integer, else 0 (absent, null or damaged: a single-rank writer's)."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return float(v)
    return 0.0


def sample_row(ev: dict[str, Any]) -> tuple[float, float, float, float, float, float, float]:
    """One sample event as the column values ``Samples`` keeps, plus its ``t`` for ``last_t`` (NaN if none).

    The one definition of how a sample record reads: used by the per-line and the bulk path alike
    (the bulk path sends every ``rank`` that is not plain digits or ``null`` here).
    """
    raw_t = ev.get("t")
    try:
        t = float(raw_t or 0.0)
    except (TypeError, ValueError):
        t = 0.0
    rss = _as_int(ev.get("rss"))
    num_t = float(raw_t) if isinstance(raw_t, (int, float)) and not isinstance(raw_t, bool) else np.nan
    return (
        t,
        0.0 if np.isnan(rss) or rss == 0 else rss,
        _as_int(ev.get("alloc")),
        _as_int(ev.get("res")),
        _as_int(ev.get("dev")),
        _as_rank(ev.get("rank")),
        num_t,
    )


def sample_line_mask(a: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Which lines start with the sample prefix and end with ``}`` (candidates for the bulk path)."""
    mask = np.zeros(len(starts), bool)
    idx = np.flatnonzero((ends - starts) > len(_SAMPLE_PREFIX) + 1)
    if not len(idx):
        return mask
    s = starts[idx]
    ok = a[ends[idx] - 1] == 125
    for j in (10, 11, 12, 13, 14, 15, 16, 0, 1, 2, 7, 8, 9, 17, 18, 19, 20, 3, 4, 5, 6):
        ok &= a[s + j] == _SAMPLE_PREFIX[j]
    mask[idx[ok]] = True
    return mask


def _template(a: np.ndarray, start: int, end: int) -> list[str] | None:
    """The keys after ``t`` of one sample line, or None if it is not a plain sample record."""
    try:
        rec = json.loads(a[start:end].tobytes())
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or list(rec)[:2] != ["type", "t"]:
        return None
    keys = list(rec)[2:]
    if not all(k and set(k.encode()) <= _KEY_OK for k in keys):
        return None
    return keys


def parse_sample_lines(a: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[SampleBatch, np.ndarray]:
    """Columns of the sample lines ``a[starts[i]:ends[i]]``, and the indices of lines left to json.

    Lines are grouped by how many fields they have; each group's key names come from its first
    line and are then checked byte by byte on every line of the group.
    """
    n = len(starts)
    cols = {c: np.full(n, np.nan) for c in SAMPLE_COLUMNS}
    failed = np.zeros(n, bool)
    if n == 0:
        return SampleBatch(*cols.values()), np.flatnonzero(failed)
    vstart = starts + len(_SAMPLE_PREFIX)
    com = np.flatnonzero(a == 44)
    first = np.searchsorted(com, vstart)
    nc = np.searchsorted(com, ends) - first
    for k in np.flatnonzero(np.bincount(nc)).tolist():
        sel = np.flatnonzero(nc == k)
        keys = _template(a, int(starts[sel[0]]), int(ends[sel[0]]))
        if keys is None or len(keys) != k:
            failed[sel] = True
            continue
        ok = np.ones(len(sel), bool)
        line_end = ends[sel] - 1  # the closing brace
        if k:
            c = com[first[sel][:, None] + np.arange(k)]
            for f, key in enumerate(keys):
                for j, byte in enumerate(b',"' + key.encode() + b'":'):
                    ok &= a[c[:, f] + j] == byte
            spans = [(vstart[sel], c[:, 0])]
            spans += [(c[:, f] + len(key) + 4, c[:, f + 1] if f + 1 < k else line_end) for f, key in enumerate(keys)]
        else:
            spans = [(vstart[sel], line_end)]
        for name, (s, e) in zip(["t", *keys], spans, strict=True):
            vals, bad = parse_numbers(a, s, e, decimals=name == "t")
            ok &= ~bad
            if name in cols:
                cols[name][sel] = vals
        failed[sel[~ok]] = True
    t = cols["t"]
    last = np.where(failed, np.nan, t)
    last_t = float(np.nanmax(last)) if (~np.isnan(last)).any() else None
    cols["t"] = np.nan_to_num(t, nan=0.0)  # a null t reads as 0.0, as in the per-line path
    for name in SAMPLE_COLUMNS[1:5]:  # byte counts are integers: 1.5 reads as 1, as int() would
        np.trunc(cols[name], out=cols[name])
    rss = cols["rss"]
    rss[np.isnan(rss)] = 0.0
    rank = cols["rank"]  # parsed as digits only (a dot, a sign, true went to json): absent or null is rank 0
    rank[np.isnan(rank)] = 0.0
    return SampleBatch(*cols.values(), last_t=last_t), np.flatnonzero(failed)


_WEIGHTS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _weights(width: int) -> tuple[np.ndarray, np.ndarray]:
    """Digit weights for a token of ``width`` bytes, one row per dot position (``width`` = no dot)."""
    if width not in _WEIGHTS:
        j = np.arange(width)
        rows, div = [], []
        for dot in range(width + 1):
            exp = (width - 1 - j) - ((j < dot) if dot < width else 0)
            rows.append(np.where(j == dot, 0.0, 10.0 ** exp.clip(min=0)))
            div.append(10.0 ** (width - 1 - dot) if dot < width else 1.0)
        _WEIGHTS[width] = (np.array(rows), np.array(div))
    return _WEIGHTS[width]


def parse_numbers(
    a: np.ndarray, s: np.ndarray, e: np.ndarray, *, decimals: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Plain decimals ``a[s:e]`` (digits and at most one dot, or ``null``) as float64; ``bad`` marks the rest.

    Exact: up to 15 significant digits both the mantissa and the power of ten are exact in float64,
    so one division rounds correctly, giving the value ``float()`` would. Longer tokens, signs and
    exponents are left to json (``bad``). ``decimals=False`` (byte counts) also leaves any dot to
    json, and lets whole numbers go through one matrix-vector product.
    """
    n = len(s)
    vals = np.full(n, np.nan)
    length = e - s
    last = len(a) - 1
    null = (length == 4) & (a[np.minimum(s, last)] == 110)
    for j, byte in enumerate(b"null"):
        null &= a[np.minimum(s + j, last)] == byte
    bad = ((length <= 0) | (length > 16)) & ~null
    todo = ~bad & ~null
    counts = np.bincount(length[todo], minlength=1)
    for width in np.flatnonzero(counts).tolist():
        sel = np.flatnonzero(todo & (length == width))
        g = a[s[sel][:, None] + np.arange(width)]
        w, div = _weights(width)
        if not decimals:
            d = g - np.uint8(48)  # wraps below '0', so one comparison finds every non-digit
            row_bad = (d > 9).any(1) | (width > 15)
            vals[sel] = d.astype(np.float64) @ w[width]
            bad[sel[row_bad]] = True
            continue
        isdot = g == 46
        ndots = isdot.sum(1)
        nondigit = ((g < 48) | (g > 57)) & ~isdot
        dot = np.where(ndots == 1, isdot.argmax(1), width)
        row_bad = nondigit.any(1) | (ndots > 1) | (dot == 0) | (dot == width - 1) | (width - ndots > 15)
        digits = np.where(nondigit | isdot, 0, g - 48).astype(np.float64)
        vals[sel] = (digits * w[dot]).sum(1) / div[dot]
        bad[sel[row_bad]] = True
    vals[bad] = np.nan
    return vals, bad
