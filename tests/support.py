"""Helpers the test modules import by name (``from support import ...``).

They live here rather than in conftest.py: ``tests/ui`` has a conftest.py of its own, and a module
imported as ``conftest`` is whichever one Python found first, so a name imported from it depends on
which tests run together.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# How long to wait for a child to reach a point before declaring it stuck. Only a guard against
# hanging: no test asserts anything about how fast something happened.
PATIENCE_S = 240.0


def subprocess_env(cache: Path, *, gpu: bool = False, **extra: str) -> dict[str, str]:
    """The environment of a ``blipmon`` subprocess: this session's cache, offline, one thread.

    Without ``gpu`` the GPU is hidden, so a CPU test means the same on a machine that has one.
    One intra-op thread keeps several concurrent children from oversubscribing a small CI box.
    """
    env = dict(os.environ)
    env.update(
        BLIPMON_CACHE=str(cache),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        BLIPMON_PREDICT="0",  # the estimate has tests of its own; runs here measure, they don't predict
    )
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


def read_events(path: Path) -> list[dict[str, Any]]:
    """The complete, parseable records of an events file as it is right now (for waiting on a run)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


# Two configurations that fail in different ways for sweep tests: a model folder that cannot load (error)
# and a GPU-only device map (refused before it starts on a machine without one).
BROKEN = """
name = "mini/broken"
[model]
id = "{path}"
device_map = "cpu"
[job]
kind = "load"
"""

NEEDS_GPU = """
name = "mini/gpu-only"
[model]
id = "tiny/blip2-opt"
device_map = "cuda"
[job]
kind = "load"
"""
