"""How many steps a training configuration takes, counted the way Lightning counts them.

Shared by the child (to know when to stop), the dashboard (progress and ETA) and the estimator,
so all three agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Schedule:
    micro_per_epoch: int  # batches per epoch (the last one may be short)
    steps_per_epoch: int  # optimizer steps per epoch; a trailing partial accumulation still steps
    total_steps: int  # optimizer steps in the whole run, after max_steps
    accumulate: int


def schedule(cfg: dict[str, Any]) -> Schedule:
    t = cfg["train"]
    # Under DDP each rank sees its share of the samples (a DistributedSampler), as in Lightning.
    world = t.get("devices", 1) * t.get("num_nodes", 1) if t.get("strategy") == "ddp" else 1
    micro = math.ceil(math.ceil(t["num_train_samples"] / world) / t["batch_size"])
    acc = t["accumulate_grad_batches"]
    per_epoch = math.ceil(micro / acc)
    total = per_epoch * t["max_epochs"]
    if t["max_steps"] > 0:
        total = min(total, t["max_steps"])
    return Schedule(micro_per_epoch=micro, steps_per_epoch=per_epoch, total_steps=total, accumulate=acc)
