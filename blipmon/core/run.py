"""A run as data: events folded into one object, and the fixed JSON summary of DESIGN.md.

``RunData`` is what every consumer reads — ``show``, ``compare``, the dashboard whether live,
attached or replayed — so they can never disagree about what a run says. It is built by feeding
events in order (``apply``), which is what lets the dashboard follow a file as it grows.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blipmon.core.profile import (
    EVENTS,
    FORMAT_VERSION,
    EventReader,
    ProfileError,
    SampleBatch,
    check_run_dir,
    sample_row,
)

PHASES = ("before_fwd", "after_fwd", "after_bwd", "after_opt_step")
CATEGORIES = ("params", "grads", "optim", "acts", "other")
STATUSES = ("running", "ok", "oom", "error", "stopped", "killed")
_STOP_SIGNALS = {"SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"}


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


def _int(v: Any) -> int | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return int(v)
    return None


_SEVERITY = {"ok": 0, "stopped": 1, "error": 2, "oom": 3}
_PHASE_INTS = ("step", "micro_step", "rank", "params", "grads", "optim", "acts", "other", "allocated", "peak",
               "reserved", "host_rss")  # fmt: skip
_ENV_TYPES: dict[str, Any] = {"device": str, "gpu_name": str, "gpu_total_bytes": int, "host_total_bytes": int,
                              "torch": str, "transformers": str, "world_size": int, "gpu_reason": str}  # fmt: skip
_PLAN_TYPES: dict[str, Any] = {"total_steps": int, "steps_per_epoch": int, "micro_per_step": int, "batch_size": int,
                               "trainable_params": int, "total_params": int, "weights": str, "world_size": int}  # fmt: skip
_OOM_TYPES: dict[str, Any] = {"step": int, "micro_step": int, "phase": str, "requested_bytes": int, "message": str,
                              "allocated": int, "reserved": int, "peak": int, "rank": int,
                              # torch's out-of-memory observer (CUDA): exact size's source, the device, its state
                              "requested_source": str, "device": str, "device_free": int, "device_limit": int}  # fmt: skip


def _clean_fields(ev: dict[str, Any], types: dict[str, Any]) -> dict[str, Any]:
    """Keep a record's known fields only where they have the type the summary promises; others become None.

    A profile is data from a file: a wrong type must degrade to "not measured", never crash a reader.
    """
    out = dict(ev)
    for key, typ in types.items():
        if key not in out:
            continue
        v = out[key]
        if typ is int:
            out[key] = _int(v)
        elif typ is float:
            out[key] = _num(v)
        elif not isinstance(v, typ):
            out[key] = None
    return out


_OFFLOAD_INTS = ("grads_host", "optim_host")


def _clean_phase(ev: dict[str, Any]) -> dict[str, Any] | None:
    if ev.get("phase") not in PHASES:
        return None
    out = ev  # coerced in place: the record is ours, and callers may hold on to it
    for key in _PHASE_INTS:
        out[key] = _int(ev.get(key))
    if out["step"] is None or out["micro_step"] is None:
        return None
    out["t"] = _num(ev.get("t"))
    for key in _OFFLOAD_INTS:  # only where a strategy offloads (DeepSpeed): absent means "not split"
        if key in ev:
            out[key] = _int(ev[key])
    if "devices" in ev:  # per-GPU allocator figures of a model on several GPUs; untrusted like the rest
        out["devices"] = _clean_devices(ev["devices"])
        if out["devices"] is None:
            del out["devices"]
    return out


def _clean_devices(value: Any) -> dict[str, dict[str, int | None]] | None:
    """``{"cuda:N": {"allocated", "reserved", "peak"}}`` with integer figures, or None when unusable."""
    if not isinstance(value, dict):
        return None
    out: dict[str, dict[str, int | None]] = {}
    for dev, figures in value.items():
        if isinstance(dev, str) and isinstance(figures, dict):
            out[dev] = {k: _int(figures.get(k)) for k in ("allocated", "reserved", "peak")}
    return out or None


def _clean_step(ev: dict[str, Any]) -> dict[str, Any] | None:
    step = _int(ev.get("step"))
    if step is None:
        return None
    out = ev
    out["step"] = step
    for key in ("seconds", "loss", "samples_per_s"):
        out[key] = _num(ev.get(key))
    return out


def _clean_rank_step(ev: dict[str, Any]) -> dict[str, Any] | None:
    """Another rank's step (``rank_step``), typed like a ``step`` record; None when its step or rank is unusable.

    A rank that is not a non-negative integer cannot be told apart from rank 0's ``step`` records,
    so such a record is dropped rather than guessed at, as a step without a number is.
    """
    clean = _clean_step(ev)
    rank = ev.get("rank")
    if clean is None or not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        return None
    clean["t"] = _num(ev.get("t"))
    return clean


def _clean_load(ev: dict[str, Any]) -> dict[str, Any]:
    out = _clean_fields(ev, {"params_bytes": int, "peak": int, "host_rss": int, "weights": str})
    out["seconds"] = _num(ev.get("seconds"))
    place = ev.get("placement")
    out["placement"] = (
        {str(k): v for k, v in place.items() if isinstance(v, int) and not isinstance(v, bool)}
        if isinstance(place, dict)
        else {}
    )
    return out


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    return float(v) if isinstance(v, (int, float)) else None


@dataclass
class RunData:
    """Everything recorded about one run so far."""

    path: Path | None = None
    header: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] | None = None
    phases: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    rank_steps: list[dict[str, Any]] = field(default_factory=list)  # the other ranks' steps (``steps`` is rank 0's)
    samples: Samples = field(default_factory=Samples)
    generate: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    oom: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    end: dict[str, Any] | None = None
    exit: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    last_t: float = 0.0
    warnings: list[str] = field(default_factory=list)

    # -- building -----------------------------------------------------------------------------
    def apply(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        t = _num(ev.get("t"))
        if t is not None and t > self.last_t:
            self.last_t = t
        if kind == "sample":
            self.samples.append(ev)
        elif kind == "phase":
            clean = _clean_phase(ev)
            if clean is not None:
                self.phases.append(clean)
        elif kind == "step":
            clean = _clean_step(ev)
            if clean is not None:
                self.steps.append(clean)
        elif kind == "rank_step":
            clean = _clean_rank_step(ev)
            if clean is not None:
                self.rank_steps.append(clean)
        elif kind == "header":
            self.header = ev
        elif kind == "config":
            cfg = ev.get("config")
            if isinstance(cfg, dict):
                self.config = cfg
        elif kind == "environment":
            self.environment = _clean_fields(ev, _ENV_TYPES)
        elif kind == "plan":
            self.plan = _clean_fields(ev, _PLAN_TYPES)
        elif kind == "load":
            self.load = _clean_load(ev)
        elif kind == "generate":
            self.generate.append(ev)
        elif kind == "note":
            self.notes.append(str(ev.get("message", "")))
        elif kind == "oom":
            self.oom = _clean_fields(ev, _OOM_TYPES)
        elif kind == "error":
            self.error = ev
        elif kind == "end":
            end = _clean_fields(ev, {"status": str, "code": int, "rank": int})
            # With several ranks the worst ending is the run's (one rank's OOM ends them all).
            if self.end is None or _SEVERITY.get(str(end.get("status")), 0) >= _SEVERITY.get(
                str(self.end.get("status")), 0
            ):
                self.end = end
        elif kind == "exit":
            self.exit = _clean_fields(ev, {"code": int, "signal": str})
        elif kind == "prediction":
            self.prediction = ev
        # Unknown kinds come from newer minor writers: ignored, never an error.

    def extend(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            self.apply(ev)

    def extend_samples(self, batch: SampleBatch) -> None:
        """Add samples parsed in bulk (``EventReader.poll_batch``); the same as applying them one by one."""
        self.samples.extend_batch(batch)
        if batch.last_t is not None and batch.last_t > self.last_t:
            self.last_t = batch.last_t

    def follow(self, reader: EventReader, max_bytes: int | None = None) -> int:
        """Read what ``reader`` has that is new and fold it in; returns how many records arrived."""
        events, batch = reader.poll_batch(max_bytes=max_bytes)
        self.extend(events)
        self.extend_samples(batch)
        return len(events) + len(batch)

    # -- derived ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.header.get("name") or self.config.get("name") or (self.path.name if self.path else "run"))

    @property
    def finished(self) -> bool:
        return self.exit is not None or self.end is not None or self.status != "running"

    @property
    def status(self) -> str:
        # The child's own end record is written last, after everything else: when it is there the
        # job is over, whatever happened to the process afterwards (a SIGKILL during teardown).
        if self.end is not None and self.end.get("status") in STATUSES:
            return str(self.end["status"])
        if self.exit is not None:
            sig = self.exit.get("signal")
            if sig == "SIGKILL":
                return "killed"
            if sig in _STOP_SIGNALS:
                return "stopped"
            return {0: "ok", 3: "oom", 4: "stopped"}.get(self.exit.get("code"), "error")  # type: ignore[arg-type]
        if self._writer_gone():
            return "killed"
        return "running"

    def _writer_gone(self) -> bool:
        """A run nobody is writing any more: its child died without an end record and no parent said so."""
        pid, host = self.header.get("pid"), self.header.get("hostname")
        if not isinstance(pid, int) or host != socket.gethostname():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    def steps_of(self, rank: int) -> list[dict[str, Any]]:
        """``rank``'s step records: ``steps`` for rank 0 (which writes ``step``), its ``rank_step`` records else."""
        if rank == 0:
            return self.steps
        return [s for s in self.rank_steps if s.get("rank") == rank]

    def peaks(self) -> dict[str, int | None]:
        sm = self.samples.maxima()
        alloc = [p.get("peak") or p.get("allocated") for p in self.phases] + [sm["allocated"]]
        res = [p.get("reserved") for p in self.phases] + [sm["reserved"]]
        rss = [p.get("host_rss") for p in self.phases] + [sm["host_rss"]]
        gen = self.generate
        alloc += [g.get("peak") for g in gen]
        rss += [g.get("host_rss") for g in gen]
        if self.load:
            alloc.append(self.load.get("peak"))
            rss.append(self.load.get("host_rss"))
        return {
            "allocated": _max(alloc),
            "reserved": _max(res),
            "device_used": sm["device_used"],
            "host_rss": _max(rss) or 0,
        }

    def peak_phase(self) -> dict[str, Any] | None:
        """The phase record with the highest memory: allocator peak on CUDA, category total on CPU."""
        if not self.phases:
            return None
        return max(self.phases, key=phase_total)

    def summary(self) -> dict[str, Any]:
        """The fixed JSON run summary of DESIGN.md.

        A multi-rank run adds ``rank_steps`` (the other ranks' steps, each with its ``rank``): an
        optional key, there only when such records exist, so a single-rank summary is unchanged.
        """
        env = self.environment
        out: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "status": self.status,
            "config": self.config,
            "environment": {
                "device": env.get("device", "cpu"),
                "gpu_name": env.get("gpu_name"),
                "gpu_total_bytes": env.get("gpu_total_bytes"),
                "host_total_bytes": env.get("host_total_bytes", 0),
                "torch": env.get("torch", ""),
                "transformers": env.get("transformers", ""),
                "world_size": env.get("world_size", 1),
            },
            "load": None
            if self.load is None
            else {
                "seconds": self.load.get("seconds"),
                "params_bytes": self.load.get("params_bytes"),
                "placement": self.load.get("placement", {}),
            },
            "phases": [_phase_out(p) for p in self.phases],
            "steps": [
                {
                    "step": s.get("step"),
                    "seconds": s.get("seconds"),
                    "loss": s.get("loss"),
                    "samples_per_s": s.get("samples_per_s"),
                }
                for s in self.steps
            ],
            "peaks": self.peaks(),
            "oom": None
            if self.oom is None
            else {
                "step": self.oom.get("step"),
                "micro_step": self.oom.get("micro_step"),
                "phase": self.oom.get("phase"),
                "requested_bytes": self.oom.get("requested_bytes"),
                "message": self.oom.get("message", ""),
                # Extensions, present where torch's out-of-memory observer saw the failure (CUDA).
                **{k: self.oom[k] for k in ("device", "device_free", "device_limit") if self.oom.get(k) is not None},
            },
            "exit": {"code": self.exit.get("code"), "signal": self.exit.get("signal")}
            if self.exit
            else {"code": None, "signal": None},
        }
        if self.rank_steps:
            out["rank_steps"] = [
                {
                    "rank": s.get("rank"),
                    "step": s.get("step"),
                    "seconds": s.get("seconds"),
                    "loss": s.get("loss"),
                    "samples_per_s": s.get("samples_per_s"),
                }
                for s in self.rank_steps
            ]
        return out


