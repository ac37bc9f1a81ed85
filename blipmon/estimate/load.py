"""Load and generate jobs: what loading a model (and generating with it) puts on each device and on the host."""

from __future__ import annotations

import re
from typing import Any

from blipmon.core.config import ConfigError

_GPU_RE = re.compile(r"(?:cuda:)?(\d+)|cuda")


def gpu_index(device: Any) -> int | None:
    """The GPU index a device-map value names (``0``, ``"cuda:1"``, ``"cuda"``), or None for "cpu"/"disk"."""
    if isinstance(device, bool):
        return None
    if isinstance(device, int):
        return device
    m = _GPU_RE.fullmatch(str(device))
    if m is None:
        return None
    return int(m.group(1)) if m.group(1) else 0


def judge_load(cfg: dict[str, Any], *, gpu_memory: int | None, host_memory: int | None, t0: float) -> Any:
    raise ConfigError(
        f"job.kind = {cfg['job']['kind']!r}: estimates cover training steps; "
        "`blipmon models` lists parameter bytes per dtype for loading"
    )
