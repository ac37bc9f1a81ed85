"""The on-disk profile: one directory per run holding an append-only JSON-lines event stream.

Why JSON lines: the child appends and flushes one record at a time, so whatever was written before
a crash, a SIGKILL or a full disk stays readable; a reader following a live run sees a half-written
last line and simply waits for the rest. Nothing in a profile is ever executed or unpickled.

Layout of a run directory::

    events.jsonl   header, environment, plan, load, phase, step, sample, oom, end, exit records
    config.json    the resolved configuration the child ran
    child.log      the child's stdout and stderr
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from blipmon.core.config import RUN_CONFIG, RUN_EVENTS

FORMAT_VERSION = 1
EVENTS = RUN_EVENTS
CONFIG = RUN_CONFIG
LOG = "child.log"


class ProfileError(Exception):
    """A run directory that cannot be read; the message says why in the user's terms."""


RESERVE = ".blipmon-reserve"
"""A run's reserved space: written by the launcher before the child starts, freed to record how a run ended.

On a full disk every write fails, so the records that say what happened (the child's ``error`` and
``end``, the parent's ``exit``) would be lost and the run would read as killed. The child frees this
file when its profile hits a full disk, and the parent frees whatever is left before it appends
the exit record: what the run ends with always has room, and no file stays behind.
"""
RESERVE_BYTES = 64 * 1024
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(e: BaseException) -> bool:
    """A full disk or an exhausted quota (not a file-size limit, which freeing space does not cure)."""
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def reserve_space(run_dir: Path, nbytes: int = RESERVE_BYTES) -> None:
    """Write the run's reserve (real blocks, not a sparse file); raises OSError, leaving nothing, when it cannot."""
    path = Path(run_dir) / RESERVE
    try:
        with open(path, "wb") as fh:
            fh.write(bytes(nbytes))
    except OSError:
        release_reserve(run_dir)
        raise


def release_reserve(run_dir: Path | None) -> bool:
    """Free the run's reserve; True when there was one to free."""
    if run_dir is None:
        return False
    try:
        os.unlink(Path(run_dir) / RESERVE)
    except OSError:  # not there (already freed, or never made), or the folder is gone
        return False
    return True


class _WriteFailed(Exception):
    def __init__(self, error: OSError, rest: bytes, started: bool) -> None:
        super().__init__(str(error))
        self.error, self.rest, self.started = error, rest, started


