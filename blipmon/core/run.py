"""A run as data: events folded into one object, and the fixed JSON summary (docs/profile-format.md).

``RunData`` is what every consumer reads — ``show``, ``compare``, the dashboard whether live,
attached or replayed — so they can never disagree about what a run says. It is built by feeding
events in order (``apply``), which is what lets the dashboard follow a file as it grows.

Why one module over ~500 lines: the fold (``RunData.apply``), the fixed summary and the run index are one
contract (the index must summarise exactly what the fold would); split, they would drift apart.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blipmon.core.errors import ProfileError
from blipmon.core.layout import EVENTS
from blipmon.core.modules import ModuleRecords
from blipmon.core.outcomes import RUN_STATUSES, status_of_exit_code
from blipmon.core.profile import FORMAT_VERSION, EventReader, check_run_dir
from blipmon.core.sample_lines import SampleBatch
from blipmon.core.samples import Samples

PHASES = ("before_fwd", "after_fwd", "after_bwd", "after_opt_step")
CATEGORIES = ("params", "grads", "optim", "acts", "other")
_STOP_SIGNALS = {"SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"}


def _int(v: Any) -> int | None:
    """A whole number from a record, or None: a bool, a string or a non-finite float (``Infinity``, which
    Python's JSON reader accepts) is no count of bytes."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return int(v) if math.isfinite(v) else None
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
                              "requested_source": str, "device": str, "device_free": int, "device_limit": int,
                              # where in the model (issue 12): the module running, and in which pass
                              "module": str, "module_pass": str}  # fmt: skip


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


