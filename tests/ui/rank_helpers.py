"""Multi-rank fixtures for the rank selector's tests.

- ``TINY_DDP``: a real ``tiny/blip2-opt`` run with ``train.devices=2``, ``train.strategy=ddp`` on a CPU
  (gloo, 4 steps), recorded by ``blipmon run`` and copied here. Its ranks hold identical tensors, as
  DDP replicas do, so their phase totals agree: the "all ranks" view must say so.
- ``ddp_gpu_events``: a deterministic CUDA-shaped two-rank run built from ``gpu_events`` where rank 0
  holds more than rank 1 (activations and "other"), so a spread across ranks has something to show.

(A module of its own rather than conftest.py, so test modules can import it by a unique name.)
"""

from __future__ import annotations

import copy
from typing import Any

from ui_helpers import DATA, GIB, MIB, gpu_events

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