class EventWriter:
    """Appends events as JSON lines and flushes each one; safe to share with the sampler thread.

    Each record goes out as one ``write`` on an ``O_APPEND`` file, so several ranks can append to
    the same stream without interleaving inside a line. A failed write (a full disk, a removed
    directory) is remembered rather than raised from the sampler thread: ``failed`` tells the job
    to stop cleanly, and what was written stays valid. On a full disk the writer frees the run's
    reserve (``reserve_dir``, see ``RESERVE``) so the record that hit it ends whole, and
    ``write_final`` can still record how the run ended.
    """

    def __init__(self, path: Path, *, t0: float | None = None, reserve_dir: Path | None = None) -> None:
        self.path = path
        env_t0 = os.environ.get("BLIPMON_T0")
        if t0 is None and env_t0:
            try:
                t0 = float(env_t0)  # the launcher's monotonic clock: every rank shares one time axis
            except ValueError:
                t0 = None
        self.t0 = time.monotonic() if t0 is None else t0
        self.reserve_dir = reserve_dir
        self._lock = threading.Lock()
        self._fh: IO[bytes] | None = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        self.failed: OSError | None = None
        self._partial = False  # a failed write left part of a line: the next record starts a new one

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 6)

    def write(self, kind: str, /, **fields: Any) -> bool:
        """Append one record; False (and ``failed`` set) once the profile cannot be written."""
        return self._write(kind, fields, final=False)

    def write_final(self, kind: str, /, **fields: Any) -> bool:
        """Append one of a run's last records (``error``, ``end``) even after a failed write: best effort."""
        return self._write(kind, fields, final=True)

    def _write(self, kind: str, fields: dict[str, Any], *, final: bool) -> bool:
        record = {"type": kind, "t": fields.pop("t", None) or self.now(), **fields}
        try:
            line = json.dumps(record, separators=(",", ":"), allow_nan=False, default=_json_default)
        except ValueError:  # a NaN or infinite loss: JSON has no such numbers, so record null
            line = json.dumps(_finite(record), separators=(",", ":"), allow_nan=False, default=_json_default)
        data = (line + "\n").encode("utf-8")
        with self._lock:
            if self._fh is None or (self.failed is not None and not final):
                return False
            if self._partial:
                data = b"\n" + data
            try:
                self._put(data)
                self._partial = False
                return True
            except _WriteFailed as f:
                self.failed = self.failed or f.error
                failure = f
            if is_disk_full(failure.error):
                release_reserve(self.reserve_dir)
                try:
                    self._put(failure.rest)  # into the space the reserve held: this record ends whole
                    self._partial = False
                    return True
                except _WriteFailed as g:
                    self._partial = self._partial or failure.started or g.started
                    return False
            self._partial = self._partial or failure.started
            return False

    def _put(self, data: bytes) -> None:
        """Write all of ``data`` (finishing short writes); on an error, raise it with what is left unwritten."""
        assert self._fh is not None
        done = 0
        while done < len(data):
            try:
                n = self._fh.write(data[done:])
            except OSError as e:
                raise _WriteFailed(e, data[done:], started=done > 0) from None
            done += n or 0

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                try:
                    self._fh.close()
                except OSError as e:
                    self.failed = self.failed or e
                self._fh = None


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass
class ReadResult:
    events: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class EventReader:
    """Reads a run's events incrementally: ``poll()`` returns only records completed since last time.

    A last line without its newline is "not written yet" and is left for the next poll. A corrupt
    complete line is skipped with a warning that names its line number.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / EVENTS
        self._offset = 0
        self._line_no = 0
        self._checked_header = False
        self.warnings: list[str] = []
        self._chunk_warnings: list[tuple[int, str]] | None = None

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            if not self.run_dir.exists():
                raise ProfileError(f"{self.run_dir}: the run directory no longer exists") from None
            return []
        except OSError as e:
            raise ProfileError(f"{self.path}: cannot read: {e}") from None
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        complete = chunk[: end + 1]
        self._offset += len(complete)
        out: list[dict[str, Any]] = []
        for raw in complete.split(b"\n")[:-1]:
            self._line_no += 1
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                self.warnings.append(f"{self.path}: line {self._line_no} is corrupt and was skipped")
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("type"), str):
                self.warnings.append(f"{self.path}: line {self._line_no} is not an event and was skipped")
                continue
            if not self._checked_header:
                self._check_header(rec)
            out.append(rec)
        return out

    def poll_batch(
        self, chunk_bytes: int = 4 << 20, max_bytes: int | None = None
    ) -> tuple[list[dict[str, Any]], SampleBatch]:
        """Like ``poll()``, but sample records come back as columns instead of one dict each.

        Why: a day-long run holds a million samples, and building a dict per sample costs seconds;
        the columns are parsed in bulk (see ``parse_sample_lines``). Other events keep their order;
        samples keep theirs. ``max_bytes`` bounds one call so a loader thread can report progress.
        """
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read() if max_bytes is None else fh.read(max_bytes)
        except FileNotFoundError:
            if not self.run_dir.exists():
                raise ProfileError(f"{self.run_dir}: the run directory no longer exists") from None
            return [], SampleBatch.empty()
        except OSError as e:
            raise ProfileError(f"{self.path}: cannot read: {e}") from None
        end = data.rfind(b"\n")
        if end < 0:
            return [], SampleBatch.empty()
        events: list[dict[str, Any]] = []
        batches: list[SampleBatch] = []
        pos = 0
        while pos <= end:
            stop = data.rfind(b"\n", pos, pos + chunk_bytes)
            if stop < 0:  # one line longer than a chunk
                stop = data.find(b"\n", pos + chunk_bytes)
            chunk = data[pos : stop + 1]
            evs, batch = self._parse_chunk(chunk)
            events.extend(evs)
            if len(batch):
                batches.append(batch)
            pos = stop + 1
        self._offset += end + 1
        return events, SampleBatch.concat(batches)

    def _parse_chunk(self, chunk: bytes) -> tuple[list[dict[str, Any]], SampleBatch]:
        self._chunk_warnings = []
        try:
            return self._parse_chunk_lines(chunk)
        finally:
            # Lines are looked at out of order (samples apart): report problems in file order.
            self.warnings.extend(msg for _, msg in sorted(self._chunk_warnings or []))
            self._chunk_warnings = None

    def _parse_chunk_lines(self, chunk: bytes) -> tuple[list[dict[str, Any]], SampleBatch]:
        first_line = self._line_no + 1
        a = np.frombuffer(chunk, np.uint8)
        nl = np.flatnonzero(a == 10)
        self._line_no += len(nl)
        starts = np.empty_like(nl)
        starts[:1] = 0
        starts[1:] = nl[:-1] + 1
        is_sample = _sample_line_mask(a, starts, nl)
        if not self._checked_header:
            nonblank = [i for i in range(min(len(nl), 64)) if chunk[starts[i] : nl[i]].strip()]
            if nonblank and is_sample[nonblank[0]]:
                raise ProfileError(f"{self.path}: not a blipmon profile (the first record is not a header)")
        events: list[dict[str, Any]] = []
        stray: list[tuple[int, tuple[float, ...]]] = []  # samples in an unusual shape, by line index
        todo = [(i, chunk[starts[i] : nl[i]]) for i in np.flatnonzero(~is_sample).tolist()]
        todo = [(i, raw) for i, raw in todo if raw.strip()]
        for i, rec in zip(
            [i for i, _ in todo], self._decode_many([raw for _, raw in todo], first_line, todo), strict=True
        ):
            if rec is not None:
                if not self._checked_header:
                    self._check_header(rec)
                if rec["type"] == "sample":
                    stray.append((i, sample_row(rec)))
                else:
                    events.append(rec)
        lines = np.flatnonzero(is_sample)
        batch, failed = parse_sample_lines(a, starts[lines], nl[lines])
        keep = np.ones(len(lines), bool)
        if len(failed):
            rows: list[tuple[float, ...]] = []
            for j in failed.tolist():
                i = int(lines[j])
                rec = self._decode(chunk[starts[i] : nl[i]], first_line + i)
                if rec is None or rec.get("type") != "sample":
                    keep[j] = False
                    if rec is not None:
                        events.append(rec)
                    continue
                rows.append(sample_row(rec))
            batch = batch.fill(failed, rows, keep)
        if stray:
            batch = batch.merge(lines[keep], stray)
        return events, batch

    def _decode_many(
        self, raws: list[bytes], first_line: int, todo: list[tuple[int, bytes]]
    ) -> list[dict[str, Any] | None]:
        """Decode many lines in one ``json.loads`` (a third of the per-call cost); line by line if any is bad."""
        if len(raws) > 1:
            try:
                recs = json.loads(b"[" + b",".join(raws) + b"]")
            except (ValueError, UnicodeDecodeError):
                recs = None
            if (
                isinstance(recs, list)
                and len(recs) == len(raws)
                and all(isinstance(r, dict) and isinstance(r.get("type"), str) for r in recs)
            ):
                return recs
        return [self._decode(raw, first_line + i) for i, raw in todo]

    def _decode(self, raw: bytes, line_no: int) -> dict[str, Any] | None:
        try:
            rec = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            self._warn(line_no, f"{self.path}: line {line_no} is corrupt and was skipped")
            return None
        if not isinstance(rec, dict) or not isinstance(rec.get("type"), str):
            self._warn(line_no, f"{self.path}: line {line_no} is not an event and was skipped")
            return None
        return rec

    def _warn(self, line_no: int, message: str) -> None:
        if self._chunk_warnings is not None:
            self._chunk_warnings.append((line_no, message))
        else:
            self.warnings.append(message)

    def _check_header(self, rec: dict[str, Any]) -> None:
        self._checked_header = True
        if rec.get("type") != "header":
            raise ProfileError(f"{self.path}: not a blipmon profile (the first record is not a header)")
        version = rec.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ProfileError(f"{self.path}: the header has no valid format_version")
        if version > FORMAT_VERSION:
            raise ProfileError(
                f"{self.path}: profile format version {version} is newer than this blipmon reads "
                f"(version {FORMAT_VERSION}); upgrade blipmon to open it"
            )


# -- bulk sample parsing ------------------------------------------------------------------------
#
# Sample lines are written by one writer in one fixed shape, ``{"type":"sample","t":T,"rss":N,...}``,
# so their numbers can be cut out of the byte buffer with numpy instead of building a dict per line.
# Anything that does not fit that shape exactly (another key order, a string, an exponent, a
# corrupt line) falls back to ``json.loads`` for that line, so the result is always what the
# per-line path would give. Nothing is ever evaluated: this only reads digits.

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


def _sample_line_mask(a: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
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


def check_run_dir(run_dir: Path) -> Path:
    """Refuse early, with a clear message, what is not a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ProfileError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise ProfileError(f"{run_dir}: not a directory (expected a run directory with {EVENTS})")
    if not (run_dir / EVENTS).is_file():
        raise ProfileError(f"{run_dir}: not a blipmon run (no {EVENTS} in it)")
    if (run_dir / EVENTS).stat().st_size == 0:
        raise ProfileError(f"{run_dir}: the run has recorded nothing yet ({EVENTS} is empty)")
    return run_dir


def read_all(run_dir: Path) -> ReadResult:
    check_run_dir(run_dir)
    reader = EventReader(run_dir)
    events = reader.poll()
    if not events:
        raise ProfileError(f"{run_dir}: the run has recorded nothing readable yet")
    return ReadResult(events=events, warnings=reader.warnings)


def iter_run_dirs(root: Path) -> Iterator[Path]:
    """Run directories under ``root`` (one level, and one more for sweeps), newest first."""
    if not root.is_dir():
        return
    found: list[Path] = []
    for p in root.iterdir():
        if (p / EVENTS).is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(q for q in p.iterdir() if (q / EVENTS).is_file())
    found.sort(key=lambda p: (p / EVENTS).stat().st_mtime, reverse=True)
    yield from found


def write_config(run_dir: Path, cfg: dict[str, Any]) -> None:
    """Write ``config.json`` whole or not at all: a failed write (a full disk) leaves no temporary file."""
    tmp = run_dir / (CONFIG + ".tmp")
    try:
        tmp.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, run_dir / CONFIG)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def read_config(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"{run_dir}: no {CONFIG}") from None
    except (OSError, ValueError) as e:
        raise ProfileError(f"{run_dir / CONFIG}: cannot read: {e}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{run_dir / CONFIG}: not a configuration object")
    return data