_PHASE_KEYS = ("step", "micro_step", "rank", "phase", "t", "params", "grads", "optim", "acts", "other",
               "allocated", "peak", "reserved", "host_rss")  # fmt: skip


def _phase_out(p: dict[str, Any]) -> dict[str, Any]:
    out = {k: p.get(k) for k in _PHASE_KEYS}
    out["rank"] = out["rank"] or 0
    # Extensions of the fixed summary, present only where they exist: the host share of DeepSpeed's offloaded
    # gradients and optimizer state, and each GPU's figures for a model on several GPUs.
    for key in (*_OFFLOAD_INTS, "devices"):
        if p.get(key) is not None:
            out[key] = p[key]
    return out


def phase_total(p: dict[str, Any]) -> int:
    if p.get("peak") is not None:
        return int(p["peak"])
    if p.get("allocated") is not None:
        return int(p["allocated"])
    return sum(int(p.get(c) or 0) for c in ("params", "grads", "optim", "acts"))


def _max(values: Any) -> int | None:
    nums = [int(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return max(nums) if nums else None


def check_follow_dir(run_dir: Path) -> Path:
    """``check_run_dir`` for ``attach``: a run whose ``events.jsonl`` is still empty is accepted.

    A run is attached to while it is written, and the first moments of a run (its parent has made
    the folder and opened the file; the header comes next) are exactly when someone attaches to it:
    the view waits for the header (``FileFollowSource`` says ``starting``) instead of refusing.
    Anything else that is not a run directory is refused with ``check_run_dir``'s messages.
    """
    run_dir = Path(run_dir)
    events = run_dir / EVENTS
    if run_dir.is_dir() and events.is_file() and events.stat().st_size == 0:
        return run_dir
    return check_run_dir(run_dir)


def load_run(run_dir: Path) -> RunData:
    """Read a whole run directory (for ``show``, ``compare`` and replay)."""
    run_dir = check_run_dir(Path(run_dir))
    reader = EventReader(run_dir)
    run = RunData(path=run_dir)
    run.follow(reader)
    if not run.header:
        raise ProfileError(f"{run_dir}: the run has recorded nothing readable yet")
    run.warnings = list(reader.warnings)
    return run
