"""NVML read right: the GPU torch calls ``cuda:i``, each call guarded on its own, host PIDs told apart.

Why this module exists, one pitfall per paragraph:

- **Device order.** NVML numbers GPUs by PCI bus and ignores ``CUDA_VISIBLE_DEVICES``; CUDA numbers
  only the visible ones, fastest first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``. With
  ``CUDA_VISIBLE_DEVICES=3`` torch's ``cuda:0`` is NVML's device 3, so ``nvmlDeviceGetHandleByIndex(0)``
  reads someone else's GPU. The one identity both sides share is the UUID (``get_device_properties(i).uuid``
  in torch, ``nvmlDeviceGetUUID`` in NVML; torch prints it without NVML's ``GPU-``/``MIG-`` prefix), then
  the PCI bus id. ``CUDA_VISIBLE_DEVICES`` itself (indices, UUIDs, MIG UUIDs) is the fallback when torch
  cannot say, and the bare index the last resort; the record says which was used.
- **MIG.** On a GPU in MIG mode a CUDA process runs on one MIG device; the parent's memory figures are the
  whole card's (or refused without privileges). The MIG device's own handle is what to read.
- **Per-call failures.** NVML refuses single queries for ordinary reasons: no permission on a MIG parent,
  ``NOT_SUPPORTED`` for process lists under some virtualisation, a driver/library mismatch. One refusal
  must cost only its own figure, with a note said once, never the host RSS and allocator figures beside it.
- **Host PIDs.** Inside a container (its own PID namespace) NVML lists processes by their host PIDs, which
  never equal ``os.getpid()``; a driver may also withhold a process's memory (``usedGpuMemory`` is
  ``None`` under MIG, WSL and some containers). Both mean "unknown", never 0.

Tests inject a fake ``pynvml`` (``module=``) and torch's side (``identity=``): nothing here needs a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Note = Callable[[str, str], None]
"""``note(key, message)``: the caller writes ``message`` once per ``key`` (the sampler's or watch's notes)."""

Identity = Callable[[int], "tuple[str | None, str | None]"]
"""torch's ``(uuid, pci_bus_id)`` for a CUDA device index; either may be ``None``."""

# The initial PID namespace's inode (PROC_PID_INIT_INO = 0xEFFFFFFC, include/linux/proc_ns.h): any other
# value means this process lives in a PID namespace of its own, where NVML's PIDs are not ours.
_INIT_PID_NS = "pid:[4026531836]"
_MIG_ENABLED = 1  # NVML_DEVICE_MIG_ENABLE


def load_module() -> Any:
    """``pynvml``, initialised. Raises whatever the import or ``nvmlInit`` raises (no driver, no library)."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def torch_device_identity(index: int) -> tuple[str | None, str | None]:
    """torch's UUID and PCI bus id of ``cuda:index``, as CUDA numbers devices under ``CUDA_VISIBLE_DEVICES``.

    The only place blipmon asks torch who a device is, so tests can replace it (torch.cuda cannot run on a
    machine without a GPU). ``get_device_properties`` reads the device's attributes without creating a
    context on it.
    """
    import torch

    props = torch.cuda.get_device_properties(index)
    raw = getattr(props, "uuid", None)
    uuid = str(raw) if raw is not None and str(raw).strip("0-") else None
    bus, dev, dom = (getattr(props, k, None) for k in ("pci_bus_id", "pci_device_id", "pci_domain_id"))
    pci = (
        f"{int(dom or 0):08X}:{int(bus):02X}:{int(dev):02X}.0"
        if isinstance(bus, int) and isinstance(dev, int)
        else None
    )
    return uuid, pci


def normalize_uuid(value: object) -> str:
    """``GPU-ABC…``, ``MIG-abc…`` and torch's bare ``abc…`` as one comparable form."""
    s = (value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)).strip().lower()
    for prefix in ("gpu-", "mig-"):
        if s.startswith(prefix):
            return s[len(prefix) :]
    return s


