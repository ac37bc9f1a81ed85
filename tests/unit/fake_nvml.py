"""A fake ``pynvml`` that behaves as NVML does where it trips people up (no NVIDIA driver exists here).

- Its own device order: devices are numbered as given (NVML's PCI order), whatever torch calls them.
- UUIDs with NVML's ``GPU-``/``MIG-`` prefixes (torch prints them bare).
- Processes with the PIDs the test gives: host PIDs, so in a "container" they never equal ``os.getpid()``.
- ``usedGpuMemory`` may be ``None`` (MIG, WSL, some containers), as pynvml maps NVML_VALUE_NOT_AVAILABLE.
- MIG: a parent in MIG mode refuses memory and process queries without privileges (NO_PERMISSION), its
  MIG devices answer for themselves; ``nvmlDeviceGetIndex`` refuses a MIG handle.
- Any call can be made to fail for one device (``FakeGpu.fail``), raising ``NVMLError`` with NVML's codes.

Build one with ``make(gpus)``; it is a real module object, so it can stand in ``sys.modules['pynvml']``.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

NVML_SUCCESS = 0
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1

_TEXT = {2: "Invalid Argument", 3: "Not Supported", 4: "Insufficient Permissions", 6: "Not Found",
         18: "RM has detected an NVML/RM version mismatch."}  # fmt: skip


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _TEXT.get(self.value, f"error {self.value}")


@dataclass
class Proc:
    pid: int
    usedGpuMemory: int | None  # noqa: N815 (pynvml's name)
    gpuInstanceId: int = 0xFFFFFFFF  # noqa: N815
    computeInstanceId: int = 0xFFFFFFFF  # noqa: N815


@dataclass
class Memory:
    total: int
    used: int

    @property
    def free(self) -> int:
        return self.total - self.used


@dataclass(eq=False)
class FakeGpu:
    """One device; a MIG-mode GPU lists its MIG devices in ``migs`` (each a FakeGpu with ``parent`` set)."""

    uuid: str
    total: int
    used: int
    name: str = "NVIDIA H100 80GB HBM3"
    pci: str = ""
    procs: list[Proc] | Callable[[], list[Proc]] = field(default_factory=list)  # a callable: listed live
    graphics: list[Proc] = field(default_factory=list)
    migs: list[FakeGpu] = field(default_factory=list)
    parent: FakeGpu | None = None
    fail: dict[str, int] = field(default_factory=dict)  # function name -> NVML error code

    @property
    def mig_mode(self) -> bool:
        return bool(self.migs)


def make(gpus: list[FakeGpu], *, init_error: int | None = None) -> types.ModuleType:
    """A ``pynvml`` stand-in over ``gpus`` (in NVML's order). ``mod.calls`` logs (function, device uuid)."""
    mod = types.ModuleType("pynvml")
    calls: list[tuple[str, str]] = []
    for g in gpus:
        for m in g.migs:
            m.parent = g

    def check(fn: str, g: FakeGpu) -> None:
        calls.append((fn, g.uuid))
        if fn in g.fail:
            raise NVMLError(g.fail[fn])

    def every() -> list[FakeGpu]:
        return [d for g in gpus for d in (g, *g.migs)]

    def nvmlInit() -> None:
        if init_error is not None:
            raise NVMLError(init_error)

    def nvmlShutdown() -> None:
        return None

    def nvmlDeviceGetCount() -> int:
        return len(gpus)

    def nvmlDeviceGetHandleByIndex(i: int) -> FakeGpu:
        if not 0 <= i < len(gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpus[i]

    def nvmlDeviceGetHandleByUUID(uuid: str | bytes) -> FakeGpu:
        u = uuid.decode() if isinstance(uuid, bytes) else uuid
        for d in every():
            if d.uuid == u:  # NVML wants the whole UUID, prefix included
                return d
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetHandleByPciBusId(bus: str | bytes) -> FakeGpu:
        b = (bus.decode() if isinstance(bus, bytes) else bus).upper()
        for g in gpus:
            if g.pci and g.pci.upper() == b:
                return g
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetIndex(g: FakeGpu) -> int:
        check("nvmlDeviceGetIndex", g)
        if g.parent is not None:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpus.index(g)

    def nvmlDeviceGetUUID(g: FakeGpu) -> str:
        check("nvmlDeviceGetUUID", g)
        return g.uuid

    def nvmlDeviceGetName(g: FakeGpu) -> str:
        check("nvmlDeviceGetName", g)
        return g.name

    def nvmlDeviceGetMemoryInfo(g: FakeGpu, version: Any = None) -> Memory:
        check("nvmlDeviceGetMemoryInfo", g)
        if g.mig_mode:
            raise NVMLError(NVML_ERROR_NO_PERMISSION)  # a MIG parent, seen from an unprivileged process
        return Memory(g.total, g.used)

    def _procs(fn: str, g: FakeGpu, which: list[Proc] | Callable[[], list[Proc]]) -> list[Proc]:
        check(fn, g)
        if g.mig_mode:
            raise NVMLError(NVML_ERROR_NO_PERMISSION)
        return [Proc(p.pid, p.usedGpuMemory) for p in (which() if callable(which) else which)]

    def nvmlDeviceGetComputeRunningProcesses(g: FakeGpu) -> list[Proc]:
        return _procs("nvmlDeviceGetComputeRunningProcesses", g, g.procs)

    def nvmlDeviceGetGraphicsRunningProcesses(g: FakeGpu) -> list[Proc]:
        return _procs("nvmlDeviceGetGraphicsRunningProcesses", g, g.graphics)

    def nvmlDeviceGetMigMode(g: FakeGpu) -> list[int]:
        check("nvmlDeviceGetMigMode", g)
        if g.parent is not None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        mode = NVML_DEVICE_MIG_ENABLE if g.mig_mode else NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(g: FakeGpu) -> int:
        check("nvmlDeviceGetMaxMigDeviceCount", g)
        return 7 if g.mig_mode else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(g: FakeGpu, j: int) -> FakeGpu:
        check("nvmlDeviceGetMigDeviceHandleByIndex", g)
        if j >= len(g.migs):
            raise NVMLError(NVML_ERROR_NOT_FOUND)  # an empty slot
        return g.migs[j]

    def nvmlDeviceIsMigDeviceHandle(g: FakeGpu) -> int:
        return int(g.parent is not None)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(g: FakeGpu) -> FakeGpu:
        if g.parent is None:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return g.parent

    for name, value in list(locals().items()):
        if name.startswith("nvml"):
            setattr(mod, name, value)
    mod.NVMLError = NVMLError  # type: ignore[attr-defined]
    mod.NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE  # type: ignore[attr-defined]
    mod.NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION  # type: ignore[attr-defined]
    mod.calls = calls  # type: ignore[attr-defined]
    return mod


def uuid(n: int) -> str:
    """A GPU UUID as NVML prints it, distinct per ``n``."""
    return f"GPU-{n:08x}-1111-2222-3333-{n:012x}"


def mig_uuid(n: int) -> str:
    return f"MIG-{n:08x}-aaaa-bbbb-cccc-{n:012x}"


def bare(u: str) -> str:
    """The UUID as torch's ``get_device_properties(i).uuid`` prints it: no ``GPU-``/``MIG-`` prefix."""
    return u.split("-", 1)[1]