@dataclass(frozen=True)
class HeadlinePeak:
    """A run's headline peak: ``what`` it measures (``allocated`` or ``host RSS``) and its ``bytes``."""

    what: str
    bytes: int | None

    @property
    def label(self) -> str:
        """``peak allocated`` or ``peak host RSS``: what the figure is, in the words lists use."""
        return f"peak {self.what}"


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
    modules: ModuleRecords = field(default_factory=ModuleRecords)  # per-module memory (core/modules.py)
    last_t: float = 0.0
    warnings: list[str] = field(default_factory=list)
    # Read through a run index (``load_run(summary=True)``): the samples' maxima and count stand in for the
    # samples before the index, and ``phases`` holds only the records a summary reads (``index_fields``).
    indexed: dict[str, Any] | None = None

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
        elif kind in ("module_tree", "modules"):
            self.modules.apply(ev)
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
        if self.end is not None and self.end.get("status") in RUN_STATUSES:
            return str(self.end["status"])
        if self.exit is not None:
            sig = self.exit.get("signal")
            if sig == "SIGKILL":
                return "killed"
            if sig in _STOP_SIGNALS:
                return "stopped"
            return status_of_exit_code(self.exit.get("code"))
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
        if self.indexed is not None:
            base = self.indexed["sample_maxima"]
            sm = {k: _max([sm[k], base.get(k)]) for k in sm}
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

    def headline_peak(self) -> HeadlinePeak:
        """The one peak a list shows for a run: the allocator's where there is one, else host RSS.

        The launcher's list of saved runs, the sweep's queue and its progress lines all show this
        figure, so they can never name different peaks for the same run.
        """
        p = self.peaks()
        if p["allocated"] is not None:
            return HeadlinePeak("allocated", p["allocated"])
        return HeadlinePeak("host RSS", p["host_rss"])

    def peak_phase(self) -> dict[str, Any] | None:
        """The phase record with the highest memory (allocator peak on CUDA, category total on CPU) among those
        counted in full (``peak_record``)."""
        return peak_record(self.phases)

    def summary(self) -> dict[str, Any]:
        """The fixed JSON run summary (docs/profile-format.md, "The JSON summary").

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
                "module": self.oom.get("module"),
                # Extensions, present where torch's out-of-memory observer saw the failure (CUDA).
                **{
                    k: self.oom[k]
                    for k in ("module_pass", "device", "device_free", "device_limit")
                    if self.oom.get(k) is not None
                },
            },
            "exit": {"code": self.exit.get("code"), "signal": self.exit.get("signal")}
            if self.exit
            else {"code": None, "signal": None},
        }
        if self.modules:
            out["modules"] = self.modules.summary()
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


def counted(p: Mapping[str, Any]) -> bool:
    """Whether a phase record was counted in full: its activations (and grads, optimizer state) were measured.

    The probe counts them at steps 0 and 1 and every ``runtime.module_every``-th step (docs/modules.md, "What it
    costs"); the others carry the allocator's figures, host RSS and params, with the rest null."""
    return p.get("acts") is not None


def peak_record(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The first record with the largest ``phase_total`` among those counted in full (all, where none is).

    Every view shows the peak phase's categories, which only counted records have; the steps between them
    repeat the counted ones (the same batch shapes), and the run's true maxima are in ``peaks()`` whatever
    step they came from."""
    full = [p for p in records if counted(p)]
    return max(full or records, key=phase_total) if records else None


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


def load_run(run_dir: Path, *, summary: bool = False) -> RunData:
    """Read a whole run directory (for ``show``, ``compare`` and replay).

    ``summary=True`` (``show``'s text, ``compare``): through the run's index where it has one, so a
    million-sample profile is summarised without parsing its samples; the result's ``phases`` are only
    those a summary reads (``index_fields``) and its samples only those after the index. Without a usable
    index (an older profile, one cut before it, records after it that change the summary) the whole file
    is read, exactly as before.
    """
    run_dir = check_run_dir(Path(run_dir))
    if summary:
        fast = _load_indexed(run_dir)
        if fast is not None:
            return fast
    reader = EventReader(run_dir)
    run = RunData(path=run_dir)
    run.follow(reader)
    if not run.header:
        raise ProfileError(f"{run_dir}: the run has recorded nothing readable yet")
    run.warnings = list(reader.warnings)
    return run


# -- the run index (docs/profile-format.md, "index") -------------------------------------------------------
# Records that, after an index, would change what the index summarised: their presence means the index is
# not used (samples are fine: their maxima merge).
_INDEX_BREAKERS = frozenset({"phase", "step", "rank_step", "generate"})
_SAMPLE_KEYS = ("host_rss", "allocated", "reserved", "device_used")


def kept_phases(run: RunData) -> list[int]:
    """Indices (in order) of the phase records every summary figure reads; the others change none of them.

    ``show``'s phase table (rank 0's steps 0 and 1, the peak step's phases), the peak phase (the first
    record with the largest total) and each rank's, the phase maxima of ``peaks()``, the last offload
    phase, the last four records (``compare``'s offload rows) and rank 0's phases of every step the
    saved prediction names (``predicted_vs_measured``). Each chosen record is the *first* of its kind
    where ``max`` keeps the first, so the same record wins among the kept ones.
    """
    phases = run.phases
    keep: set[int] = set(range(max(0, len(phases) - 4), len(phases)))
    steps = {0, 1}
    pred = run.prediction.get("phases") if isinstance(run.prediction, dict) else None
    if isinstance(pred, list):
        steps |= {p.get("step") for p in pred if isinstance(p, dict)}
    best: dict[Any, tuple[int, int]] = {}  # key -> (value, index) of its first maximum

    def consider(key: Any, value: Any, i: int) -> None:
        is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
        if is_num and (key not in best or value > best[key][0]):
            best[key] = (value, i)

    last_offload = None
    for i, p in enumerate(phases):
        rank = p.get("rank") or 0
        if rank == 0 and p.get("step") in steps:
            keep.add(i)
        total = phase_total(p)
        consider("total", total, i)
        consider(("rank", int(rank)), total, i)
        if counted(p):  # ``peak_record``'s choice
            consider("counted", total, i)
            consider(("counted rank", int(rank)), total, i)
        consider("allocated", p.get("peak") or p.get("allocated"), i)
        consider("reserved", p.get("reserved"), i)
        consider("host_rss", p.get("host_rss"), i)
        if "optim_host" in p:
            last_offload = i
    keep |= {i for _, i in best.values()}
    if last_offload is not None:
        keep.add(last_offload)
    peak_key = "counted" if "counted" in best else "total"
    if peak_key in best:
        peak = phases[best[peak_key][1]]
        keep |= {
            i for i, p in enumerate(phases) if p.get("step") == peak.get("step") and p.get("rank") == peak.get("rank")
        }
    return sorted(keep)


def index_fields(run_dir: Path) -> dict[str, Any]:
    """The fields of an ``index`` record for a run as its file is now: what ``show`` and ``compare`` need.

    Written by the child when its job is over (``runner/child.py``), before ``end``. ``upto``/``lines`` say
    how much of the file it covers; whatever follows is read as records when the index is used.
    """
    reader = EventReader(Path(run_dir))
    run = RunData(path=Path(run_dir))
    run.follow(reader)
    maxima = run.samples.maxima()
    return {
        "upto": reader.offset,
        "lines": reader.lines_read,
        "n_samples": len(run.samples),
        "n_phases": len(run.phases),
        "sample_maxima": maxima,
        "last_t": run.last_t,
        "header": run.header,
        "config": run.config,
        "environment": run.environment,
        "plan": run.plan,
        "load": run.load,
        "prediction": run.prediction,
        "phases": [run.phases[i] for i in kept_phases(run)],
        "steps": run.steps,
        "rank_steps": run.rank_steps,
        "generate": run.generate,
        "notes": run.notes,
        "oom": run.oom,
        "error": run.error,
        "end": run.end,
        "exit": run.exit,
        "warnings": list(reader.warnings),
    }


def _dict(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise TypeError("not an object")
    return v


def _opt_dict(v: Any) -> dict[str, Any] | None:
    return None if v is None else _dict(v)


def _dicts(v: Any) -> list[dict[str, Any]]:
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise TypeError("not a list of objects")
    return v


def _load_indexed(run_dir: Path) -> RunData | None:
    """``load_run(summary=True)``'s fast path, or None where the index cannot be used (then the file is read)."""
    from blipmon.core.profile import find_index

    found = find_index(run_dir)
    if found is None:
        return None
    rec, at = found
    try:
        upto, lines = rec["upto"], rec["lines"]
        if not (isinstance(upto, int) and isinstance(lines, int) and 0 < upto <= at and lines >= 0):
            return None
        maxima = _dict(rec["sample_maxima"])
        run = RunData(
            path=run_dir,
            header=_dict(rec["header"]),
            config=_dict(rec["config"]),
            environment=_dict(rec["environment"]),
            plan=_dict(rec["plan"]),
            load=_opt_dict(rec["load"]),
            prediction=_opt_dict(rec["prediction"]),
            phases=_dicts(rec["phases"]),
            steps=_dicts(rec["steps"]),
            rank_steps=_dicts(rec["rank_steps"]),
            generate=_dicts(rec["generate"]),
            notes=[str(n) for n in rec["notes"]],
            oom=_opt_dict(rec["oom"]),
            error=_opt_dict(rec["error"]),
            end=_opt_dict(rec["end"]),
            exit=_opt_dict(rec["exit"]),
            last_t=float(rec["last_t"]),
            warnings=[str(w) for w in rec["warnings"]],
            indexed={"sample_maxima": {k: _int(maxima.get(k)) for k in _SAMPLE_KEYS}},
        )
    except (KeyError, TypeError, ValueError):
        return None
    if not run.header:
        return None
    reader = EventReader(run_dir, start=upto, start_line=lines)
    events, batch = reader.poll_batch()
    if any(ev.get("type") in _INDEX_BREAKERS for ev in events):
        return None
    run.extend(events)
    run.extend_samples(batch)
    run.warnings += reader.warnings
    return run
