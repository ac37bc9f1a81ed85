"""Recorded profiles for tests: the real runs in tests/data, synthetic GPU runs, a frozen clock, a sweep's file.

- ``DATA / "tiny-cpu"``: a real ``tiny/blip2-opt`` run recorded on a CPU; ``TINY_DDP``: a real two-rank DDP run
  of it (gloo, 4 steps), whose ranks hold identical tensors, as DDP replicas do.
- ``gpu_events``: a deterministic CUDA-shaped run (allocator figures, NVML device used, an H100's capacity) that
  runs out of memory at step 4; ``ddp_gpu_events``: two ranks of it where rank 0 holds more than rank 1.
- ``FrozenClock``: a clock for sources that only moves when told.

Used by the data tests (tests/unit) and the dashboard's (tests/ui) alike; the fixtures built from them are in
tests/conftest.py. (A module of its own rather than conftest.py, so test modules can import it by name.)
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from blipmon.core import presets
from blipmon.core.config import validate

DATA = Path(__file__).parent / "data"
GIB = 1024**3
MIB = 1024**2


class FrozenClock:
    """A clock for sources: returns ``now`` until ``advance`` moves it."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def gpu_events(
    steps: int = 6,
    oom_step: int | None = 4,
    samples_per_step: int = 20,
    *,
    finished: bool = True,
    started: float = 1_000.0,
) -> list[dict[str, Any]]:
    """A CUDA run's events: load, steps of four phases with allocator figures, samples, an OOM."""
    cfg = validate(presets.get("h100/reduced-batch"))
    cfg["train"]["max_steps"] = steps
    ev: list[dict[str, Any]] = [
        {"type": "header", "t": 0.0, "format_version": 1, "name": "h100/reduced-batch", "pid": 1,
         "hostname": "fixture-host", "started": started, "source": "blipmon run"},
        {"type": "config", "t": 0.001, "config": cfg},
        {"type": "environment", "t": 1.0, "device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3",
         "gpu_total_bytes": 80 * GIB, "host_total_bytes": 128 * GIB, "torch": "2.13.0", "transformers": "5.23.0",
         "world_size": 1},
        {"type": "load", "t": 3.0, "seconds": 2.0, "params_bytes": 15 * GIB, "placement": {"cuda:0": 15 * GIB},
         "weights": "random", "peak": 15 * GIB + 200 * MIB, "host_rss": 3 * GIB},
        {"type": "plan", "t": 3.1, "total_steps": steps, "steps_per_epoch": steps, "micro_per_step": 1,
         "batch_size": 16, "trainable_params": 3_800_000_000, "total_params": 3_800_000_000},
    ]  # fmt: skip
    t = 3.2
    params, grads, optim = 15 * GIB, 15 * GIB, 30 * GIB
    last_step = steps if oom_step is None else oom_step + 1
    for step in range(last_step):
        acts = (8 + step % 2) * GIB
        has_optim = step > 0
        for k, (phase, cats) in enumerate(
            [
                ("before_fwd", (params, 0, optim if has_optim else 0, 0)),
                ("after_fwd", (params, 0, optim if has_optim else 0, acts)),
                ("after_bwd", (params, grads, optim if has_optim else 0, 0)),
                ("after_opt_step", (params, grads, optim, 0)),
            ]
        ):
            if step == oom_step and k == 1:
                break
            for i in range(samples_per_step // 4):
                frac = i / (samples_per_step // 4)
                alloc = sum(cats) + int(2 * GIB * math.sin(math.pi * frac))
                ev.append({"type": "sample", "t": round(t, 6), "rss": 3 * GIB + step * MIB, "alloc": alloc,
                           "res": alloc + 2 * GIB, "dev": alloc + 3 * GIB, "proc_gpu": alloc + 3 * GIB})  # fmt: skip
                t += 0.1
            total = sum(cats)
            other = 512 * MIB
            ev.append({"type": "phase", "t": round(t, 6), "step": step, "micro_step": 0, "rank": 0, "phase": phase,
                       "params": cats[0], "grads": cats[1], "optim": cats[2], "acts": cats[3], "other": other,
                       "allocated": total + other, "peak": total + other + 2 * GIB, "reserved": total + 4 * GIB,
                       "host_rss": 3 * GIB + step * MIB})  # fmt: skip
        else:
            ev.append({"type": "step", "t": round(t, 6), "step": step, "seconds": 2.0 + 0.1 * (step % 3),
                       "loss": 7.0 - 0.3 * step, "samples_per_s": 8.0, "micro_steps": 1})  # fmt: skip
            continue
        ev.append({"type": "oom", "t": round(t, 6), "step": step, "micro_step": 0, "phase": "after_fwd",
                   "requested_bytes": 20 * GIB, "message": "CUDA out of memory. Tried to allocate 20.00 GiB",
                   "allocated": 78 * GIB, "reserved": 79 * GIB, "peak": 79 * GIB})  # fmt: skip
        break
    if finished:
        status, code = ("oom", 3) if oom_step is not None else ("ok", 0)
        ev.append({"type": "end", "t": round(t + 0.1, 6), "status": status, "code": code})
        ev.append({"type": "exit", "t": None, "code": code, "signal": None})
    return ev


def write_run(path: Path, events: list[dict[str, Any]], log: str = "[blipmon] loading ...\n") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "events.jsonl", "w", encoding="utf-8") as fh:
        for e in events:
            fh.write(json.dumps(e, separators=(",", ":")) + "\n")
    (path / "child.log").write_text(log, encoding="utf-8")
    cfg = next((e["config"] for e in events if e["type"] == "config"), {})
    (path / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return path


def write_doc(d: Path, configs: list[tuple[Any, ...]], *, finished: bool, **extra: Any) -> None:
    """A sweep folder's sweep.json: (name, status, run_dir, seconds, reason) per configuration."""
    doc = {
        "format_version": 1,
        "started": 1000.0,
        "finished": finished,
        "ended": 1100.0 if finished else None,
        "configs": [
            {"name": n, "source": n, "status": s, "exit_code": None, "run_dir": rd, "seconds": sec, "reason": why}
            for n, s, rd, sec, why in configs
        ],
        **extra,
    }
    (d / "sweep.json").write_text(json.dumps(doc), encoding="utf-8")


# -- several ranks ---------------------------------------------------------------------------------
TINY_DDP = DATA / "tiny-ddp"
RANK1_LESS_ACTS = 1 * GIB  # rank 1's activations after forward are this much smaller than rank 0's
RANK1_OTHER = 256 * MIB  # rank 1's "other" (rank 0 has 512 MiB)


def ddp_gpu_events(steps: int = 5, *, finished: bool = True, rank1_steps: int | None = None) -> list[dict[str, Any]]:
    """Two ranks of a CUDA run: every rank-0 phase record followed by rank 1's, slightly smaller.

    ``rank1_steps`` cuts rank 1 short (a rank lagging behind in a live view): it records only its
    first ``rank1_steps`` steps.
    """
    out: list[dict[str, Any]] = []
    for ev in gpu_events(steps=steps, oom_step=None, finished=finished):
        if ev["type"] in ("header", "environment", "plan"):
            ev = {**ev, "world_size": 2}
        out.append(ev)
        if ev["type"] == "phase":
            if rank1_steps is not None and ev["step"] >= rank1_steps:
                continue
            r1 = copy.deepcopy(ev)
            r1["rank"] = 1
            r1["t"] = round(ev["t"] + 0.01, 6)
            if r1["acts"]:
                r1["acts"] -= RANK1_LESS_ACTS
            r1["other"] = RANK1_OTHER
            total = r1["params"] + r1["grads"] + r1["optim"] + r1["acts"] + r1["other"]
            r1["allocated"] = total
            r1["peak"] = total + 2 * GIB
            out.append(r1)
        elif ev["type"] == "step":
            if rank1_steps is not None and ev["step"] >= rank1_steps:
                continue
            out.append({"type": "rank_step", "t": round(ev["t"] + 0.02, 6), "rank": 1, "step": ev["step"],
                        "seconds": ev["seconds"] + 0.5, "loss": ev["loss"] + 0.2, "samples_per_s": 6.0,
                        "micro_steps": 1})  # fmt: skip
    return out
