"""Exact per-phase memory attribution: params, grads, optimizer state and saved activations.

The seed lab estimates activations as "whatever is left" of the allocator figure. blipmon counts
them: a saved-tensors hook sees every tensor autograd keeps for backward and holds only a weak
reference to it, so a probe can sum the unique storages that are still alive at a boundary
(parameters excluded). Everything is counted per unique storage, so views and tied weights are
never counted twice, and a quantized weight counts at its real packed size.

One module although it is long: the probe, the saved-tensor tracker and the storage counting are one rule (count
each storage once, by what holds it), and the estimator imports its pieces by this path.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from operator import attrgetter, call, is_, is_not
from types import TracebackType
from typing import Any

import psutil
import torch

from blipmon.runner import allocator

_Key = tuple[int, int]  # (device index or -1 for CPU, storage data pointer)


def _key(t: torch.Tensor) -> tuple[_Key, int, bool]:
    # get_device() is -1 on the CPU; it is ten times cheaper than t.device.type, and this runs
    # for every tensor at every boundary.
    st = t.untyped_storage()
    dev = t.get_device()
    return (dev, st.data_ptr()), st.nbytes(), dev >= 0


# -- counting without a Python call per tensor ---------------------------------------------------------------------
# A boundary that is not recorded in full needs only totals. These helpers get them through C-level iteration
# (``map``/``filter``/``zip`` over torch's own methods, ``dict`` for uniqueness), so the interpreter runs no bytecode
# per tensor: on the tiny model a Python-level loop over 113 gradients and 340 optimizer tensors at each boundary
# was most of the probe's cost (benchmarks/overhead.py, docs/modules.md "What it costs").
_grad_of = attrgetter("grad")
_not_none = partial(is_not, None)
_is_tensor = partial(type.__instancecheck__, torch.Tensor)  # isinstance without a Python frame, metaclass-free
_storage_of = torch.Tensor.untyped_storage
_device_of = torch.Tensor.get_device
_storage_ptr = torch.UntypedStorage.data_ptr
_storage_nbytes = torch.UntypedStorage.nbytes


def _keys_and_sizes(tensors: list[torch.Tensor]) -> tuple[list[_Key], list[int]]:
    """Each tensor's storage key and storage size, in order (C-level iteration)."""
    storages = list(map(_storage_of, tensors))
    keys = list(zip(map(_device_of, tensors), map(_storage_ptr, storages), strict=True))
    return keys, list(map(_storage_nbytes, storages))


def _unique_totals(keys: Sequence[_Key], sizes: Sequence[int], exclude: set[_Key] | None = None) -> tuple[int, int]:
    """(total, on CUDA) of the unique storages among ``keys``, each at the size of its first occurrence (the rule
    of ``StorageCounter.count``), ``exclude`` left out."""
    first = dict(zip(reversed(keys), reversed(sizes), strict=True))  # a later duplicate never overwrites the first
    if exclude:
        for k in exclude.intersection(first):
            del first[k]
    total = sum(first.values())
    if not first or max(first)[0] < 0:  # keys sort by device first: the largest is on the CPU, so every one is
        return total, 0
    return total, sum(n for (dev, _ptr), n in first.items() if dev >= 0)


class _SameTensors:
    """Whether a list of tensors holds the very objects (in order) that the last count saw: then the count stands.

    Gradients between backward and ``zero_grad``, and an optimizer's state tensors (updated in place) are the same
    objects boundary after boundary; a tensor object keeps its storage (the ``StorageCounter`` rule). Weak
    references: the check never keeps a freed gradient alive, and a dead one never matches."""

    def __init__(self) -> None:
        self._refs: list[weakref.ref[torch.Tensor]] = []
        self.result: tuple[int, int] | None = None

    def same(self, tensors: list[torch.Tensor]) -> bool:
        refs = self._refs
        return self.result is not None and len(refs) == len(tensors) and all(map(is_, tensors, map(call, refs)))

    def remember(self, tensors: list[torch.Tensor], result: tuple[int, int]) -> tuple[int, int]:
        self._refs = list(map(weakref.ref, tensors))
        self.result = result
        return result

    def count(self, tensors: list[torch.Tensor]) -> tuple[int, int]:
        """(total, on CUDA) of the unique storages behind ``tensors``, recounted only when they changed."""
        if self.same(tensors):
            assert self.result is not None
            return self.result
        return self.remember(tensors, _unique_totals(*_keys_and_sizes(tensors)))

    def forget(self) -> None:
        self._refs, self.result = [], None


def storage_bytes(tensors: Iterable[torch.Tensor], exclude: set[_Key] | None = None) -> tuple[int, int]:
    """(total bytes, bytes on CUDA) of the unique storages behind ``tensors``."""
    return StorageCounter().count(tensors, exclude)


class StorageCounter:
    """Counts unique storages, remembering each tensor's storage between boundaries.

    Asking a tensor for its storage costs microseconds; parameters, gradients and optimizer
    state are the same tensor objects boundary after boundary, so a per-object cache (keyed by
    id, validated by a weak reference) keeps four probes per micro-step cheap.
    """

    def __init__(self) -> None:
        self._cache: dict[int, tuple[weakref.ref[torch.Tensor], _Key, int, bool]] = {}

    def _fill(self, t: torch.Tensor) -> tuple[weakref.ref[torch.Tensor], _Key, int, bool]:
        k, n, cuda = _key(t)
        entry = (weakref.ref(t), k, n, cuda)
        self._cache[id(t)] = entry
        return entry

    def count(self, tensors: Iterable[torch.Tensor], exclude: set[_Key] | None = None) -> tuple[int, int]:
        cache = self._cache
        seen: set[_Key] = set()
        total = on_cuda = 0
        for t in tensors:
            hit = cache.get(id(t))
            if hit is None or hit[0]() is not t:
                hit = self._fill(t)
            k = hit[1]
            if k in seen or (exclude is not None and k in exclude):
                continue
            seen.add(k)
            total += hit[2]
            if hit[3]:
                on_cuda += hit[2]
        if len(cache) > 4 * (len(seen) + 1024):
            self._cache = {i: v for i, v in cache.items() if v[0]() is not None}
        return total, on_cuda

    def count_slots(self, pairs: Iterable[tuple[torch.Tensor, int]], own: list[int]) -> tuple[int, int]:
        """``count`` of ``(tensor, module slot)`` pairs that also adds each unique storage's bytes to ``own[slot]``
        of the first pair holding it. The total is ``count``'s (unique storages do not depend on the order), so a
        module breakdown always adds up to the phase's figure."""
        cache = self._cache
        seen: set[_Key] = set()
        total = on_cuda = 0
        for t, slot in pairs:
            hit = cache.get(id(t))
            if hit is None or hit[0]() is not t:
                hit = self._fill(t)
            k = hit[1]
            if k in seen:
                continue
            seen.add(k)
            total += hit[2]
            own[slot] += hit[2]
            if hit[3]:
                on_cuda += hit[2]
        return total, on_cuda


