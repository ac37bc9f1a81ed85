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

from blipmon.core.profile import FORMAT_VERSION, EventReader, ProfileError, check_run_dir

PHASES = ("before_fwd", "after_fwd", "after_bwd", "after_opt_step")
CATEGORIES = ("params", "grads", "optim", "acts", "other")
STATUSES = ("running", "ok", "oom", "error", "stopped", "killed")
_STOP_SIGNALS = {"SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"}


@dataclass
class Samples:
    """The timeline, column by column, so charts can slice it without building objects per point."""

    t: list[float] = field(default_factory=list)
    host_rss: list[int] = field(default_factory=list)
    allocated: list[int | None] = field(default_factory=list)
    reserved: list[int | None] = field(default_factory=list)
    device_used: list[int | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.t)

    def append(self, ev: dict[str, Any]) -> None:
        self.t.append(float(ev.get("t") or 0.0))
        self.host_rss.append(_int(ev.get("rss")) or 0)
        self.allocated.append(_int(ev.get("alloc")))
        self.reserved.append(_int(ev.get("res")))
        self.device_used.append(_int(ev.get("dev")))


def _int(v: Any) -> int | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return int(v)
    return None


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
            if ev.get("phase") in PHASES:
                self.phases.append(ev)
        elif kind == "step":
            self.steps.append(ev)
        elif kind == "header":
            self.header = ev
        elif kind == "config":
            cfg = ev.get("config")
            if isinstance(cfg, dict):
                self.config = cfg
        elif kind == "environment":
            self.environment = ev
        elif kind == "plan":
            self.plan = ev
        elif kind == "load":
            self.load = ev
        elif kind == "generate":
            self.generate.append(ev)
        elif kind == "note":
            self.notes.append(str(ev.get("message", "")))
        elif kind == "oom":
            self.oom = ev
        elif kind == "error":
            self.error = ev
        elif kind == "end":
            self.end = ev
        elif kind == "exit":
            self.exit = ev
        elif kind == "prediction":
            self.prediction = ev
        # Unknown kinds come from newer minor writers: ignored, never an error.

    def extend(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            self.apply(ev)

    # -- derived ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.header.get("name") or self.config.get("name") or (self.path.name if self.path else "run"))

    @property
    def finished(self) -> bool:
        return self.exit is not None or self.end is not None or self.status != "running"

    @property
    def status(self) -> str:
        if self.exit is not None:
            sig = self.exit.get("signal")
            if sig == "SIGKILL":
                return "killed"
            if sig in _STOP_SIGNALS:
                return "stopped"
            if self.end is not None and self.end.get("status") in STATUSES:
                return str(self.end["status"])
            return {0: "ok", 3: "oom", 4: "stopped"}.get(self.exit.get("code"), "error")  # type: ignore[arg-type]
        if self.end is not None and self.end.get("status") in STATUSES:
            return str(self.end["status"])
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

    def peaks(self) -> dict[str, int | None]:
        alloc = [p.get("peak") or p.get("allocated") for p in self.phases] + list(self.samples.allocated)
        res = [p.get("reserved") for p in self.phases] + list(self.samples.reserved)
        rss = [p.get("host_rss") for p in self.phases] + list(self.samples.host_rss)
        gen = self.generate
        alloc += [g.get("peak") for g in gen]
        rss += [g.get("host_rss") for g in gen]
        if self.load:
            alloc.append(self.load.get("peak"))
            rss.append(self.load.get("host_rss"))
        return {
            "allocated": _max(alloc),
            "reserved": _max(res),
            "device_used": _max(self.samples.device_used),
            "host_rss": _max(rss) or 0,
        }

    def peak_phase(self) -> dict[str, Any] | None:
        """The phase record with the highest memory: allocator peak on CUDA, category total on CPU."""
        if not self.phases:
            return None
        return max(self.phases, key=phase_total)

    def summary(self) -> dict[str, Any]:
        """The fixed JSON run summary of DESIGN.md."""
        env = self.environment
        return {
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
            },
            "exit": {"code": self.exit.get("code"), "signal": self.exit.get("signal")}
            if self.exit
            else {"code": None, "signal": None},
        }


_PHASE_KEYS = ("step", "micro_step", "rank", "phase", "t", "params", "grads", "optim", "acts", "other",
               "allocated", "peak", "reserved", "host_rss")  # fmt: skip


def _phase_out(p: dict[str, Any]) -> dict[str, Any]:
    out = {k: p.get(k) for k in _PHASE_KEYS}
    out["rank"] = out["rank"] or 0
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


def load_run(run_dir: Path) -> RunData:
    """Read a whole run directory (for ``show``, ``compare`` and replay)."""
    run_dir = check_run_dir(Path(run_dir))
    reader = EventReader(run_dir)
    run = RunData(path=run_dir)
    run.extend(reader.poll())
    if not run.header:
        raise ProfileError(f"{run_dir}: the run has recorded nothing readable yet")
    run.warnings = list(reader.warnings)
    return run
