"""The ``environment`` record: what a run ran on. Built here once for every writer.

A run (``runner/child.py``) and the callbacks (``integrations/_recorder.py``) read it from inside the
training process, with torch at hand (``environment``); ``blipmon watch`` from outside the command,
with NVML and without importing torch (``watch_environment``). Both share ``host_facts``, so the
fixed fields of the JSON summary (docs/profile-format.md) are the same facts, spelled the same way,
whoever wrote the run. Never the environment variables themselves, except the allocator's two.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import psutil


def host_facts(torch_version: str, transformers_version: str, world_size: int) -> dict[str, Any]:
    """The fields every ``environment`` record has, whoever writes it: the machine and the versions."""
    import blipmon

    return {
        "host_total_bytes": psutil.virtual_memory().total,
        "torch": torch_version,
        "transformers": transformers_version,
        "world_size": world_size,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "blipmon": blipmon.__version__,
        "cpu_count": os.cpu_count(),
    }


def _installed(dist: str) -> str:
    """An installed package's version without importing it (``watch`` never imports torch); "" if absent."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def environment(cuda: bool, weights: str | None = None, device: int = 0) -> dict[str, Any]:
    """The child's ``environment`` record (and the callbacks'): an allow-list of facts, read inside the process.

    The two allocator variables are the one exception to "never the environment variables themselves"
    (``allocator_settings``): they are configuration (``runtime.alloc_conf``), and what the allocator
    actually ran with decides fragmentation. ``device`` is the process's own GPU (torch index), whose
    name and size are recorded.
    """
    import torch
    import transformers

    env: dict[str, Any] = {
        "device": "cuda" if cuda else "cpu",
        "gpu_name": None,
        "gpu_total_bytes": None,
        **host_facts(torch.__version__, transformers.__version__, int(os.environ.get("WORLD_SIZE", "1"))),
        "allocator_settings": allocator_settings(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        env["gpu_name"] = props.name
        env["gpu_total_bytes"] = int(props.total_memory)
        env["cuda"] = torch.version.cuda
    else:
        env["gpu_reason"] = "no NVIDIA GPU visible to torch (CPU build or no driver)"
    return env


ALLOC_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def allocator_settings() -> dict[str, str | None]:
    """The allocator settings this process runs with: both variables as it saw them, and torch's own view.

    Newer torch reads ``PYTORCH_ALLOC_CONF`` and deprecates ``PYTORCH_CUDA_ALLOC_CONF``; older torch
    reads only the latter. ``torch`` is the settings string torch parsed (``None`` where this torch
    cannot say), so a run records what was in effect, not only what was asked for.
    """
    import torch

    out: dict[str, str | None] = {name: os.environ.get(name) for name in ALLOC_ENV}
    try:
        out["torch"] = str(torch._C._accelerator_getAllocatorSettings())
    except Exception:  # an older torch, or a build without it
        out["torch"] = None
    return out


def gpu_fields(gpus: Any, indices: Iterable[int]) -> dict[str, Any]:
    """``gpu_name``/``gpu_total_bytes`` for the devices ``indices``: one card's, or ``N x name`` and their sum.

    ``show`` sets device-used against ``gpu_total_bytes``, so it must be the capacity of exactly the GPUs
    whose used memory is summed, never one card's capacity under several cards' use.
    """
    idx = sorted(indices)
    if not idx:
        return {"gpu_name": None, "gpu_total_bytes": None}
    names = [gpus.names[i] for i in idx]
    totals = [gpus.totals[i] for i in idx]
    name = names[0] if len(set(names)) == 1 else " + ".join(names)
    return {
        "gpu_name": name if len(idx) == 1 else f"{len(idx)} x {name}" if len(set(names)) == 1 else name,
        "gpu_total_bytes": sum(t for t in totals if t is not None) if all(t is not None for t in totals) else None,
    }


def watch_environment(gpus: Any, command_gpus: Iterable[int] = ()) -> dict[str, Any]:
    """``blipmon watch``'s ``environment`` record: the fixed fields, from outside the command: no torch import, no environment variable recorded.

    ``gpu_name``/``gpu_total_bytes`` describe the command's GPUs (``command_gpus``, indices into
    ``gpus.units``) once they are known; before, the only GPU when there is one, else none (a host with
    several GPUs: which ones the command uses is not known yet). ``gpus`` lists every device with its capacity.
    """
    chosen = sorted(command_gpus) or ([0] if len(gpus.units) == 1 else [])
    env: dict[str, Any] = {
        "device": "cuda" if gpus else "cpu",
        **gpu_fields(gpus, chosen),
        **host_facts(_installed("torch"), _installed("transformers"), 1),
        "gpus": [
            {
                "index": u.nvml_index,
                "label": u.label,
                "name": u.name,
                "total_bytes": u.total,
                "uuid": u.uuid,
                "mig": u.mig,
            }
            for u in gpus.units
        ],
    }
    if gpus:
        env["command_gpus"] = [gpus.units[i].label for i in chosen]
    else:
        env["gpu_reason"] = gpus.reason or "no NVIDIA GPU"
    return env
