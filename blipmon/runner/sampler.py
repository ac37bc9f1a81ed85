"""The timeline: a daemon thread sampling host RSS, the CUDA allocator and NVML at ``sample_hz``.

It must never take the job down: every failure inside a sample is swallowed after being noted
once, and NVML being absent (every machine without an NVIDIA driver) is one note, not one error
per sample.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import psutil


class Nvml:
    """Device-used and this-process GPU memory from NVML, or ``None`` with the reason it is unavailable."""

    def __init__(self, device_index: int = 0) -> None:
        self.handle: Any = None
        self.reason: str | None = None
        self._pynvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self._pynvml = pynvml
        except Exception as e:  # no driver, no library, no device: all the same to the user
            self.reason = f"NVML unavailable ({type(e).__name__}: {e})".strip()

    def device_used(self) -> int | None:
        if self.handle is None:
            return None
        return int(self._pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def process_used(self, pids: set[int]) -> int | None:
        if self.handle is None:
            return None
        total = 0
        for proc in self._pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            if proc.pid in pids and proc.usedGpuMemory:
                total += int(proc.usedGpuMemory)
        return total


class Sampler(threading.Thread):
    def __init__(
        self,
        emit: Callable[..., Any],
        hz: float,
        *,
        cuda: bool = False,
        cuda_device: int = 0,
        rank: int = 0,
        stop_check: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(name="blipmon-sampler", daemon=True)
        self.emit = emit
        self.period = 1.0 / hz
        self.cuda = cuda
        self.cuda_device = cuda_device
        self.rank = rank
        self._stop_event = threading.Event()
        self._proc = psutil.Process()
        self.nvml: Nvml | None = None
        self.samples = 0
        self._noted: set[str] = set()

    def _note_once(self, key: str, message: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            self.emit("note", message=message)

    def sample(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"rss": self._proc.memory_info().rss}
        if self.rank:
            rec["rank"] = self.rank
        if self.cuda:
            import torch

            rec["alloc"] = torch.cuda.memory_allocated(self.cuda_device)
            rec["res"] = torch.cuda.memory_reserved(self.cuda_device)
        if self.nvml is not None and self.nvml.handle is not None:
            rec["dev"] = self.nvml.device_used()
            rec["proc_gpu"] = self.nvml.process_used({os.getpid()})
        return rec

    def run(self) -> None:
        if self.cuda:
            self.nvml = Nvml(self.cuda_device)
            if self.nvml.reason:
                self._note_once("nvml", self.nvml.reason)
        while not self._stop_event.is_set():
            try:
                self.emit("sample", **self.sample())
                self.samples += 1
            except Exception as e:  # a sampler must never be what breaks the job
                self._note_once(type(e).__name__, f"sampler: {type(e).__name__}: {e}")
            self._stop_event.wait(self.period)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=2.0)
