"""The CUDA caching allocator's figures for every GPU a model occupies, read once per boundary.

A model split by ``device_map`` lives on several GPUs; reading one device's ``memory_allocated`` and
subtracting the parameters of all of them gives a negative "other". So every allocator figure blipmon
records (allocated, reserved, peak, and their resets) is summed over the model's GPUs, and the per-GPU
figures are kept beside the sums.

``torch.cuda.memory_allocated``, ``max_memory_allocated`` and ``memory_reserved`` each rebuild the whole
``memory_stats`` dict (about 120 keys); one ``memory_stats(dev)`` per device per boundary is a third of
the cost. Nothing here synchronizes the device: the allocator's counters are host-side.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AllocatorReading:
    """Sums over the devices read, and each device's own figures under ``"cuda:<index>"``."""

    allocated: int
    reserved: int
    peak: int
    per_device: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_record(self) -> dict[str, Any]:
        """The fields a phase/oom record carries; ``devices`` only when more than one GPU is involved."""
        rec: dict[str, Any] = {"allocated": self.allocated, "reserved": self.reserved, "peak": self.peak}
        if len(self.per_device) > 1:
            rec["devices"] = {k: dict(v) for k, v in self.per_device.items()}
        return rec


def model_cuda_devices(model: Any, default: int | None = None) -> list[int]:
    """Sorted CUDA indices holding the model's parameters or buffers (``hf_device_map`` included).

    Falls back to ``[default]`` when nothing of the model is on a GPU but the run still uses one (a
    CPU-first load before its move), and to ``[]`` when there is nothing to read.
    """
    found: set[int] = set()
    dm = getattr(model, "hf_device_map", None)
    if isinstance(dm, dict):
        for where in dm.values():
            idx = _cuda_index(where)
            if idx is not None:
                found.add(idx)
    try:
        tensors: Iterable[Any] = list(model.parameters()) + list(model.buffers())
    except Exception:  # not an nn.Module
        tensors = []
    for t in tensors:
        dev = getattr(t, "device", None)
        if dev is not None and dev.type == "cuda":
            found.add(dev.index if dev.index is not None else 0)
    if not found and default is not None:
        found.add(default)
    return sorted(found)


def _cuda_index(where: Any) -> int | None:
    if isinstance(where, int) and not isinstance(where, bool):
        return where
    s = str(where)
    if s == "cuda":
        return 0
    if s.startswith("cuda:") and s[5:].isdigit():
        return int(s[5:])
    return None


def read(devices: Sequence[int], *, stats: Any = None) -> AllocatorReading:
    """One ``memory_stats`` call per device. ``stats`` replaces ``torch.cuda.memory_stats`` in tests."""
    if stats is None:
        import torch

        stats = torch.cuda.memory_stats
    per: dict[str, dict[str, int]] = {}
    for dev in devices:
        s = stats(dev)
        per[f"cuda:{dev}"] = {
            "allocated": int(s.get("allocated_bytes.all.current", 0)),
            "reserved": int(s.get("reserved_bytes.all.current", 0)),
            "peak": int(s.get("allocated_bytes.all.peak", 0)),
        }
    return AllocatorReading(
        allocated=sum(v["allocated"] for v in per.values()),
        reserved=sum(v["reserved"] for v in per.values()),
        peak=sum(v["peak"] for v in per.values()),
        per_device=per,
    )


def reset_peaks(devices: Sequence[int]) -> None:
    """Start a new peak interval on every device, so the next reading's peak covers exactly it."""
    import torch

    for dev in devices:
        torch.cuda.reset_peak_memory_stats(dev)
