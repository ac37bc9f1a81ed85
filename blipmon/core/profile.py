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

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

FORMAT_VERSION = 1
EVENTS = "events.jsonl"
CONFIG = "config.json"
LOG = "child.log"


class ProfileError(Exception):
    """A run directory that cannot be read; the message says why in the user's terms."""


class EventWriter:
    """Appends events as JSON lines and flushes each one; safe to share with the sampler thread.

    A failed write (a full disk, a removed directory) is remembered rather than raised from the
    sampler thread: ``failed`` tells the job to stop cleanly, and what was written stays valid.
    """

    def __init__(self, path: Path, *, t0: float | None = None) -> None:
        self.path = path
        self.t0 = time.monotonic() if t0 is None else t0
        self._lock = threading.Lock()
        self._fh: IO[str] | None = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.failed: OSError | None = None

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 6)

    def write(self, kind: str, /, **fields: Any) -> bool:
        record = {"type": kind, "t": fields.pop("t", None) or self.now(), **fields}
        line = json.dumps(record, separators=(",", ":"), allow_nan=False, default=_json_default) + "\n"
        with self._lock:
            if self._fh is None or self.failed is not None:
                return False
            try:
                self._fh.write(line)
                self._fh.flush()
            except OSError as e:
                self.failed = e
                return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                try:
                    self._fh.close()
                except OSError as e:
                    self.failed = self.failed or e
                self._fh = None


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
    tmp = run_dir / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / CONFIG)


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
