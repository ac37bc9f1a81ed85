"""A sweep as data: its configurations, ``sweep.json``, the queue a follower shows, its ETA and exit code.

What ``blipmon sweep`` writes and what everyone who reads a sweep folder needs (``show`` and
``attach`` of a sweep folder, the dashboard's sweep view, the launcher's list): defined here once.
Running a sweep is the runner's (``runner/sweep.py``: one child after another), following or
stopping one started elsewhere too (``runner/sweep_control.py``); the screen is the dashboard's
(``ui/sweep.py``). docs/profile-format.md describes ``sweep.json``; docs/sweeps.md the behaviour.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blipmon.core import presets
from blipmon.core.config import ConfigError, is_run_dir, resolve
from blipmon.core.errors import ProfileError, UsageError
from blipmon.core.layout import EVENTS, SWEEP_FILE
from blipmon.core.outcomes import EXIT_STOPPED, SWEEP_EXIT_CODES, sweep_exit_code
from blipmon.core.profile import check_run_dir
from blipmon.core.report import oom_where
from blipmon.core.run import RunData, check_follow_dir, load_run

FINAL = frozenset(SWEEP_EXIT_CODES) | {"not run"}  # statuses a configuration keeps once the sweep is past it


@dataclass
class Entry:
    """One configuration of the sweep and what became of it."""

    source: str  # the CONFIG argument it came from (a preset, a group, a file or a folder)
    cfg: dict[str, Any]
    refused: str | None = None  # preflight's reason, when it will not run here
    status: str = "pending"  # pending | running | refused | not run | a run status
    run_dir: Path | None = None
    seconds: float | None = None
    run: RunData | None = None

    @property
    def name(self) -> str:
        return str(self.cfg.get("name", "run"))

    @property
    def code(self) -> int | None:
        return SWEEP_EXIT_CODES.get(self.status)


class NotRun(RunData):
    """A table column for a configuration that has no run directory (refused, or its child wrote nothing)."""

    def __init__(self, name: str, cfg: dict[str, Any], label: str) -> None:
        super().__init__(header={"name": name}, config=cfg, environment={"device": ""})
        self.label = label

    @property
    def status(self) -> str:  # type: ignore[override]
        return self.label

    def peaks(self) -> dict[str, int | None]:
        # Nothing was measured: every figure is "—", host RSS included (RunData says 0 for a run without samples).
        return {"allocated": None, "reserved": None, "device_used": None, "host_rss": None}


def sweep_eta(
    durations: list[float], runs_left: int, current_left: float | None = None, current_elapsed: float | None = None
) -> float | None:
    """Seconds left: the current run's estimate plus the mean finished run for each one still to start.

    A current run with no step yet (still loading) is assumed to take the mean run (``current_elapsed``
    is how long it has run so far). One function for the terminal progress and the dashboard's queue,
    so both say the same ETA.
    """
    mean = sum(durations) / len(durations) if durations else None
    if current_left is None and current_elapsed is not None and mean is not None:
        current_left = max(mean - current_elapsed, 0.0)
    if runs_left == 0 and current_left is None:
        return None if current_elapsed is not None else 0.0
    if mean is None:
        return current_left if runs_left == 0 else None
    return (current_left or 0.0) + mean * runs_left


def expand(sources: list[str], overrides: list[str] | None = None) -> list[Entry]:
    """Presets, groups (``h100/``), TOML files and folders of TOML files -> validated configurations.

    All errors are collected and raised together, naming each argument, so one edit fixes them all.
    """
    entries: list[Entry] = []
    errors: list[str] = []
    for src in sources:
        try:
            names = _names_for(src)
        except ConfigError as e:
            errors.append(str(e))
            continue
        for name in names:
            try:
                entries.append(Entry(source=src, cfg=resolve(name, overrides or [])))
            except ConfigError as e:
                errors.append(f"{name}: {e}" if name not in str(e) else str(e))
    if errors:
        raise ConfigError("the sweep was not started:\n  " + "\n  ".join(errors))
    if not entries:
        raise ConfigError("the sweep has no configurations")
    return entries


def _names_for(src: str) -> list[str]:
    """What one CONFIG argument stands for: itself (a preset, a file, a run), a folder's TOML files, or a group."""
    if presets.exists(src):
        return [src]
    path = Path(src)
    if is_run_dir(path):  # a saved run: its configuration again
        return [src]
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.toml"))
        if not files:
            raise ConfigError(f"{src}: a folder with no .toml configuration in it")
        return files
    group = presets.group(src) if not src.endswith(".toml") else []
    if group:
        return group
    if src.endswith("/"):
        groups = ", ".join(g + "/" for g in presets.GROUPS)
        raise ConfigError(f"{src!r}: neither a folder nor a preset group (groups: {groups})")
    return [src]  # a preset or a file: resolve() says what is wrong with it


