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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AllocatorReading:
    """Sums over the devices read, and each device's own figures under ``"cuda:<index>"``.

    ``peak`` is the sum of each device's own peak over the interval: on a model split over GPUs the devices
    need not peak at the same moment, so it bounds the simultaneous total from above (each GPU's own peak is
    kept in ``per_device``, which is what decides whether that GPU runs out).
    """

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
    """Sorted CUDA indices holding the model's parameters or buffers, or running its offloaded parts.

    Three sources, because a dispatched model says it in three places: ``hf_device_map`` (modules that
    ``from_pretrained`` split over GPUs), the tensors themselves, and the execution devices of accelerate's
    hooks (a module offloaded to the CPU sits on the meta device, yet its weights are brought to, and its
    activations live on, the hook's GPU). Falls back to ``[default]`` when nothing of the model is on a GPU
    but the run still uses one (a CPU-first load before its move), and to ``[]`` when there is nothing to read.
    """
    found: set[int] = set()
    dm = getattr(model, "hf_device_map", None)
    if isinstance(dm, dict):
        for where in dm.values():
            idx = cuda_index(where)
            if idx is not None:
                found.add(idx)
    try:
        tensors: Iterable[Any] = list(model.parameters()) + list(model.buffers())
        modules: Iterable[Any] = list(model.modules())
    except Exception:  # not an nn.Module
        tensors, modules = [], []
    for t in tensors:
        dev = getattr(t, "device", None)
        if dev is not None and dev.type == "cuda":
            found.add(dev.index if dev.index is not None else 0)
    for m in modules:
        hook = getattr(m, "_hf_hook", None)
        if hook is None:
            continue
        for h in getattr(hook, "hooks", None) or [hook]:  # accelerate's SequentialHook holds several
            idx = cuda_index(getattr(h, "execution_device", None))
            if idx is not None:
                found.add(idx)
    if not found and default is not None:
        found.add(default)
    return sorted(found)


def cuda_index(where: Any) -> int | None:
    """The CUDA index a device-map value, device string or ``torch.device`` names; None for anything else."""
    """The CUDA index a device-map value or a hook's execution device names (None for cpu, disk, meta)."""
    if where is None or isinstance(where, bool):
        return None
    if isinstance(where, int):
        return where
    dev_type = getattr(where, "type", None)
    if dev_type is not None:  # a torch.device
        return (where.index or 0) if dev_type == "cuda" else None
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


def reset_peaks(devices: Sequence[int], *, reset: Callable[[int], None] | None = None) -> None:
    """Start a new peak interval on every device, so the next reading's peak covers exactly it.

    ``reset`` replaces ``torch.cuda.reset_peak_memory_stats`` in tests (several GPUs cannot exist on the CPU).
    """
    if reset is None:
        import torch

        reset = torch.cuda.reset_peak_memory_stats
    for dev in devices:
        reset(dev)
