"""An independent count of live tensor memory through a real CPU training step, window by window.

This module holds blipmon's estimator to something that shares none of its code: it imports torch only, and it
counts what a training step really allocates, by a different mechanism than the estimator's fake trace.

``LiveStorage`` is a ``TorchDispatchMode``. Every op's outputs pass through it; the first time it sees a storage it
adds the storage's ``nbytes`` to the live total and puts a ``weakref.finalize`` on the storage object, which takes
them off again the moment the storage is freed. That works on torch 2.13 because storages have *PyObject
preservation*: ``t.untyped_storage()`` returns the same Python object for as long as the C++ ``StorageImpl`` lives
(even when no Python name refers to it, e.g. a tensor autograd saved for backward or a gradient buffer the engine
passes between nodes), and that object is deallocated, and its finalizers run, exactly when the ``StorageImpl`` is.
Storages that exist before counting starts (parameters, buffers, bitsandbytes' quantization state, optimizer state,
a batch) are added by walking the objects given to ``add_existing``.

What a dispatch mode can and cannot see:

- it sees every op below autograd, so the backward's ops, activation checkpointing's recomputation and the
  optimizer's ops are all counted; ``torch.tensor(...)`` shows up as ``lift_fresh``;
- a custom op (bitsandbytes' ``optimizer_update_8bit_blockwise``, ``dequantize_4bit``, ...) reaches the mode as one
  call, and torch runs its kernel with the mode switched off, so temporaries its Python kernel allocates and frees
  inside would be invisible. Such ops are therefore *opened*: the mode re-enters itself and redispatches the op
  straight to its CPU kernel (``OpOverload.redispatch``), so the kernel's own ops pass through the mode too;
- memory a C++ kernel allocates and frees inside one op (scratch buffers) is not seen. It is not a storage any
  later op can hold, and a GPU kernel's scratch differs anyway.

The peak of a window is the largest live total right after an op completed (its output exists while its inputs
still do), which is also when a caching allocator's peak is reached. ``mark`` closes a window: it records the
window's peak (including the live total at the window's start) and the live total at the boundary.

``run_steps`` reproduces the order of events of a plain training loop with gradient accumulation, phase by phase
(``before_fwd``, ``after_fwd``, ``after_bwd``, ``after_opt_step``), keeping alive exactly what such a loop keeps: the
batch until after the backward, the loss tensors of an accumulation window until its optimizer step (for the
step's mean loss), the gradients until ``zero_grad(set_to_none=True)``.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Namespaces whose ops are torch's own kernels (or bookkeeping): never opened.
_OWN_NAMESPACES = frozenset({"aten", "prim", "prims", "profiler"})
_CPU_KEYSET = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


@dataclass(frozen=True)
class Mark:
    """One closed window: its peak (bytes) and what was live at its closing boundary."""

    label: Any
    peak: int
    live: int


class LiveStorage(TorchDispatchMode):
    """Live bytes of all tensor storages that ops create (and that were registered before), with window peaks."""

    def __init__(self, open_custom_ops: bool = True) -> None:
        super().__init__()
        self.open_custom_ops = open_custom_ops
        self.live = 0
        self.window_peak = 0
        self.overall_peak = 0
        self.marks: list[Mark] = []
        self._sizes: dict[int, int] = {}  # id(storage object) -> bytes counted for it
        self.ops = 0

    # -- storages ------------------------------------------------------------------------------------------------

    def add(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage if it is not counted yet (or count its new size if it was resized)."""
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        s = t.untyped_storage()
        key = id(s)
        n = int(s.nbytes())
        old = self._sizes.get(key)
        if old is None:
            if n == 0:
                return  # nothing to count; if it grows later (resize_), its next appearance counts it
            self._sizes[key] = n
            weakref.finalize(s, self._freed, key)
            self._grow(n)
        elif old != n:
            self._sizes[key] = n
            self._grow(n - old)

    def _freed(self, key: int) -> None:
        n = self._sizes.pop(key, 0)
        self.live -= n

    def _grow(self, n: int) -> None:
        self.live += n
        if self.live > self.window_peak:
            self.window_peak = self.live
        if self.live > self.overall_peak:
            self.overall_peak = self.live

    def add_existing(self, *roots: Any) -> int:
        """Count every storage reachable from ``roots`` (modules, optimizers, tensors, containers, objects with
        tensor attributes such as bitsandbytes' quant state). Returns the bytes added."""
        before = self.live
        for t in tensors_in(roots):
            self.add(t)
        return self.live - before

    # -- windows -------------------------------------------------------------------------------------------------

    def mark(self, label: Any) -> Mark:
        """Close the current window at a boundary; the next one starts with what is live now."""
        m = Mark(label, self.window_peak, self.live)
        self.marks.append(m)
        self.window_peak = self.live
        return m

    def restart(self) -> None:
        """Start a window now (forgetting the peak so far)."""
        self.window_peak = self.live

    # -- the mode ------------------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.ops += 1
        if self.open_custom_ops and func.namespace not in _OWN_NAMESPACES and _all_cpu(args, kwargs):
            # A custom op's kernel would run with this mode off: run it with the mode on, straight at its CPU kernel.
            with self:
                out = func.redispatch(_CPU_KEYSET, *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def _all_cpu(args: Any, kwargs: Any) -> bool:
    return all(t.device.type == "cpu" for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))