def in_own_pid_namespace() -> bool | None:
    """True inside a container's PID namespace (NVML then reports host PIDs); None where Linux cannot say."""
    try:
        return os.readlink("/proc/self/ns/pid") != _INIT_PID_NS
    except OSError:
        return None


def parse_visible_devices(value: str | None) -> list[int] | list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it: indices, or ``GPU-``/``MIG-`` UUID prefixes; None when unset.

    Mirrors the CUDA runtime (and torch's ``_parse_visible_devices``): parsing stops at the first entry
    that is not of the list's kind, and a repeated entry makes the list empty (CUDA then sees no device).
    """
    if value is None:
        return None
    entries = [e.strip() for e in value.split(",")]
    if entries and entries[0][:4].upper() in ("GPU-", "MIG-"):
        prefix = entries[0][:4].upper()
        uuids: list[str] = []
        for e in entries:
            if e[:4].upper() != prefix:
                break
            if e in uuids:
                return []
            uuids.append(e)
        return uuids
    indices: list[int] = []
    for e in entries:
        digits = ""
        for ch in e:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        n = int(digits)
        if n in indices:
            return []
        indices.append(n)
    return indices


def describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@dataclass
class NvmlDevice:
    """One NVML device (a GPU, or a MIG device on one) and how it was found."""

    handle: Any
    label: str  # "GPU 3", "GPU 0 MIG 1": how notes and records name it
    nvml_index: int | None
    uuid: str | None
    name: str | None
    total: int | None
    mig: bool
    how: str  # "uuid", "pci bus id", "CUDA_VISIBLE_DEVICES", "index"

    def describe(self) -> dict[str, Any]:
        """The device as a record field: what it is and how blipmon matched it."""
        return {
            "nvml_index": self.nvml_index,
            "uuid": self.uuid,
            "name": self.name,
            "total": self.total,
            "mig": self.mig,
            "matched_by": self.how,
        }


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used: int | None  # None: the driver does not say (MIG, WSL, some containers)


class Nvml:
    """An initialised NVML whose every query is guarded on its own: a failure is one note, never an exception.

    ``module`` replaces ``pynvml`` (tests); without it ``pynvml`` is imported and initialised here, and a
    failure there raises (the caller turns it into its one "NVML unavailable" note).
    """

    def __init__(self, module: Any = None, note: Note | None = None) -> None:
        self.nv = module if module is not None else load_module()
        self._note = note or (lambda _key, _message: None)

    # -- guarded calls ----------------------------------------------------------------------------
    def _call(self, fn: str, *args: Any, what: str, quiet: bool = False) -> tuple[bool, Any]:
        try:
            return True, getattr(self.nv, fn)(*args)
        except Exception as e:  # NVMLError (any code), a missing symbol in an old library: all per call
            if not quiet:
                self._note(f"nvml:{fn}:{what}", f"NVML {fn} failed for {what} ({describe(e)}); that figure is unknown")
            return False, None

    def count(self) -> int:
        ok, n = self._call("nvmlDeviceGetCount", what="the device count")
        return int(n) if ok and isinstance(n, int) else 0

    def uuid(self, handle: Any) -> str | None:
        ok, u = self._call("nvmlDeviceGetUUID", handle, what="a device", quiet=True)
        if not ok or u is None:
            return None
        return u.decode("ascii", "replace") if isinstance(u, bytes) else str(u)

    def name(self, handle: Any) -> str | None:
        ok, n = self._call("nvmlDeviceGetName", handle, what="a device", quiet=True)
        if not ok or n is None:
            return None
        return n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n)

    def memory(self, dev: NvmlDevice) -> tuple[int, int] | None:
        """``(used, total)`` bytes of the device, or None (noted once) when NVML refuses."""
        ok, info = self._call("nvmlDeviceGetMemoryInfo", dev.handle, what=dev.label)
        if not ok:
            return None
        try:
            return int(info.used), int(info.total)
        except (AttributeError, TypeError, ValueError):
            return None

    def _total(self, handle: Any) -> int | None:
        ok, info = self._call("nvmlDeviceGetMemoryInfo", handle, what="a device", quiet=True)
        try:
            return int(info.total) if ok else None
        except (AttributeError, TypeError, ValueError):
            return None

    def processes(self, dev: NvmlDevice, *, graphics: bool = False) -> list[GpuProcess] | None:
        """Processes with a context on the device (compute, and graphics if asked), or None when NVML refuses.

        The compute list decides: if NVML refuses it the answer is None (unknown). A refused graphics list is
        noted and left out (CUDA work is compute; a graphics-only process is rare in a training job). A
        process listed by both queries is counted once. ``used`` is None where the driver withholds it.
        """
        ok, compute = self._call("nvmlDeviceGetComputeRunningProcesses", dev.handle, what=dev.label)
        if not ok:
            return None
        lists = [compute or []]
        if graphics:
            ok, gfx = self._call("nvmlDeviceGetGraphicsRunningProcesses", dev.handle, what=dev.label)
            if ok:
                lists.append(gfx or [])
        out: dict[int, GpuProcess] = {}
        for procs in lists:
            for p in procs:
                pid = getattr(p, "pid", None)
                if not isinstance(pid, int) or pid in out:
                    continue
                used = getattr(p, "usedGpuMemory", None)
                out[pid] = GpuProcess(pid, int(used) if isinstance(used, int) else None)
        return list(out.values())

    def shutdown(self) -> None:
        try:
            self.nv.nvmlShutdown()
        except Exception:  # already shut down, or never fully up: nothing to release
            pass

    # -- devices --------------------------------------------------------------------------------
    def _device(self, handle: Any, label: str, index: int | None, how: str, mig: bool) -> NvmlDevice:
        return NvmlDevice(
            handle=handle,
            label=label,
            nvml_index=index,
            uuid=self.uuid(handle),
            name=self.name(handle),
            total=self._total(handle),
            mig=mig,
            how=how,
        )

    def _mig_children(self, handle: Any) -> list[Any]:
        """The MIG devices of a GPU in MIG mode ([] when MIG is off, unsupported or refused)."""
        ok, mode = self._call("nvmlDeviceGetMigMode", handle, what="a device", quiet=True)
        if not ok:
            return []
        current = mode[0] if isinstance(mode, (list, tuple)) else mode
        if current != _MIG_ENABLED:
            return []
        ok, n = self._call("nvmlDeviceGetMaxMigDeviceCount", handle, what="a MIG-enabled device", quiet=True)
        children = []
        for j in range(int(n) if ok and isinstance(n, int) else 0):
            ok, child = self._call("nvmlDeviceGetMigDeviceHandleByIndex", handle, j, what="a MIG slot", quiet=True)
            if ok and child is not None:  # empty slots answer NOT_FOUND
                children.append(child)
        return children

    def devices(self) -> list[NvmlDevice]:
        """Every device a CUDA process could run on, in NVML order: each GPU, or its MIG devices in MIG mode."""
        out: list[NvmlDevice] = []
        for i in range(self.count()):
            ok, h = self._call("nvmlDeviceGetHandleByIndex", i, what=f"GPU {i}")
            if not ok:
                continue
            children = self._mig_children(h)
            if children:
                out += [self._device(c, f"GPU {i} MIG {j}", i, "index", True) for j, c in enumerate(children)]
            else:
                out.append(self._device(h, f"GPU {i}", i, "index", False))
        return out

    def _by_uuid(self, uuid: str) -> Any:
        """The handle whose UUID is ``uuid`` (any prefix form), asking NVML directly, then comparing all."""
        bare = normalize_uuid(uuid)
        for candidate in (uuid, f"GPU-{bare}", f"MIG-{bare}"):
            ok, h = self._call("nvmlDeviceGetHandleByUUID", candidate, what="a UUID", quiet=True)
            if ok and h is not None:
                return h
        for d in self.devices():
            if d.uuid is not None and normalize_uuid(d.uuid) == bare:
                return d.handle
        return None

    def _index_of(self, handle: Any) -> tuple[int | None, bool]:
        """NVML index of ``handle`` (of its parent GPU for a MIG device) and whether it is a MIG device."""
        ok, is_mig = self._call("nvmlDeviceIsMigDeviceHandle", handle, what="a device", quiet=True)
        mig = bool(ok and getattr(is_mig, "value", is_mig))  # pynvml returns a ctypes c_uint here
        parent = handle
        if mig:
            ok, p = self._call("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", handle, what="a MIG device", quiet=True)
            parent = p if ok else None
        ok, idx = (
            self._call("nvmlDeviceGetIndex", parent, what="a device", quiet=True)
            if parent is not None
            else (False, None)
        )
        return (int(idx) if ok and isinstance(idx, int) else None), mig

    def for_torch_device(
        self,
        index: int,
        *,
        identity: Identity | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> NvmlDevice | None:
        """The NVML device torch calls ``cuda:index``, or None (noted) when no way of matching works.

        Tries torch's UUID, then its PCI bus id, then ``CUDA_VISIBLE_DEVICES``, then the bare index (right
        only when nothing hides or reorders devices; the record's ``matched_by`` says so). A GPU in MIG mode
        is replaced by its MIG device.
        """
        env = os.environ if environ is None else environ
        label = f"cuda:{index}"
        uuid = pci = None
        try:
            uuid, pci = (identity or torch_device_identity)(index)
        except Exception as e:  # torch without CUDA, a device that vanished: fall back below
            self._note("nvml:identity", f"torch cannot name {label} ({describe(e)}); NVML device found another way")
        handle, how = None, ""
        if uuid:
            handle, how = self._by_uuid(uuid), "uuid"
        if handle is None and pci:
            ok, h = self._call("nvmlDeviceGetHandleByPciBusId", pci, what=label, quiet=True)
            handle, how = (h, "pci bus id") if ok else (None, "")
        if handle is None:
            handle, how = self._from_visible_devices(index, env.get("CUDA_VISIBLE_DEVICES")), "CUDA_VISIBLE_DEVICES"
        if handle is None and env.get("CUDA_VISIBLE_DEVICES") is None:
            ok, h = self._call("nvmlDeviceGetHandleByIndex", index, what=label)
            handle, how = (h, "index") if ok else (None, "")
        if handle is None:
            self._note(
                "nvml:unmatched", f"no NVML device matches {label}: device-used and process GPU memory are unknown"
            )
            return None
        nvml_index, mig = self._index_of(handle)
        if not mig:
            children = self._mig_children(handle)
            if len(children) == 1:
                handle, mig = children[0], True  # the one MIG device on it is where CUDA runs
            elif children:
                self._note(
                    f"nvml:mig:{label}",
                    f"{label} is a GPU in MIG mode with {len(children)} MIG devices and torch did not say which one "
                    "it runs on: device-used figures are the whole GPU's",
                )
        where = f"GPU {nvml_index}" if nvml_index is not None else "an NVML device"
        dev = self._device(handle, f"{label} ({where}{' MIG' if mig else ''})", nvml_index, how, mig)
        if how == "index" and _reordered(env) and self.count() > 1:
            self._note(
                "nvml:by-index",
                f"{label} matched to NVML by index only (torch gave no UUID): right unless CUDA_DEVICE_ORDER "
                "reorders devices",
            )
        return dev

    def _from_visible_devices(self, index: int, value: str | None) -> Any:
        visible = parse_visible_devices(value)
        if not visible or index >= len(visible):
            return None
        entry = visible[index]
        if isinstance(entry, int):
            ok, h = self._call("nvmlDeviceGetHandleByIndex", entry, what=f"GPU {entry}", quiet=True)
            return h if ok else None
        ok, h = self._call("nvmlDeviceGetHandleByUUID", entry, what="a UUID", quiet=True)
        if ok and h is not None:
            return h
        # CUDA accepts a unique UUID prefix; NVML wants the whole UUID.
        want = normalize_uuid(entry)
        found = [d.handle for d in self.devices() if d.uuid and normalize_uuid(d.uuid).startswith(want)]
        return found[0] if len(found) == 1 else None


def _reordered(env: Mapping[str, str]) -> bool:
    """Whether CUDA's order may differ from NVML's (the bare-index fallback is then a guess)."""
    return env.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST") != "PCI_BUS_ID"


def own_memory(procs: Iterable[GpuProcess] | None, pids: set[int]) -> tuple[int | None, str]:
    """GPU bytes of ``pids`` on one device and why it may be unknown.

    Returns ``(bytes, "")``, or ``(None, reason)`` with reason ``"query"`` (NVML refused the list),
    ``"withheld"`` (listed, but the driver gives no memory figure) or ``"unmatched"`` (none listed).
    The caller decides what "unmatched" means: 0 on a host where the process was seen before,
    unknown in a container (host PIDs) or before the process was ever seen.
    """
    if procs is None:
        return None, "query"
    mine = [p for p in procs if p.pid in pids]
    if not mine:
        return None, "unmatched"
    if any(p.used is None for p in mine):
        return None, "withheld"
    return sum(int(p.used or 0) for p in mine), ""


# -- every device a command could use (blipmon watch) ----------------------------------------------
class GpuDevices:
    """Every device a CUDA process could run on (each GPU, or its MIG devices in MIG mode), or none with the reason.

    Each query is guarded on its own (:class:`blipmon.runner.nvml.Nvml`): a refusal costs that figure,
    with one note through ``note``, never the sample. ``module`` stands in for ``pynvml`` in tests.
    """

    def __init__(self, module: Any = None, note: Note | None = None) -> None:
        self.units: list[NvmlDevice] = []
        self.reason: str | None = None
        self._nvml: Nvml | None = None
        try:
            self._nvml = Nvml(module, note=note)
            self.units = self._nvml.devices()
            if not self.units:
                self.reason = "NVML reports no NVIDIA device"
        except Exception as e:  # every machine without an NVIDIA driver ends here: one note, not an error
            self.reason = f"NVML unavailable ({describe(e)})"
            self.units = []

    def __bool__(self) -> bool:
        return bool(self.units)

    @property
    def names(self) -> list[str]:
        return [u.name or "NVIDIA GPU" for u in self.units]

    @property
    def totals(self) -> list[int | None]:
        return [u.total for u in self.units]

    def used(self) -> list[int | None]:
        """Used bytes per device; None where NVML refused (noted once per device)."""
        assert self._nvml is not None
        out: list[int | None] = []
        for u in self.units:
            mem = self._nvml.memory(u)
            out.append(mem[0] if mem else None)
        return out

    def processes(self) -> list[list[GpuProcess] | None]:
        """Processes per device (compute and graphics contexts); None where NVML refused (noted once)."""
        assert self._nvml is not None
        return [self._nvml.processes(u, graphics=True) for u in self.units]

    def named_by(self, visible: str | None) -> set[int]:
        """Indices into :attr:`units` that a ``CUDA_VISIBLE_DEVICES`` value lets a process use (none for ``""``)."""
        entries = parse_visible_devices(visible)
        if not entries:
            return set()
        out: set[int] = set()
        for i, u in enumerate(self.units):
            if any(_names(e, u) for e in entries):
                out.add(i)
        return out

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.shutdown()


def _names(entry: int | str, unit: NvmlDevice) -> bool:
    """Whether one ``CUDA_VISIBLE_DEVICES`` entry (an NVML index or a UUID prefix) names ``unit``."""
    if isinstance(entry, int):
        return unit.nvml_index == entry
    return bool(unit.uuid) and normalize_uuid(unit.uuid).startswith(normalize_uuid(entry))


__all__ = [
    "GpuDevices",
    "GpuProcess",
    "Nvml",
    "NvmlDevice",
    "in_own_pid_namespace",
    "load_module",
    "normalize_uuid",
    "own_memory",
    "parse_visible_devices",
    "torch_device_identity",
]
