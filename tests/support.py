"""Helpers the test modules import by name (``from support import ...``).

They live here rather than in conftest.py: ``tests/ui`` has a conftest.py of its own, and a module
imported as ``conftest`` is whichever one Python found first, so a name imported from it depends on
which tests run together.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
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


# -- independent expected values ------------------------------------------------------------------
# What a run should record, computed from torch's own objects in the test process: never from blipmon's rules.


def unique_storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view or a tied weight once), as torch allocated them."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor in a real optimizer's ``state`` (each storage once)."""
    import torch

    return unique_storage_bytes(
        t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)
    )


def adamw_step_counter_bytes() -> int:
    """The bytes of the ``step`` counter torch's AdamW keeps per parameter tensor, read after a real step."""
    import torch

    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p])
    p.grad = torch.zeros(3)
    opt.step()
    return int(opt.state[p]["step"].untyped_storage().nbytes())


def adamw_state_after_one_step(params: list[Any]) -> int:
    """Bytes of ``torch.optim.AdamW``'s state after one real step over ``params`` (their gradients are left None)."""
    import torch

    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in params:
        p.grad = None
    return optimizer_state_bytes(opt)


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
