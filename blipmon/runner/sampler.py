"""The timeline: a daemon thread sampling host RSS, the CUDA allocator and NVML at ``sample_hz``.

It must never take the job down, nor let one failing source cost the others: host RSS, the allocator
and each NVML query are read on their own, a failure costs only its own figure (absent from the sample)
and is noted once. NVML being absent (every machine without an NVIDIA driver) is one note, not one
error per sample.

Which GPU NVML reads is decided by :mod:`blipmon.runner.nvml` (torch's UUID, not its index: NVML
ignores ``CUDA_VISIBLE_DEVICES``). A model on several GPUs (``cuda_devices``) is sampled on each:
the ``sample`` record carries the sums, and a ``gpus`` record beside it each GPU's own figures, so the
``sample`` lines stay flat numbers (what lets a reader load a million of them in a second).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psutil

from blipmon.runner import allocator
from blipmon.runner.nvml import Identity, Nvml, NvmlDevice, describe, in_own_pid_namespace, own_memory

DEFAULT_HZ = 10.0
# At most 100 samples a second: finer than any phase of a training step that matters to the timeline
# (the allocator's per-phase peaks never depend on it), and a /proc read or NVML query per 10 ms is
# already a visible cost on a small machine.
MIN_PERIOD_S = 0.01
# A rate of 1e-300 must still give a period every wait accepts (threading and select overflow past ~9e9 s).
MAX_PERIOD_S = 1e9
# Whatever the rate, sampling spends at most 1/(1+BUSY_FACTOR) of the time sampling: after a sample that
# took c seconds the next one waits at least BUSY_FACTOR * c, so a slow /proc scan cannot eat a core.
BUSY_FACTOR = 4.0


def sample_period(hz: float) -> float:
    """Seconds between samples for ``hz`` samples a second, bounded for any value.

    Infinite or huge rates give :data:`MIN_PERIOD_S`; tiny ones are capped at :data:`MAX_PERIOD_S`; zero,
    negative or NaN rates (refused by the configuration, but a sampler must not be what fails) give the
    default rate's period.
    """
    try:
        hz = float(hz)
    except (TypeError, ValueError):
        hz = DEFAULT_HZ
    if not hz > 0:  # NaN, zero, negative
        hz = DEFAULT_HZ
    period = 1.0 / hz
    if math.isnan(period):
        period = 1.0 / DEFAULT_HZ
    return min(max(period, MIN_PERIOD_S), MAX_PERIOD_S)


def next_wait(period: float, cost: float) -> float:
    """How long to wait after a sample that took ``cost`` seconds: the rest of the period, at least BUSY_FACTOR x cost."""
    return max(period - cost, BUSY_FACTOR * max(cost, 0.0), 0.0)


class Sampler(threading.Thread):
    """Samples one rank's memory until :meth:`stop`.

    ``cuda_device`` is the torch index of the GPU the process computes on (the probe's device, not the
    local rank: under ``CUDA_VISIBLE_DEVICES`` they can differ); ``cuda_devices`` replaces it with every
    GPU a model occupies (a ``device_map`` split), and :meth:`set_cuda_devices` changes the set once the
    model is placed. The keyword arguments after those are seams for tests, where no GPU exists:
    ``nvml_module`` stands in for ``pynvml``, ``device_identity`` for torch's UUID lookup,
    ``memory_stats`` for ``torch.cuda.memory_stats`` and ``own_pid_namespace`` for the container check.
    """

    def __init__(
        self,
        emit: Callable[..., Any],
        hz: float,
        *,
        cuda: bool = False,
        cuda_device: int = 0,
        rank: int = 0,
        stop_check: Callable[[], bool] | None = None,
        cuda_devices: Sequence[int] | None = None,
        nvml_module: Any = None,
        device_identity: Identity | None = None,
        memory_stats: Callable[[int], Mapping[str, int]] | None = None,
        own_pid_namespace: bool | None = None,
    ) -> None:
        super().__init__(name="blipmon-sampler", daemon=True)
        self.emit = emit
        self.period = sample_period(hz)
        self.cuda = cuda
        self.cuda_device = cuda_device
        self.cuda_devices: list[int] = sorted(set(cuda_devices)) if cuda_devices else [cuda_device]
        self.rank = rank
        self.stop_check = stop_check
        self._stop_event = threading.Event()
        self._proc = psutil.Process()
        self._pid = os.getpid()
        self.nvml: Nvml | None = None
        self.samples = 0
        self._noted: set[str] = set()
        self._lock = threading.Lock()
        self._pending: list[int] | None = None
        self._nvml_module = nvml_module
        self._identity = device_identity
        self._stats = memory_stats
        self._own_ns = in_own_pid_namespace() if own_pid_namespace is None else own_pid_namespace
        self._gpus: dict[int, NvmlDevice | None] = {}
        self._seen_on: set[int] = set()  # torch indices where NVML has listed this process
        self._per_gpu: dict[str, dict[str, int]] = {}

    def _note_once(self, key: str, message: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            self.emit("note", message=message)

    # -- devices --------------------------------------------------------------------------------
    def set_cuda_devices(self, devices: Sequence[int]) -> None:
        """Sample these torch CUDA indices from the next tick on (the GPUs a model was placed on)."""
        wanted = sorted(set(int(d) for d in devices))
        if wanted:
            with self._lock:
                self._pending = wanted

    def _apply_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None and pending != self.cuda_devices:
            self.cuda_devices = pending
            self._resolve()

    def start_nvml(self) -> None:
        """Initialise NVML and find each sampled GPU in it; one note when NVML is not there at all."""
        try:
            self.nvml = Nvml(self._nvml_module, note=self._note_once)
        except Exception as e:  # no driver, no library, no device: all the same to the user
            self.nvml = None
            self._note_once("nvml", f"NVML unavailable ({describe(e)})")
            return
        self._resolve()

    def _resolve(self) -> None:
        if self.nvml is None:
            return
        new = [d for d in self.cuda_devices if d not in self._gpus]
        for d in new:
            self._gpus[d] = self.nvml.for_torch_device(d, identity=self._identity)
        if new:
            fields: dict[str, Any] = {
                "devices": {f"cuda:{d}": (g.describe() if g else None) for d, g in self._gpus.items()}
            }
            if self.rank:
                fields["rank"] = self.rank
            self.emit("nvml", **fields)

    # -- one sample -------------------------------------------------------------------------------
    def sample(self) -> dict[str, Any]:
        """One ``sample`` record; per-GPU figures of a multi-GPU model go to :attr:`_per_gpu` for a ``gpus`` record."""
        rec: dict[str, Any] = {"rss": self._proc.memory_info().rss}
        if self.rank:
            rec["rank"] = self.rank
        devices = list(self.cuda_devices)
        per: dict[str, dict[str, int]] = {f"cuda:{d}": {} for d in devices}
        if self.cuda:
            try:
                reading = allocator.read(devices, stats=self._stats)
                rec["alloc"], rec["res"] = reading.allocated, reading.reserved
                for key, fig in reading.per_device.items():
                    per[key].update(alloc=fig["allocated"], res=fig["reserved"])
            except Exception as e:  # the allocator failing costs its own figures only
                self._note_once("allocator", f"sampler: allocator figures unavailable ({describe(e)})")
        if self.nvml is not None:
            used_sum, used_known, own_sum, own_known = 0, True, 0, True
            for d in devices:
                key = f"cuda:{d}"
                gpu = self._gpus.get(d)
                if gpu is None:
                    used_known = own_known = False
                    continue
                mem = self.nvml.memory(gpu)
                if mem is None:
                    used_known = False
                else:
                    used_sum += mem[0]
                    per[key]["dev"] = mem[0]
                own = self._own_memory(d, gpu, per[key].get("res"))
                if own is None:
                    own_known = False
                else:
                    own_sum += own
                    per[key]["proc_gpu"] = own
            if used_known:
                rec["dev"] = used_sum
            if own_known:
                rec["proc_gpu"] = own_sum
        self._per_gpu = per if len(devices) > 1 else {}
        return rec

    def _own_memory(self, index: int, gpu: NvmlDevice, reserved: int | None) -> int | None:
        """This process's GPU memory on one device as NVML reports it; None when NVML cannot tell."""
        assert self.nvml is not None
        value, why = own_memory(self.nvml.processes(gpu), {self._pid})
        if not why:
            self._seen_on.add(index)
            return value
        if why == "withheld":
            self._note_once(
                "nvml:withheld",
                f"NVML lists this process on {gpu.label} but withholds its memory (usedGpuMemory not available: "
                "MIG, WSL or some containers); its own GPU memory is recorded as unknown",
            )
        elif why == "unmatched":
            if index in self._seen_on:  # listed before, gone now: its context on that device is gone
                return 0
            if (reserved or 0) > 0 or self._own_ns:
                from blipmon.core.units import fmt_bytes

                holds = f" although torch's allocator holds {fmt_bytes(reserved)} there" if reserved else ""
                why_not = (
                    "this process runs in a PID namespace of its own (a container), where NVML reports host PIDs"
                    if self._own_ns
                    else "inside a container NVML reports host PIDs"
                )
                self._note_once(
                    "nvml:pid",
                    f"NVML does not list this process (pid {self._pid}) on {gpu.label}{holds}: {why_not}; "
                    "its own GPU memory is recorded as unknown, not 0",
                )
        return None

    # -- the thread -------------------------------------------------------------------------------
    def run(self) -> None:
        if self.cuda:
            try:
                self.start_nvml()
            except Exception as e:  # finding the device must not cost the host RSS and allocator timeline
                self.nvml = None
                self._note_once("nvml", f"NVML unavailable ({describe(e)})")
        while not self._stop_event.is_set():
            started = time.monotonic()
            try:
                self._apply_pending()
                self.emit("sample", **self.sample())
                self.samples += 1
                if self._per_gpu:
                    fields: dict[str, Any] = {"devices": self._per_gpu}
                    if self.rank:
                        fields["rank"] = self.rank
                    self.emit("gpus", **fields)
            except Exception as e:  # a sampler must never be what breaks the job
                self._note_once(type(e).__name__, f"sampler: {describe(e)}")
            self._stop_event.wait(next_wait(self.period, time.monotonic() - started))

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=2.0)


__all__ = ["MIN_PERIOD_S", "Sampler", "next_wait", "sample_period"]
