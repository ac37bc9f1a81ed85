"""Exact per-phase memory attribution: params, grads, optimizer state and saved activations.

The seed lab estimates activations as "whatever is left" of the allocator figure. blipmon counts
them: a saved-tensors hook sees every tensor autograd keeps for backward and holds only a weak
reference to it, so a probe can sum the unique storages that are still alive at a boundary
(parameters excluded). Everything is counted per unique storage, so views and tied weights are
never counted twice, and a quantized weight counts at its real packed size.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import torch

_Key = tuple[int, int]  # (device index or -1 for CPU, storage data pointer)


def _key(t: torch.Tensor) -> tuple[_Key, int, bool]:
    st = t.untyped_storage()
    dev = t.device
    cuda = dev.type == "cuda"
    return ((dev.index or 0) if cuda else -1, st.data_ptr()), st.nbytes(), cuda


def storage_bytes(tensors: Iterable[torch.Tensor], exclude: set[_Key] | None = None) -> tuple[int, int]:
    """(total bytes, bytes on CUDA) of the unique storages behind ``tensors``."""
    seen: set[_Key] = set()
    total = on_cuda = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        k, n, cuda = _key(t)
        if k in seen or (exclude is not None and k in exclude):
            continue
        seen.add(k)
        total += n
        if cuda:
            on_cuda += n
    return total, on_cuda


def optimizer_tensors(optimizer: Any) -> Iterator[torch.Tensor]:
    """Every tensor in an optimizer's state, including bitsandbytes' 8-bit state and quantile maps."""
    if optimizer is None:
        return
    for state in optimizer.state.values():
        if isinstance(state, dict):
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    yield v


class SavedTensorTracker:
    """Weakly remembers every tensor saved for backward inside ``track()``."""

    def __init__(self) -> None:
        self._refs: list[weakref.ref[torch.Tensor]] = []

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # A detached alias owned only by autograd's saved slot: it dies exactly when the graph
        # releases it, even if the original tensor lives on elsewhere (an input batch, say).
        alias = t.detach()
        self._refs.append(weakref.ref(alias))
        return alias

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @contextmanager
    def track(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def alive(self) -> Iterator[torch.Tensor]:
        live: list[weakref.ref[torch.Tensor]] = []
        for r in self._refs:
            t = r()
            if t is not None:
                live.append(r)
                yield t
        self._refs = live


class PhaseProbe:
    """Takes the four-phase measurements and writes them as ``phase`` events.

    ``emit`` is the event sink (the profile writer's ``write``), injected so the probe can be
    tested without files and reused by the Trainer and Lightning callbacks.
    """

    def __init__(
        self,
        model: Any,
        emit: Callable[..., Any],
        *,
        optimizer: Any = None,
        rank: int = 0,
        cuda: bool = False,
        cuda_device: int | None = None,
    ) -> None:
        self.model = model
        self.emit = emit
        self.optimizer = optimizer
        self.rank = rank
        self.cuda = cuda
        self.cuda_device = cuda_device
        self.saved = SavedTensorTracker()
        self._proc = psutil.Process()
        self._param_keys: set[_Key] = set()
        self._params_total = 0
        self._params_cuda = 0
        self.refresh_params()

    def refresh_params(self) -> None:
        """Recount parameter storages (after a cast, a move or wrapping with LoRA)."""
        params = list(self.model.parameters())
        keys: set[_Key] = set()
        for p in params:
            keys.add(_key(p)[0])
        self._param_keys = keys
        self._params_total, self._params_cuda = storage_bytes(params)

    def measure(self) -> dict[str, int | None]:
        grads = (p.grad for p in self.model.parameters() if p.grad is not None)
        g_total, g_cuda = storage_bytes(grads)
        o_total, o_cuda = storage_bytes(optimizer_tensors(self.optimizer))
        a_total, a_cuda = storage_bytes(self.saved.alive(), exclude=self._param_keys)
        rec: dict[str, int | None] = {
            "params": self._params_total,
            "grads": g_total,
            "optim": o_total,
            "acts": a_total,
            "other": None,
            "allocated": None,
            "peak": None,
            "reserved": None,
            "host_rss": self._proc.memory_info().rss,
        }
        if self.cuda:
            dev = self.cuda_device
            allocated = torch.cuda.memory_allocated(dev)
            rec["allocated"] = allocated
            rec["peak"] = torch.cuda.max_memory_allocated(dev)
            rec["reserved"] = torch.cuda.memory_reserved(dev)
            rec["other"] = allocated - (self._params_cuda + g_cuda + o_cuda + a_cuda)
            # The next boundary's peak covers exactly the interval since this one.
            torch.cuda.reset_peak_memory_stats(dev)
        return rec

    def boundary(self, phase: str, step: int, micro_step: int) -> dict[str, Any]:
        rec = {"step": step, "micro_step": micro_step, "rank": self.rank, "phase": phase, **self.measure()}
        self.emit("phase", **rec)
        return rec


class NullProbe:
    """Same interface, no measurement: the baseline that ``benchmarks/overhead.py`` compares against."""

    def __init__(self) -> None:
        self.saved = self

    @contextmanager
    def track(self) -> Iterator[None]:
        yield

    def refresh_params(self) -> None:
        pass

    def boundary(self, phase: str, step: int, micro_step: int) -> dict[str, Any]:
        return {}