def tensors_in(root: Any, depth: int = 6) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``root``: modules' parameters, buffers and tensor attributes, optimizers' state,
    containers, and plain objects' attributes (a bitsandbytes ``QuantState``), a few levels deep."""
    seen: set[int] = set()

    def walk(obj: Any, d: int) -> Iterator[torch.Tensor]:
        if id(obj) in seen or d < 0:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield obj
            for name in ("grad", "quant_state", "SCB", "CB"):  # a parameter's gradient and its quantization state
                extra = obj.__dict__.get(name) if name != "grad" else obj.grad
                if extra is not None:
                    yield from walk(extra, d - 1)
            return
        if isinstance(obj, torch.nn.Module):
            for m in obj.modules():
                for t in list(m._parameters.values()) + list(m._buffers.values()):
                    if t is not None:
                        yield from walk(t, d)
                for k, v in vars(m).items():
                    if k not in ("_parameters", "_buffers", "_modules") and not isinstance(v, torch.nn.Module):
                        yield from walk(v, d - 1)
            return
        if isinstance(obj, torch.optim.Optimizer):
            yield from walk(dict(obj.state), d)
            yield from walk(obj.param_groups, d)
            yield from walk({k: v for k, v in vars(obj).items() if k not in ("state", "param_groups")}, d - 1)
            return
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from walk(k, d - 1)
                yield from walk(v, d - 1)
            return
        if isinstance(obj, (list, tuple, set, frozenset)):
            for v in obj:
                yield from walk(v, d - 1)
            return
        if isinstance(obj, (str, bytes, int, float, bool, type(None))) or callable(obj):
            return
        attrs = getattr(obj, "__dict__", None)
        if isinstance(attrs, dict):
            yield from walk(attrs, d - 1)

    yield from walk(root, depth)


# ----------------------------------------------------------------------------------------------------------------
# A training loop, boundary by boundary


@dataclass(frozen=True)
class Window:
    """The interval that ends at a boundary: its peak and the live bytes at the boundary."""

    step: int
    micro: int
    phase: str  # before_fwd | after_fwd | after_bwd | after_opt_step
    peak: int
    live: int


@dataclass
class Trace:
    """What ``run_steps`` counted."""

    start: int  # bytes live when counting started (the model, the optimizer, whatever else was registered)
    windows: list[Window] = field(default_factory=list)
    leaked_to_gc: int = 0  # bytes that only a garbage collection freed at the end (reference cycles)

    def peak(self, step: int, phase: str) -> int:
        """The window's peak over all micro-steps of ``step`` (what a per-step phase figure is)."""
        got = [w.peak for w in self.windows if w.step == step and w.phase == phase]
        if not got:
            raise KeyError((step, phase))
        return max(got)

    def live(self, step: int, phase: str) -> int:
        """Live bytes at the boundary of the step's last micro-step."""
        got = [w for w in self.windows if w.step == step and w.phase == phase]
        if not got:
            raise KeyError((step, phase))
        return max(got, key=lambda w: w.micro).live


def run_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    steps: int,
    accumulate: int = 1,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    float_dtype: torch.dtype = torch.float32,
    roots: tuple[Any, ...] = (),
) -> Trace:
    """Train ``steps`` optimizer steps of ``accumulate`` micro-steps each, counting live storages throughout.

    The loop keeps what a plain loop keeps: each micro-step fetches its batch (inside the window that ends before
    the forward: the data loading's own temporaries count there), casts its floating tensors to ``float_dtype``,
    runs the forward under ``autocast()``, divides the loss by ``accumulate``, drops the model output, runs the
    backward, keeps a detached loss for the step's mean, drops loss and batch; at the end of an accumulation window
    it steps the optimizer, zeroes the gradients (``set_to_none=True``) and averages the kept losses. The cyclic
    garbage collector is off while counting (a collection at a random moment would free reference cycles at a
    random moment); ``Trace.leaked_to_gc`` says how much only a collection at the end freed.
    """
    counter = LiveStorage()
    start = counter.add_existing(model, optimizer, *roots)
    trace = Trace(start=start)

    def close(step: int, micro: int, phase: str) -> None:
        m = counter.mark((step, micro, phase))
        trace.windows.append(Window(step, micro, phase, m.peak, m.live))

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with counter:
            counter.restart()
            step = micro = 0
            losses: list[torch.Tensor] = []
            for batch in batches:
                if step >= steps:
                    break
                close(step, micro, "before_fwd")
                batch = {k: (v.to(float_dtype) if v.is_floating_point() else v) for k, v in batch.items()}
                with autocast():
                    out = model(**batch)
                loss = out.loss / accumulate
                del out
                close(step, micro, "after_fwd")
                loss.backward()
                losses.append(loss.detach())
                del loss, batch
                close(step, micro, "after_bwd")
                micro += 1
                if micro < accumulate:
                    continue
                optimizer.step()
                close(step, micro - 1, "after_opt_step")
                optimizer.zero_grad(set_to_none=True)
                torch.stack([x.reshape(()).float() for x in losses]).tolist()
                step += 1
                micro, losses = 0, []
            del losses
        before = counter.live
        gc.collect(0)  # the collector was off: whatever cycles the step made are all still in the youngest generation
        trace.leaked_to_gc = before - counter.live
    finally:
        if was_enabled:
            gc.enable()
    return trace