# -- accelerate's dispatched models ------------------------------------------------------------------------------
# ``from_pretrained`` with a device map that has CPU (or disk) parts hands the model to accelerate, which moves
# those modules' weights to the meta device and attaches an ``AlignDevicesHook`` that brings them to its
# ``execution_device`` for each forward, from its ``weights_map``. A meta tensor has no storage (its data
# pointer is 0), so counting storages would collapse every offloaded weight into one key, and asking a meta
# parameter where the model runs answers "meta". These helpers read where the weights really are.


def hooks_of(module: Any) -> list[Any]:
    """accelerate's hooks on one module (a ``SequentialHook`` holds several), or none."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    inner = getattr(hook, "hooks", None)
    return list(inner) if isinstance(inner, (list, tuple)) else [hook]


def as_device(where: Any) -> torch.device | None:
    """A torch device from a device-map value or a hook's execution device (an int is a CUDA index)."""
    if where is None or isinstance(where, bool):
        return None
    if isinstance(where, torch.device):
        return where
    if isinstance(where, int):
        return torch.device("cuda", where)
    try:
        return torch.device(str(where))
    except (RuntimeError, ValueError):  # "disk" is a device-map value, not a device
        return None


def hook_execution_device(module: Any) -> torch.device | None:
    """Where accelerate runs this module (and sends its inputs), if a hook on it says so."""
    for h in hooks_of(module):
        dev = as_device(getattr(h, "execution_device", None))
        if dev is not None and dev.type != "meta":
            return dev
    return None


def _owner_chain(name: str) -> list[str]:
    """Module names from a tensor's owner up to the root: ``a.b.w`` -> ``["a.b", "a", ""]``."""
    parts = name.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)] + [""]


def param_device(model: Any, name: str, modules: Mapping[str, Any] | None = None) -> torch.device | None:
    """Where the parameter ``name`` takes part in the forward: its own device, or (offloaded to the meta device)
    the execution device of the nearest accelerate hook above it, or the ``hf_device_map`` entry covering it.

    None when nothing says (a meta parameter nobody will materialise).
    """
    p = model.get_parameter(name)
    if p.device.type != "meta":
        return p.device
    modules = dict(model.named_modules()) if modules is None else modules
    for owner in _owner_chain(name):
        dev = hook_execution_device(modules.get(owner))
        if dev is not None:
            return dev
    dm = getattr(model, "hf_device_map", None)
    if isinstance(dm, Mapping):
        for owner in _owner_chain(name):
            if owner in dm:
                dev = as_device(dm[owner])
                if dev is not None and dev.type not in ("meta", "cpu"):
                    return dev
    return None


def execution_device(model: Any) -> torch.device | None:
    """Where the model runs: its first parameter's device, looking through accelerate's offloading (never meta).

    None for a model without parameters. The callbacks decide "on CUDA or not" from this: a model whose first
    module is offloaded to the host still runs on its GPU.
    """
    names = [n for n, _ in model.named_parameters()]
    if not names:
        return None
    modules = dict(model.named_modules())
    for name in names:
        dev = param_device(model, name, modules)
        if dev is not None:
            return dev
    return torch.device("cpu")


@dataclass(frozen=True)
class Offloaded:
    """A parameter on the meta device, and where its weights really are."""

    name: str
    where: str  # "cpu" (host RAM, or the device of the tensor the hook loads from), "disk", or "meta" (nowhere)
    nbytes: int  # numel x element size (for "cpu", the tensor's storage is what ``tensor`` holds)
    tensor: torch.Tensor | None  # the in-memory copy the hook loads from; None on disk or nowhere


def _weights_source(weights_map: Any, key: str) -> tuple[torch.Tensor | None, Mapping[str, Any] | None]:
    """(in-memory tensor, disk index entry) for ``key`` in a hook's weights map, without loading anything from disk."""
    for _ in range(32):  # accelerate's PrefixedDataset: a prefix over the model-wide map
        prefix, inner = getattr(weights_map, "prefix", None), getattr(weights_map, "dataset", None)
        if not isinstance(prefix, str) or inner is None:
            break
        key, weights_map = prefix + key, inner
    state_dict, index = getattr(weights_map, "state_dict", None), getattr(weights_map, "index", None)
    if isinstance(state_dict, Mapping) and isinstance(index, Mapping):  # accelerate's OffloadedWeightsLoader
        t = state_dict.get(key)
        if isinstance(t, torch.Tensor):
            return t, None
        info = index.get(key)
        return None, info if isinstance(info, Mapping) else {}
    if isinstance(weights_map, Mapping):  # a plain state dict (cpu_offload, a hook's own copy)
        t = weights_map.get(key)
        return (t, None) if isinstance(t, torch.Tensor) else (None, None)
    return None, None


