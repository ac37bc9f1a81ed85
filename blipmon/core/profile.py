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

from blipmon.core.errors import ProfileError
from blipmon.core.layout import CONFIG, EVENTS
from blipmon.core.sample_lines import SampleBatch, parse_sample_lines, sample_line_mask, sample_row

FORMAT_VERSION = 1  # docs/profile-format.md: what a change of it means


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
            line = _ENCODER.encode(record)
        except ValueError:  # a NaN or infinite loss: JSON has no such numbers, so record null
            line = _ENCODER.encode(_finite(record))
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


# One encoder for every record: ``json.dumps`` with options builds a new ``JSONEncoder`` at each call, which was a
# third of a record's cost at the probes' four boundaries a step (benchmarks/overhead.py).
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=_json_default)


def _not_a_number(_name: str) -> None:
    return None


def _loads(raw: bytes) -> Any:
    """``json.loads`` with ``NaN``/``Infinity``/``-Infinity`` read as null: Python's JSON reader accepts them,
    our writers never write them (``EventWriter`` writes null instead), and no reader can count with them."""
    return json.loads(raw, parse_constant=_not_a_number)


@dataclass
class ReadResult:
    events: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class EventReader:
    """Reads a run's events incrementally: ``poll()`` returns only records completed since last time.

    A last line without its newline is "not written yet" and is left for the next poll. A corrupt
    complete line is skipped with a warning that names its line number.
    """

    def __init__(self, run_dir: Path, start: int = 0, start_line: int = 0) -> None:
        """``start``/``start_line``: begin at a byte offset whose lines were already read (a run index's ``upto``)."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / EVENTS
        self._offset = start
        self._line_no = start_line
        self._checked_header = start > 0  # the header is at byte 0: checked by whoever read that far
        self.warnings: list[str] = []
        self._chunk_warnings: list[tuple[int, str]] | None = None

    @property
    def offset(self) -> int:
        """Bytes of the file read so far: where the next poll starts (followers measure progress by it)."""
        return self._offset

    @property
    def lines_read(self) -> int:
        """Lines of the file read so far (warnings number lines from 1): what a run index records beside ``upto``."""
        return self._line_no

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
                rec = _loads(raw)
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
        is_sample = sample_line_mask(a, starts, nl)
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
                recs = _loads(b"[" + b",".join(raws) + b"]")
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
            rec = _loads(raw)
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


INDEX_PREFIX = b'{"type":"index",'  # how ``EventWriter`` starts an ``index`` record's line (compact separators)
INDEX_SCAN_BYTES = 64 << 20  # how far from the end an index is looked for: ~800k steps of index


def find_index(run_dir: Path, max_scan: int = INDEX_SCAN_BYTES) -> tuple[dict[str, Any], int] | None:
    """The last complete ``index`` record of a profile and the byte where its line starts, or None.

    Why backwards: a finished run's index sits just before its ``end``, so ``show`` finds it by reading
    the last few megabytes instead of parsing a million samples. Only a whole line counts (a profile
    cut inside the index has none); a line that is not JSON, or not an index, is passed over.
    """
    path = Path(run_dir) / EVENTS
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            lo = max(0, size - max_scan)
            fh.seek(lo)
            data = fh.read(size - lo)
    except OSError:
        return None
    end = len(data)
    while True:
        at = data.rfind(b"\n" + INDEX_PREFIX, 0, end)
        if at < 0:  # (an index is never the first line: the header is)
            return None
        start = at + 1
        stop = data.find(b"\n", start)
        if stop >= 0:
            try:
                rec = json.loads(data[start:stop])
            except (ValueError, UnicodeDecodeError):
                rec = None
            if isinstance(rec, dict) and rec.get("type") == "index":
                return rec, lo + start
        end = at