def sweep_label(sources: list[str]) -> str:
    """The sweep folder's name: ``sweep``, or ``sweep-h100`` for a sweep of whole preset groups."""
    groups = [s.rstrip("/") for s in sources if not presets.exists(s) and presets.group(s) and not Path(s).is_dir()]
    if groups and len(groups) == len(sources):
        return "sweep-" + "-".join(dict.fromkeys(g.replace("/", "-") for g in groups))
    return "sweep"


def write_sweep_file(sweep_dir: Path, entries: list[Entry], started: float, finished: bool) -> None:
    """Rewrite ``sweep.json`` atomically (a follower never reads half of it); a failed write is said, not raised."""
    doc = {
        "format_version": 1,
        "started": started,
        "finished": finished,
        "ended": time.time() if finished else None,
        "pid": os.getpid(),  # so a follower can tell a sweep that died (SIGKILL) from one still going
        # ... and so `blipmon attach` on another machine (a shared disk) never reads this pid as one of its own
        "hostname": socket.gethostname(),
        "configs": [
            {
                "name": e.name,
                "source": e.source,
                "status": e.status,
                "exit_code": e.code,
                "run_dir": e.run_dir.name if e.run_dir else None,
                "seconds": e.seconds,
                "reason": e.refused,
            }
            for e in entries
        ],
    }
    tmp = sweep_dir / (SWEEP_FILE + ".tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, sweep_dir / SWEEP_FILE)
    except OSError as e:  # the runs themselves are what matters; say so and go on
        print(f"blipmon: could not write {sweep_dir / SWEEP_FILE}: {e}", file=sys.stderr)


def read_sweep_file(sweep_dir: Path) -> dict[str, Any] | None:
    """``sweep.json`` as written (atomically) by a sweep, or None while it does not exist or cannot be read."""
    try:
        doc = json.loads((Path(sweep_dir) / SWEEP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("configs"), list):
        return None
    doc["configs"] = [c for c in doc["configs"] if isinstance(c, dict)]
    return doc


def table_runs(entries: list[Entry]) -> list[RunData]:
    """The comparison's columns: every run, and every refused configuration as a ``refused`` column."""
    runs: list[RunData] = []
    for e in entries:
        if e.status == "refused":
            runs.append(NotRun(e.name, e.cfg, "refused"))
        elif e.run is not None:
            runs.append(e.run)
    return runs


def load_sweep_runs(sweep_dir: Path) -> list[RunData]:
    """The comparison's columns for a sweep folder, from its ``sweep.json``: what ``blipmon sweep`` prints.

    Every run that has a directory (its recorded run, or a column naming its status when it recorded
    nothing readable) and every refused configuration; configurations never started are left out.
    """
    doc = read_sweep_file(sweep_dir)
    if doc is None:
        raise ProfileError(f"{sweep_dir}: no readable {SWEEP_FILE}; is this a sweep folder?")
    runs: list[RunData] = []
    for c in doc["configs"]:
        name, status, run_dir = str(c.get("name") or "run"), str(c.get("status") or ""), c.get("run_dir")
        if status == "refused":
            runs.append(NotRun(name, {}, "refused"))
        elif isinstance(run_dir, str) and run_dir:
            try:
                runs.append(load_run(Path(sweep_dir) / run_dir))
            except ProfileError:
                runs.append(NotRun(name, {}, status if status in SWEEP_EXIT_CODES else "error"))
    return runs


def doc_exit_code(doc: dict[str, Any] | None) -> int | None:
    """``blipmon sweep``'s exit code for what ``sweep.json`` says, once its process has gone.

    We are not its parent, so nobody tells us its exit status. A configuration still ``running``
    or ``pending`` (a refused one is ``pending`` with its reason until the sweep reaches it) means
    the sweep died before the end: "stopped or killed", 4, as for one that was interrupted.
    """
    if doc is None:
        return None
    codes: list[int | None] = []
    for c in doc["configs"]:
        status = str(c.get("status") or "pending")
        if status == "pending" and c.get("reason"):
            status = "refused"
        codes.append(EXIT_STOPPED if status in ("running", "pending", "not run") else SWEEP_EXIT_CODES.get(status))
    return sweep_exit_code(codes)


def is_sweep_dir(path: Path, *, attach: bool = False) -> bool:
    """True for a sweep folder (it holds ``sweep.json``); False for a run directory; else a clear error (exit 2).

    ``attach`` and ``replay`` take either, so a folder that is neither names both things it lacks. ``attach``
    also takes a run whose events.jsonl is still empty (the child has not written its header yet): it waits.
    """
    if path.is_dir() and (path / SWEEP_FILE).is_file():
        if read_sweep_file(path) is None:
            raise UsageError(f"{path}: its {SWEEP_FILE} cannot be read as a sweep's")
        return True
    if path.is_dir() and not (path / EVENTS).exists():
        raise UsageError(f"{path}: not a blipmon run or sweep (no {EVENTS} or {SWEEP_FILE} in it)")
    if attach:
        check_follow_dir(path)
    else:
        check_run_dir(path)
    return False


# -- the queue a follower shows ---------------------------------------------------------------------
@dataclass(frozen=True)
class QueueRow:
    """One configuration as the queue shows it."""

    index: int
    name: str
    status: str  # queued | running | ok | oom | error | refused | stopped | killed | not run
    run_dir: Path | None
    steps: str
    peak: int | None
    seconds: float | None
    note: str  # the refusal reason, the error, where it ran out of memory


@dataclass(frozen=True)
class QueueState:
    """The whole sweep at one moment."""

    sweep_dir: Path
    rows: tuple[QueueRow, ...]
    elapsed: float
    eta: float | None
    finished: bool
    readable: bool  # False until sweep.json exists (a moment after the folder)

    @property
    def current(self) -> QueueRow | None:
        return next((r for r in self.rows if r.status == "running"), None)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def exit_code(self) -> int:
        """``blipmon sweep``'s exit code for what the queue shows (when the process's own is not known)."""
        return sweep_exit_code(
            [SWEEP_EXIT_CODES.get(r.status) for r in self.rows] + [EXIT_STOPPED if self.counts().get("not run") else 0]
        )


def steps_text(run: RunData) -> str:
    """A run's steps as the queue shows them: ``3/10``, the job kind before a load or generate job ends."""
    total = run.plan.get("total_steps")
    done = len(run.steps)
    if isinstance(total, int) and total > 0:
        return f"{done}/{total}"
    if run.config.get("job", {}).get("kind") in ("load", "generate") and not done:
        return run.config["job"]["kind"]
    return str(done) if done or run.header else "—"


def queue_note(run: RunData | None, status: str) -> str:
    """What the queue says beside a run that ended badly: where it ran out of memory, its error's first line."""
    if run is None:
        return ""
    if status == "oom" and run.oom:
        return f"out of memory at {oom_where(run)}"
    if status == "error" and run.error:
        msg = str(run.error.get("message", "")).strip().splitlines()
        return msg[0] if msg else "error"
    return ""