def _itemsize(info: Mapping[str, Any] | None, fallback: torch.dtype) -> int:
    dtype = getattr(torch, str((info or {}).get("dtype", "")), None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else fallback.itemsize


def offloaded_params(model: Any) -> list[Offloaded]:
    """Every parameter on the meta device, with where accelerate keeps its weights (see the section comment)."""
    out: list[Offloaded] = []
    modules: dict[str, Any] | None = None
    for name, p in model.named_parameters():
        if p.device.type != "meta":
            continue
        if modules is None:
            modules = dict(model.named_modules())
        numel_bytes = p.numel() * p.dtype.itemsize
        found: Offloaded | None = None
        for owner in _owner_chain(name):
            for h in hooks_of(modules.get(owner)):
                wm = getattr(h, "weights_map", None)
                if not getattr(h, "offload", False) or wm is None:
                    continue
                tensor, info = _weights_source(wm, name[len(owner) + 1 :] if owner else name)
                if tensor is not None:
                    found = Offloaded(name, str(tensor.device), tensor.untyped_storage().nbytes(), tensor)
                elif info is not None:
                    found = Offloaded(name, "disk", p.numel() * _itemsize(info, p.dtype), None)
                if found is not None:
                    break
            if found is not None:
                break
        out.append(found or Offloaded(name, "meta", numel_bytes, None))
    return out


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

    def note(self, t: torch.Tensor, module: Any = None) -> None:
        """Count a tensor autograd keeps by other means (an activation-checkpointing input of ``module``)."""
        self._refs.append(weakref.ref(t))

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


def _live(refs: list[weakref.ref[torch.Tensor]]) -> tuple[list[torch.Tensor], list[bool] | None]:
    """The tensors of ``refs`` still alive, and which entries those are (None: all of them), by C-level passes.

    ``is not None`` through ``operator.is_not``: ``list.count(None)`` would compare each tensor with ``==``, an op.
    """
    alive = list(map(call, refs))
    keep = list(map(is_not, alive, itertools.repeat(None)))
    if all(keep):
        return alive, None
    return list(itertools.compress(alive, keep)), keep


class CountingSavedTensorTracker(SavedTensorTracker):
    """A tracker for real tensors that counts, at a boundary, the storages of the saved tensors still alive.

    The hook does the least it can per saved tensor: a parameter (or a view of one: a linear saves
    ``weight.t()``, a third of a forward's saves) is saved as it is, never an activation; any other tensor is
    saved as a detached alias the tracker references weakly. A boundary asks which aliases live and keys their
    storages in C-level passes (``_keys_and_sizes``, ``_unique_totals``), so no Python code runs per tensor
    there. The estimator keeps the plain tracker: fake tensors have no storage address to key.

    With a ``ModuleMap`` attached (``where``, set by the probe on the steps it records in full), each saved tensor
    also remembers the module running when it was saved (one attribute read in the hook: the map keeps the
    innermost module's slot current), so a boundary can split the activations by module.

    The hooks run inside the user's forward, so they never raise: a tensor that is not a plain strided tensor
    (sparse, a subclass) is keyed when it is saved, and one whose storage cannot be read is remembered as a
    failure that ``count`` raises at the next boundary, where the callers turn it into "phase recording stopped".
    Sizes are the storages' at the boundary (a storage freed with ``resize_(0)`` counts 0), except for those
    keyed when saved.
    """

    def __init__(self) -> None:
        super().__init__()
        # Whether the forward that follows counts what it saves: the probe turns it off for the steps it does not
        # record in full (``PhaseProbe.full_step``), and ``track`` then installs no hook at all.
        self.enabled = True
        # Saved aliases, oldest first: without a module slot (a step not recorded in full), with one, and the few
        # keyed when saved (weak reference, storage key, storage bytes, slot). Each object the hook keeps counts
        # towards the cyclic GC's next collection: one weak reference per tensor on most steps.
        self._wrefs: list[weakref.ref[torch.Tensor]] = []
        self._slotted: list[tuple[weakref.ref[torch.Tensor], int]] = []
        self._keyed: list[tuple[weakref.ref[torch.Tensor], _Key, int, int]] = []
        # Parameters (by id: the probe holds them, so an id is never reused) are saved as they are: their storages
        # are never activations.
        self.param_ids: frozenset[int] = frozenset()
        self.failure: str | None = None
        self.where: ModuleMap | None = None

    def _add(self, t: torch.Tensor, slot: int) -> None:
        if type(t) is torch.Tensor and t.layout is torch.strided:
            self._slotted.append((weakref.ref(t), slot))
            return
        try:
            st = t.untyped_storage()
            self._keyed.append((weakref.ref(t), (t.get_device(), st.data_ptr()), st.nbytes(), slot))
        except Exception as e:  # noqa: BLE001 - reported at the boundary, never inside the forward
            if self.failure is None:
                self.failure = f"cannot read the storage of a saved {type(t).__name__} ({type(e).__name__}: {e})"

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # This runs for every tensor saved in every forward: the common path is a few attribute reads, a detach,
        # a weak reference and an append.
        params = self.param_ids
        try:
            if id(t) in params or id(t._base) in params:  # a parameter, or a view of one (a linear's ``weight.t()``)
                return t
        except Exception:  # noqa: BLE001, S110 - a subclass without ``_base``: an activation like any other
            pass
        alias = t.detach()
        where = self.where
        if type(alias) is not torch.Tensor or alias.layout is not torch.strided:
            self._add(alias, -1 if where is None else where.current)
        elif where is None:
            self._wrefs.append(weakref.ref(alias))
        else:
            self._slotted.append((weakref.ref(alias), where.current))
        return alias

    def note(self, t: torch.Tensor, module: Any = None) -> None:
        if not self.enabled:
            return
        where = self.where
        self._add(t, -1 if where is None else where.slot_of(module))

    @contextmanager
    def track(self) -> Iterator[None]:
        """Count what the forward saves, or (a step not counted in full) run it with no hook: torch's own cost of
        calling a Python hook for each saved tensor, in forward and again in backward, is most of the probes'."""
        if not self.enabled:
            yield
            return
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def forget(self) -> None:
        """Drop every saved tensor remembered: the steps that follow are not counted."""
        self._wrefs, self._slotted, self._keyed = [], [], []

    def alive(self) -> Iterator[torch.Tensor]:
        for r in itertools.chain(self._wrefs, (e[0] for e in self._slotted), (e[0] for e in self._keyed)):
            t = r()
            if t is not None:
                yield t

    def _live_entries(self) -> tuple[list[torch.Tensor], list[int]]:
        """The live plain aliases and their slots (-1: none), oldest first; dead entries are dropped."""
        tensors: list[torch.Tensor] = []
        slots: list[int] = []
        if self._wrefs:
            tensors, keep = _live(self._wrefs)
            if keep is not None:
                self._wrefs = list(itertools.compress(self._wrefs, keep))
            slots = [-1] * len(tensors)
        if self._slotted:
            refs, saved_slots = zip(*self._slotted, strict=True)
            alive, keep = _live(list(refs))
            if keep is not None:
                self._slotted = list(itertools.compress(self._slotted, keep))
                saved_slots = tuple(itertools.compress(saved_slots, keep))
            tensors += alive
            slots += saved_slots
        return tensors, slots

    def count(self, exclude: set[_Key], own: list[int] | None = None) -> tuple[int, int]:
        """(total bytes, bytes on CUDA) of the unique live saved storages, ``exclude`` (parameters) left out.

        ``own``: each storage's bytes are also added to the slot of the module that saved it first (the root's,
        0, for one saved outside every module). Without it the count runs no Python code per tensor."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        tensors, slots = self._live_entries()
        try:
            keys, sizes = _keys_and_sizes(tensors)
        except Exception as e:  # noqa: BLE001 - a tensor changed since it was saved: stop recording, clearly
            self.failure = f"cannot read the storage of a saved tensor ({type(e).__name__}: {e})"
            raise RuntimeError(self.failure) from e
        if self._keyed:
            self._keyed = [e for e in self._keyed if e[0]() is not None]
            for _ref, k, n, slot in self._keyed:
                keys.append(k)
                sizes.append(n)
                slots.append(slot)
        if not keys:
            return 0, 0
        if own is None:
            return _unique_totals(keys, sizes, exclude)
        seen: set[_Key] = set()
        total = on_cuda = 0
        for k, n, slot in zip(keys, sizes, slots, strict=True):
            if k in seen or k in exclude:
                continue
            seen.add(k)
            total += n
            own[slot] += n
            if k[0] >= 0:
                on_cuda += n
        return total, on_cuda


def unwrap_model(model: Any) -> tuple[Any, list[Any]]:
    """The transformers model inside DDP's, DeepSpeed's and PEFT's wrappers, and the wrappers (outermost first).

    Module paths are taken from the model itself, so a run with LoRA or DDP names the same modules as a plain one
    (the wrappers' prefixes, ``module.`` and ``base_model.model.``, never appear).
    """
    wrappers: list[Any] = []
    for _ in range(8):
        inner = None
        if type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine", "FullyShardedDataParallel"):
            inner = getattr(model, "module", None)
        elif type(model).__module__.startswith("peft"):
            base = getattr(model, "base_model", None)
            inner = getattr(base, "model", None) if base is not None else None
        if not isinstance(inner, torch.nn.Module):
            break
        wrappers.append(model)
        model = inner
    return model, wrappers


# The frames of ``nn.Module.__call__`` in a traceback: their ``self`` is the module being called.
_CALL_FRAMES = frozenset({"_call_impl", "_wrapped_call_impl"})


class ModuleMap:
    """Which module of the model's tree each tensor belongs to, and which module is running now (issue 12).

    The tree (``core.modules.tree_names``) is the model's modules down to ``depth`` levels. Every module of the
    model gets the slot of its deepest ancestor in the tree, and so does every parameter (tied weights: the
    first name ``named_parameters()`` gives). What runs is followed with a forward pre-hook and a forward hook on
    the tree's modules only (two Python calls per module call: at the default depth a few dozen per step), which
    keep ``current`` (the innermost running module's slot) for the saved-tensor hook to read; the modules one
    level below the tree are hooked too, under their tree ancestor's slot, because a model may call a grandchild
    directly and skip its tree parent's forward. For the backward
    pass the forward hook registers a pre-hook on each output's autograd node, which sets ``current`` when the
    backward reaches that module: an out-of-memory error in backward names the module whose backward was entered
    last. ``current`` is ``-1`` outside every module: the probe's slot lists have one more entry at the end,
    which the boundary folds into the root's.

    The hooks are needed only on the steps the probe records in full: ``detach`` removes them (a module without
    hooks takes ``nn.Module``'s fast call path) and ``attach`` puts them back. While detached, ``running`` reads
    the module from an exception's traceback instead (``running_in``): exact in forward, where every module
    called is a frame; in backward only a recomputed (activation-checkpointed) layer is, so an out-of-memory
    error in the backward of such a step names no module.
    """

    def __init__(self, model: Any, depth: int) -> None:
        from blipmon.core.modules import below_tree, owner_index, tree_names, tree_parents

        root, wrappers = unwrap_model(model)
        named = list(root.named_modules())
        self.depth = depth
        self.names: list[str] = tree_names([n for n, _ in named], depth)
        self.parents = tree_parents(self.names)
        index = {n: i for i, n in enumerate(self.names)}
        self._module_slot: dict[int, int] = {}
        for n, m in named:
            self._module_slot.setdefault(id(m), owner_index(self.names, n, index))
        self._call_slot = dict(self._module_slot)  # what a traceback's module calls map to: the wrappers too
        for w in wrappers:
            self._call_slot.setdefault(id(w), 0)
        self.param_slot: dict[int, int] = {}
        for n, prm in root.named_parameters():
            self.param_slot.setdefault(id(prm), owner_index(self.names, n, index))
        self.param_names = {id(prm): n for n, prm in root.named_parameters()}
        self.current = -1
        self._stack: list[int] = []
        self._claimed: set[int] = set()
        self._handles: list[Any] = []
        # What ``attach`` hooks: (module, slot, whether it is below the tree).
        self._specs: list[tuple[Any, int, bool]] = []
        by_name = dict(named)
        hooked: set[int] = set()
        for w in [*wrappers, root]:  # a wrapper calls the model's forward directly (PEFT): its call is the root's
            self._spec(w, 0, hooked)
        for i, n in enumerate(self.names):
            if i:
                self._spec(by_name[n], i, hooked)
        # One level below the tree too, under its parent's slot: a model may call a grandchild directly
        # (``OPTForCausalLM`` runs ``self.model.decoder``, never ``self.model``), and its work is still its
        # ancestor's.
        # After two forwards, ``prune`` removes those that only ever ran inside their tree parent (most of them).
        self._frontier: dict[int, list[Any]] = {}
        self._skipping: set[int] = set()  # frontier modules seen running outside their tree parent
        for n, m in named:
            if n and below_tree(n, index):
                self._spec(m, self._module_slot[id(m)], hooked, frontier=True)
        self._forwards = 0
        self._on_backward = [self._backward_setter(i) for i in range(len(self.names))]
        self.attached = False
        self.attach()

    def __len__(self) -> int:
        return len(self.names)

    def _spec(self, module: Any, slot: int, hooked: set[int], *, frontier: bool = False) -> None:
        if id(module) in hooked:
            return
        hooked.add(id(module))
        self._specs.append((module, slot, frontier))
        if frontier:
            self._frontier[id(module)] = []

    def _hook(self, module: Any, slot: int, *, frontier: bool = False) -> list[Any]:
        key = id(module)

        def enter(_m: Any, _args: Any) -> None:
            if frontier and self.current != slot:
                self._skipping.add(key)
            self._stack.append(self.current)
            self.current = slot

        def leave(_m: Any, _args: Any, out: Any) -> None:
            stack = self._stack
            self.current = stack.pop() if stack else -1
            if torch.is_grad_enabled():
                self._watch_backward(out, slot)

        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def attach(self) -> None:
        """Hook the tree's modules (and the frontier below it that ``prune`` kept); a no-op when attached."""
        if self.attached:
            return
        for module, slot, frontier in self._specs:
            if frontier and id(module) not in self._frontier:
                continue  # pruned: it only ever ran inside its tree parent
            handles = self._hook(module, slot, frontier=frontier)
            self._handles.extend(handles)
            if frontier:
                self._frontier[id(module)] = handles
        self.attached = True

    def detach(self) -> None:
        """Remove every hook (until ``attach``): the steps not recorded in full run the model as if unwatched."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for key in self._frontier:
            self._frontier[key] = []
        self.attached = False
        self.current = -1
        self._stack.clear()

    def _backward_setter(self, slot: int) -> Callable[..., None]:
        def entered(_grads: Any) -> None:
            self.current = slot

        return entered

    def _watch_backward(self, out: Any, slot: int) -> None:
        """Mark where backward enters this module: the autograd nodes of its outputs (the innermost module claims a
        node an enclosing module returns as well)."""
        if isinstance(out, torch.Tensor):
            tensors: Iterable[Any] = (out,)
        elif isinstance(out, (tuple, list)):
            tensors = out
        elif isinstance(out, Mapping):
            tensors = out.values()
        else:
            return
        claimed = self._claimed
        for t in tensors:
            fn = getattr(t, "grad_fn", None) if isinstance(t, torch.Tensor) else None
            if fn is not None and id(fn) not in claimed:
                claimed.add(id(fn))
                fn.register_prehook(self._on_backward[slot])

    def slot_of(self, module: Any) -> int:
        """The slot of ``module`` (an activation-checkpointed layer), or the running module's for an unknown one."""
        return self._module_slot.get(id(module), self.current) if module is not None else self.current

    def reset(self, after_forward: bool = False) -> None:
        """At a boundary: nothing runs between passes (an exception may have left the stack unwound).

        After the second forward, the hooks one level below the tree that were never needed go."""
        self.current = -1
        self._stack.clear()
        self._claimed.clear()
        if after_forward:
            self._forwards += 1
            if self._forwards == 2:
                self.prune()

    def prune(self) -> None:
        """Remove the hooks of the modules below the tree that always ran inside their tree parent's forward."""
        for key, handles in list(self._frontier.items()):
            if key not in self._skipping:
                for h in handles:
                    h.remove()
                del self._frontier[key]

    def running(self, exc: BaseException | None = None) -> str | None:
        """The innermost module running (its tree path), None outside every module.

        Detached (a step not recorded in full), the module comes from the traceback of ``exc`` (default: the
        exception being handled, ``sys.exc_info()``), see ``running_in``."""
        if not self.attached:
            return self.running_in(exc if exc is not None else sys.exc_info()[1])
        return self.names[self.current] if 0 <= self.current < len(self.names) else None

    def running_in(self, exc: BaseException | None) -> str | None:
        """The innermost module of the tree whose call is a frame of ``exc``'s traceback; None for none.

        ``nn.Module.__call__`` is a frame (``_call_impl``) whose ``self`` is the module called, so a forward's
        traceback lists every module entered, outermost first."""
        slot = -1
        tb: TracebackType | None = exc.__traceback__ if exc is not None else None
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code.co_name in _CALL_FRAMES:
                found = self._call_slot.get(id(frame.f_locals.get("self")))
                if found is not None:
                    slot = found
            tb = tb.tb_next
        return self.names[slot] if slot >= 0 else None

    def remove(self) -> None:
        """Remove every hook for good (``close``): ``attach`` then hooks nothing."""
        self.detach()
        self._specs = []


class HostRss:
    """This process's resident memory, read four times per micro-step, so cheaply.

    psutil opens, reads and closes ``/proc/<pid>/statm`` each time (30-140 us here, a visible share of a small
    model's step); on Linux the file stays open and is re-read in place (about 2 us). Elsewhere, psutil.
    """

    def __init__(self) -> None:
        self._pid = -1
        self._fd: int | None = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._proc: psutil.Process | None = None  # set by _open on the first read, like the file

    def __call__(self) -> int:
        pid = os.getpid()
        if pid != self._pid:  # first call, or a forked child: the file was opened by another process
            self._open(pid)
        if self._fd is not None:
            try:
                return int(os.pread(self._fd, 256, 0).split()[1]) * self._page
            except (OSError, ValueError, IndexError):
                self.close()
        return int((self._proc or psutil.Process()).memory_info().rss)

    def _open(self, pid: int) -> None:
        self.close()  # the parent's file, inherited through fork
        self._pid = pid
        self._proc = psutil.Process(pid)
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._fd = None

    def close(self) -> None:
        """Give the file back; a later read opens it again."""
        fd, self._fd = self._fd, None
        self._pid = -1
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.close()


def track_checkpoint_inputs(
    model: Any, tracker: SavedTensorTracker, on_note: Callable[[torch.Tensor], None] | None = None
) -> int:
    """Make activation checkpointing's kept inputs visible to the saved-tensor count.

    Non-reentrant checkpointing hides a layer's saved tensors behind its own hooks and keeps only
    the layer's inputs until backward recomputes it. Those inputs are exactly the activations
    checkpointing still costs, so each module's checkpoint function is wrapped to note them
    (``on_note`` also sees each one: the estimator marks them in its own ledger). Returns the number
    of modules wrapped.
    """
    wrapped = 0
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is None or getattr(func, "_blipmon_wrapped", False):
            continue

        def noting(*args: Any, __func: Any = func, __module: Any = module, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                for a in args:
                    if isinstance(a, torch.Tensor):
                        tracker.note(a, __module)
                        if on_note is not None:
                            on_note(a)
            return __func(*args, **kwargs)

        noting._blipmon_wrapped = True  # type: ignore[attr-defined]
        module._gradient_checkpointing_func = noting
        wrapped += 1
    return wrapped


class PhaseProbe:
    """Takes the four-phase measurements and writes them as ``phase`` events.

    ``emit`` is the event sink (the profile writer's ``write``), injected so the probe can be
    tested without files and reused by the Trainer and Lightning callbacks.

    On CUDA the allocator figures (``allocated``, ``reserved``, ``peak`` and the peak resets) cover every GPU
    the model occupies (``allocator.model_cuda_devices``), summed, with each GPU's own figures under ``devices``
    when there are several: ``other`` subtracts the categories' bytes on every GPU, so it must be compared with
    every GPU's allocations. Each boundary asks the allocator once per device (one ``memory_stats``) and never
    synchronizes: the allocator's counters are kept on the host.
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
        extra_grads: Callable[[], Iterable[torch.Tensor]] | None = None,
        optim_state: Callable[[], Iterable[torch.Tensor]] | None = None,
        host_split: bool = False,
        devices: Sequence[int] | None = None,
        memory_stats: Callable[[int], Mapping[str, Any]] | None = None,
        reset_peak: Callable[[int], None] | None = None,
        module_depth: int = 0,
        module_every: int = 1,
    ) -> None:
        """``extra_grads``/``optim_state`` say where gradients and optimizer memory live when a strategy
        (DeepSpeed ZeRO) keeps them outside ``.grad`` and ``optimizer.state``; ``host_split`` adds the
        bytes of each that sit in host RAM (``grads_host``, ``optim_host``), as the lab's offload row prints.

        ``devices`` (CUDA indices) overrides the GPUs found on the model; ``memory_stats``/``reset_peak``
        replace ``torch.cuda.memory_stats``/``reset_peak_memory_stats`` (tests: several GPUs cannot exist here).

        ``module_depth`` > 0 splits the four categories by module (``ModuleMap``) at every boundary of the steps
        recorded in full: steps 0 and 1 and every ``module_every``-th step; each such boundary writes a ``modules``
        record after its ``phase`` record (and the rank's ``module_tree`` before the first).
        """
        self.model = model
        self._extra_grads = extra_grads
        self._optim_state = optim_state or (lambda: optimizer_tensors(self.optimizer))
        self._optim_state_custom = optim_state is not None
        self.host_split = host_split
        self.emit = emit
        self.optimizer = optimizer
        self.rank = rank
        self.cuda = cuda
        self.cuda_device = cuda_device
        self._fixed_devices = list(devices) if devices is not None else None
        self.devices: list[int] = []
        self._stats = memory_stats
        self._reset = reset_peak
        self.saved = CountingSavedTensorTracker()
        self._rss = HostRss()
        self._counter = StorageCounter()
        self.module_every = max(1, int(module_every))
        self.modules: ModuleMap | None = ModuleMap(model, module_depth) if module_depth > 0 else None
        self.saved.where = self.modules  # until the first boundary says whether its step is recorded in full
        self._tree_sent: list[str] | None = None
        self._split = False  # set by ``boundary`` for a boundary recorded in full
        self._params_own: list[int] = []
        self._optim_own: list[int] | None = None
        self._params: list[torch.nn.Parameter] = []
        self._param_keys: set[_Key] = set()
        self._params_total = 0
        self._params_cuda = 0
        self.refresh_params()
        # Optimizer state only changes inside step(): count it again only after a step.
        self._optim_bytes = (0, 0)
        self._optim_dirty = True
        self._grads_seen = _SameTensors()  # the gradients last counted, and their bytes
        self._optim_seen = _SameTensors()  # the optimizer state last counted, and its bytes
        self._optim_hooked = False
        if optimizer is not None and hasattr(optimizer, "register_step_post_hook"):
            optimizer.register_step_post_hook(self._mark_optim_dirty)
            self._optim_hooked = True

    def _mark_optim_dirty(self, *_args: Any) -> None:
        self._optim_dirty = True

    def refresh_params(self) -> None:
        """Recount parameter storages (after a cast, a move or wrapping with LoRA), and the GPUs they occupy.

        A parameter accelerate offloaded to the meta device counts at its real home (the host copy its hook
        loads from); one offloaded to disk is in no memory and is left out, as is a meta parameter nothing holds.
        """
        params = list(self.model.parameters())
        self._params = params
        real = [p for p in params if p.device.type != "meta"]
        keys: set[_Key] = set()
        for p in real:
            keys.add(_key(p)[0])
        self._param_keys = keys
        self.saved.param_ids = frozenset(map(id, real))  # ``self._params`` holds them: no id is reused
        host = (
            [o.tensor for o in offloaded_params(self.model) if o.tensor is not None] if len(real) < len(params) else []
        )
        self._params_total, self._params_cuda = storage_bytes(itertools.chain(real, host))
        if self.modules is not None:
            self._params_own = self._param_slots(real, len(real) < len(params))
        if self._fixed_devices is not None:
            self.devices = list(self._fixed_devices)
        elif self.cuda:
            default = self.cuda_device if self.cuda_device is not None else torch.cuda.current_device()
            self.devices = allocator.model_cuda_devices(self.model, default=default)
        else:
            self.devices = []

    def _param_slots(self, real: list[torch.nn.Parameter], offloaded: bool) -> list[int]:
        """Each module's own parameter bytes, adding up to the parameters' figure exactly.

        A storage held by one parameter (or by tied ones: the same bytes) belongs to its first owner. A storage that
        several parameters view in distinct regions (DeepSpeed's flat buffers) is split: each region to its
        parameter's module, what no parameter views (alignment padding) to the root. Host copies of parameters
        accelerate offloaded count at their parameter's module.
        """
        mm = self.modules
        assert mm is not None
        from blipmon.core.modules import owner_index

        pairs: list[tuple[torch.Tensor, int]] = [(q, mm.param_slot.get(id(q), 0)) for q in real]
        if offloaded:
            index = {n: i for i, n in enumerate(mm.names)}
            root_model, _ = unwrap_model(self.model)
            for o in offloaded_params(root_model):
                if o.tensor is not None:
                    pairs.append((o.tensor, owner_index(mm.names, o.name, index)))
        own = [0] * len(mm)
        storages: dict[_Key, tuple[int, list[tuple[int, int, int]]]] = {}
        for t, slot in pairs:
            k, nbytes, _cuda = _key(t)
            region = (t.data_ptr(), t.numel() * t.element_size(), slot)
            entry = storages.setdefault(k, (nbytes, []))
            entry[1].append(region)
        for nbytes, regions in storages.values():
            distinct: dict[tuple[int, int], int] = {}
            for start, size, slot in regions:
                distinct.setdefault((start, size), slot)
            spans = sorted(distinct)
            overlap = any(a[0] + a[1] > b[0] for a, b in itertools.pairwise(spans))
            viewed = sum(size for _start, size in spans)
            if len(distinct) == 1 or overlap or viewed > nbytes:
                own[regions[0][2]] += nbytes
                continue
            for (_start, size), slot in distinct.items():
                own[slot] += size
            own[0] += nbytes - viewed
        return own

    def full_step(self, step: int) -> bool:
        """Whether ``step`` is recorded in full: steps 0 and 1, then every ``module_every``-th.

        Such a step counts its saved activations (and, with a module map, splits every category by module); the
        others record the allocator's figures, host RSS, params, grads and optimizer state, with ``acts`` (and
        ``other``, which needs it) null: the saved-tensor hook is most of what the probes cost (docs/modules.md,
        "What it costs")."""
        return step < 2 or step % self.module_every == 0

    def running_module(self, exc: BaseException | None = None) -> str | None:
        """The innermost module running now (for an out-of-memory record); None outside every module or untracked.

        On a step not recorded in full the module hooks are off: the module is read from the traceback of ``exc``
        (default: the exception being handled), ``ModuleMap.running``."""
        return self.modules.running(exc) if self.modules is not None else None

    def start_interval(self) -> None:
        """Reset every GPU's peak: the next boundary's ``peak`` then covers only what happened since.

        Called once setup is over (loading, quantization, DeepSpeed's flattening), right before the first
        ``before_fwd``: without it step 0's first peak would be the process's lifetime peak. The load peak is
        recorded on its own, before this.
        """
        if self.cuda:
            allocator.reset_peaks(self.devices, reset=self._reset)

    def measure(self, split: bool | None = None, *, counted: bool = True) -> dict[str, Any]:
        """The four categories and the allocator's figures now; with ``split`` (default: whether ``boundary``
        records this step in full) and a module map, also each module's own bytes per category under ``"_own"``
        (not written: ``boundary`` turns them into a ``modules`` record).

        ``counted=False`` (a step not recorded in full) reads only what costs nothing per tensor: the allocator's
        figures, host RSS and the parameters' bytes (counted when they last changed, ``refresh_params``);
        ``grads``, ``optim``, ``acts`` and ``other`` are null. Touching every gradient and optimizer tensor at
        four boundaries a step, right after the step's own work has flushed them from the CPU's caches, was
        itself 2-3 % of the tiny model's step (BENCHMARKS.md)."""
        rec: dict[str, Any] = {
            "params": self._params_total,
            "grads": None,
            "optim": None,
            "acts": None,
            "other": None,
            "allocated": None,
            "peak": None,
            "reserved": None,
            "host_rss": self._rss(),
        }
        own: dict[str, list[int]] | None = None
        cuda_counted = 0
        if counted:
            mm = self.modules if (self._split if split is None else split) else None
            own = {"grads": [0] * (len(mm) + 1), "acts": [0] * (len(mm) + 1)} if mm is not None else None
            g_total, g_cuda = self._count_grads(mm, own)
            o_total, o_cuda = self._count_optim(mm)
            a_total, a_cuda = self.saved.count(self._param_keys, own["acts"] if own is not None else None)
            rec.update(grads=g_total, optim=o_total, acts=a_total)
            cuda_counted = self._params_cuda + g_cuda + o_cuda + a_cuda
            if self.host_split:
                rec["grads_host"] = g_total - g_cuda
                rec["optim_host"] = o_total - o_cuda
        if self.cuda:
            reading = allocator.read(self.devices, stats=self._stats)
            rec.update(reading.as_record())
            if counted:  # uncounted, it would be "whatever is left", which blipmon never reports
                rec["other"] = reading.allocated - cuda_counted
            # The next boundary's peak covers exactly the interval since this one.
            allocator.reset_peaks(self.devices, reset=self._reset)
        if own is not None and self._optim_own is not None:
            own["optim"] = list(self._optim_own)
            own["params"] = [*self._params_own, 0]
            rec["_own"] = own
        return rec

    def _count_grads(self, mm: ModuleMap | None, own: dict[str, list[int]] | None) -> tuple[int, int]:
        """(total, on CUDA) of the gradients; with a module map, each module's own bytes into ``own["grads"]``."""
        if mm is not None and own is not None:
            slot = mm.param_slot
            pairs: Iterable[tuple[torch.Tensor, int]] = (
                (p.grad, slot.get(id(p), 0)) for p in self._params if p.grad is not None
            )
            if self._extra_grads is not None:  # a strategy's own buffers (ZeRO's partitions) are every module's
                pairs = itertools.chain(pairs, ((g, 0) for g in self._extra_grads()))
            return self._counter.count_slots(pairs, own["grads"])
        # No Python code per gradient: one C-level pass collects them, and the count stands while they are the
        # same objects (after backward until zero_grad; none at all before it).
        grads = list(filter(_not_none, map(_grad_of, self._params)))
        if self._extra_grads is not None:
            grads.extend(self._extra_grads())
        return self._grads_seen.count(grads)

    def _count_optim(self, mm: ModuleMap | None) -> tuple[int, int]:
        """(total, on CUDA) of the optimizer state, recounted only after a step; with a module map, each module's
        own bytes are kept in ``_optim_own``."""
        if mm is not None and (self._optim_dirty or not self._optim_hooked or self._optim_own is None):
            optim_own = [0] * (len(mm) + 1)
            self._optim_bytes = self._counter.count_slots(self._optim_pairs(mm), optim_own)
            self._optim_own = optim_own
            self._optim_dirty = False
        elif self._optim_dirty or not self._optim_hooked:
            # After a step: the state tensors are usually the same objects, updated in place.
            self._optim_bytes = self._optim_seen.count(self._optim_list())
            self._optim_own = None
            self._optim_dirty = False
        return self._optim_bytes

    def _optim_list(self) -> list[torch.Tensor]:
        """``optimizer_tensors`` as a list, by C-level iteration when every state is a dict (torch's and
        bitsandbytes' optimizers), in the same order."""
        if self._optim_state_custom:
            return list(self._optim_state())
        opt = self.optimizer
        if opt is None:
            return []
        try:
            values = list(itertools.chain.from_iterable(map(dict.values, opt.state.values())))
        except TypeError:  # a state that is not a dict
            return list(optimizer_tensors(opt))
        return list(filter(_is_tensor, values))

    def _optim_pairs(self, mm: ModuleMap) -> Iterator[tuple[torch.Tensor, int]]:
        """Optimizer state tensors with the slot of the parameter they belong to (a strategy's own state: root)."""
        if self._optim_state_custom:
            for t in self._optim_state():
                yield t, 0
            return
        opt = self.optimizer
        if opt is None:
            return
        slot = mm.param_slot
        for p, state in opt.state.items():
            if isinstance(state, dict):
                s = slot.get(id(p), 0)
                for v in state.values():
                    if isinstance(v, torch.Tensor):
                        yield v, s

    def boundary(self, phase: str, step: int, micro_step: int) -> dict[str, Any]:
        mm = self.modules
        full = self.full_step(step)
        if mm is not None:
            mm.reset(after_forward=phase == "after_fwd")
            if full != mm.attached:  # the module hooks run only on the steps recorded in full
                if full:
                    mm.attach()
                else:
                    mm.detach()
            self.saved.where = mm if full else None
        if full != self.saved.enabled:  # the saved-tensor hook, likewise (for the forward that follows)
            self.saved.enabled = full
            if not full:
                self.saved.forget()
        self._split = full
        try:
            rec = {
                "step": step,
                "micro_step": micro_step,
                "rank": self.rank,
                "phase": phase,
                **self.measure(counted=full),
            }
        finally:
            self._split = False
        own = rec.pop("_own", None)
        self.emit("phase", **rec)
        if own is not None and mm is not None:
            self._emit_modules(mm, own, phase, step, micro_step)
        return rec

    def _emit_modules(self, mm: ModuleMap, own: dict[str, list[int]], phase: str, step: int, micro: int) -> None:
        from blipmon.core.modules import MODULE_CATEGORIES, inclusive

        if self._tree_sent != mm.names:
            self.emit("module_tree", rank=self.rank, depth=mm.depth, modules=mm.names)
            self._tree_sent = list(mm.names)
        lists = {}
        for cat in MODULE_CATEGORIES:
            figures = own[cat]
            outside = figures.pop()
            figures[0] += outside
            lists[cat] = inclusive(mm.parents, figures)
        self.emit("modules", step=step, micro_step=micro, rank=self.rank, phase=phase, **lists)

    def close(self) -> None:
        """Release the open /proc file (a script may train many times in one process) and the module hooks."""
        self._rss.close()
        if self.modules is not None:
            self.modules.remove()


class NullProbe:
    """Same interface, no measurement: the baseline that ``benchmarks/overhead.py`` compares against."""

    def __init__(self) -> None:
        self.saved = self

    @contextmanager
    def track(self) -> Iterator[None]:
        yield

    def refresh_params(self) -> None:
        pass

    def running_module(self, exc: BaseException | None = None) -> str | None:
        return None

    def start_interval(self) -> None:
        pass

    def boundary(self, phase: str, step: int, micro_step: int) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass
