"""Activations computed, not guessed: one training micro-step of the short model on fake tensors.

The short model (``build.short_config``: at most two layers per stack, full width) is converted to fake tensors
(``torch._subclasses.fake_tensor``: shapes, dtypes and storages without memory) and runs the runner's own forward
and backward with the batch shapes of ``blipmon.runner.data``. Three instruments watch it:

- the runner's ``SavedTensorTracker`` (the probe's saved-tensor hooks, parameters excluded, activation-checkpoint
  inputs noted), so "acts" is measured by the same rule as a real run;
- a dispatch mode that sees every storage created, when, and when it dies, giving the live-memory curve through
  forward and backward (temporaries such as fp32 logits and gradient buffers, which the boundaries never see);
- forward hooks on every layer of every stack, so each saved storage is attributed to the layer that saved it first.

``Profile.extrapolate`` then adds the layers the short model left out: per-layer activations and gradients of a
typical layer, times the missing layers of each stack, placed where they would run so that the forward and backward
peaks of the full model are found on the short model's curve.

Only ids, masks and labels are real tensors (a few KB): transformers takes data-dependent decisions on them (an
all-ones padding mask lets SDPA skip the mask), and real values make it take the same decisions as the run.

CUDA runs get CUDA's attention: torch picks a different SDPA kernel on a GPU (flash or memory-efficient, which keep
q, k, v, the output and a log-sum-exp) than on a CPU (often the math path, which upcasts to fp32 and keeps the whole
attention matrix), and its dropout keeps a bool mask where the CPU keeps a full-precision one. ``cuda_semantics``
applies torch's CUDA choices and calls those kernels' fake implementations, so the saved tensors are the GPU's.

Why one module over ~500 lines: the traced step, its three instruments and the extrapolation share the trace's
data structures and must agree storage by storage (the independent reference in tests/reference holds them to it).
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from blipmon.core.config import caption_tokens

_SUPPORTED_DEVICES = ("cpu", "cuda")


def _key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage that works for fake, meta and real tensors alike (the StorageImpl address)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(t.untyped_storage()).cdata


# ----------------------------------------------------------------------------------------------------------------
# Meta model -> fake model


def to_fake(model: Any, mode: Any) -> None:
    """Replace every meta parameter and buffer of ``model`` by a fake CPU tensor, in place.

    bitsandbytes weights are quantized by bitsandbytes' own fake kernels, so a 4-bit weight becomes a packed uint8
    storage with a quant state, as ``from_pretrained`` leaves it; the weight is a plain fake Parameter carrying
    the quant state as an attribute, which is all ``Linear4bit.forward`` reads.
    """
    conv = mode.fake_tensor_converter
    cpu = torch.device("cpu")

    def fake(t: torch.Tensor) -> torch.Tensor:
        return conv.from_meta_and_device(mode, t, cpu)

    memo: dict[int, Any] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in memo:
                memo[id(p)] = _fake_param(p, fake, module)
            module._parameters[name] = memo[id(p)]
        for name, b in list(module._buffers.items()):
            if b is None:
                continue
            if id(b) not in memo:
                memo[id(b)] = fake(b) if b.device.type == "meta" else fake(b.to("meta"))
            module._buffers[name] = memo[id(b)]


def _fake_param(p: torch.nn.Parameter, fake: Any, module: Any) -> torch.nn.Parameter:
    cls = type(p).__name__
    if cls == "Params4bit":
        import bitsandbytes.functional as bf

        with _quiet_warnings():
            packed, state = bf.quantize_4bit(
                fake(torch.empty(p.shape, dtype=torch.float32, device="meta")),
                blocksize=p.blocksize,
                compress_statistics=p.compress_statistics,
                quant_type=p.quant_type,
                quant_storage=p.quant_storage,
            )
        out = torch.nn.Parameter(packed, requires_grad=False)
        out.quant_state = state  # type: ignore[attr-defined]
        out.bnb_quantized = True  # type: ignore[attr-defined]
        if hasattr(module, "quant_state"):
            module.quant_state = state
        return out
    if cls == "Int8Params":
        out = torch.nn.Parameter(fake(torch.empty(p.shape, dtype=torch.int8, device="meta")), requires_grad=False)
        out.CB = out.data  # type: ignore[attr-defined]
        out.SCB = fake(torch.empty(p.shape[0], dtype=torch.float32, device="meta"))  # type: ignore[attr-defined]
        out.has_fp16_weights = False  # type: ignore[attr-defined]
        return out
    return torch.nn.Parameter(fake(p.data), requires_grad=p.requires_grad)


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------------------------------------------
# CUDA attention on fake CPU tensors


@contextlib.contextmanager
def cuda_semantics() -> Iterator[None]:
    """Kernels as torch picks them on an Ampere/Hopper GPU, for the trace's duration.

    Two choices differ between CPU and CUDA in what they keep for backward:

    - ``F.scaled_dot_product_attention`` follows torch's ``sdp_utils`` rules for CUDA: flash attention for
      fp16/bf16 without a mask and head dim <= 256; else memory-efficient attention (fp32 too, masks padded to 16
      keys); else the math path, which upcasts 16-bit inputs to fp32 as it does on every device. cuDNN attention
      is not chosen by default.
    - ``F.dropout`` in training is the fused ``native_dropout`` on CUDA, which keeps a bool mask (1 byte per
      element); the CPU multiplies by a mask of the input's dtype and keeps that (4 bytes per element in fp32).

    Both are patched on ``torch.nn.functional`` (where transformers and ``nn.Dropout`` look them up at call time)
    rather than intercepted by a TorchFunctionMode, because activation checkpointing recomputes layers inside the
    autograd engine, where function modes are not in effect and a different kernel would save different tensors.
    The patches act only in the thread that entered this context (the autograd engine runs a CPU graph's backward
    in the calling thread); any other thread gets torch's own functions.
    """
    fn = torch.nn.functional
    originals = fn.scaled_dot_product_attention, fn.dropout
    owner = threading.get_ident()

    def sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
        if threading.get_ident() != owner:
            return originals[0](*args, **kwargs)
        return _cuda_sdpa(*args, **kwargs)

    def dropout(*args: Any, **kwargs: Any) -> torch.Tensor:
        if threading.get_ident() != owner:
            return originals[1](*args, **kwargs)
        return _cuda_dropout(*args, **kwargs)

    fn.scaled_dot_product_attention = sdpa
    fn.dropout = dropout
    try:
        yield
    finally:
        fn.scaled_dot_product_attention, fn.dropout = originals


def _cuda_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    if not training or p <= 0 or p >= 1 or input.numel() == 0:
        return _ORIGINAL_DROPOUT(input, p, training, inplace)
    out = torch.native_dropout(input, p, True)[0]
    return input.copy_(out) if inplace else out


_ORIGINAL_DROPOUT = torch.nn.functional.dropout


def _cuda_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    ops = torch.ops.aten
    head = query.shape[-1]
    sixteen = query.dtype in (torch.float16, torch.bfloat16)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    if attn_mask is None and sixteen and head <= 256 and head % 8 == 0 and value.shape[-1] == head:
        return ops._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    if head % (8 if sixteen else 4) == 0 and value.shape[-1] % (8 if sixteen else 4) == 0:
        mask = attn_mask
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = torch.where(mask, 0.0, float("-inf")).to(query.dtype)
            shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
            mask = mask.expand(shape)
            pad = (-shape[-1]) % 16
            if pad:  # torch pads the bias to a multiple of 16 keys and keeps the padded copy for backward
                mask = torch.nn.functional.pad(mask, (0, pad))[..., : shape[-1]]
        return ops._scaled_dot_product_efficient_attention(
            query, key, value, mask, grad, dropout_p, is_causal, scale=scale
        )[0]
    return ops._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale, enable_gqa=False
    )[0]


# ----------------------------------------------------------------------------------------------------------------
# Live-storage tracking


@dataclass(eq=False)
class _Storage:
    nbytes: int
    born: int
    died: int | None = None
    refs: int = 0
    kind: str = "temp"  # temp | saved | grad | param | batch
    layer: tuple[str, int] | None = None  # (stack path, layer index) of the layer whose forward created it
    what: str = ""  # shape and dtype of the first tensor seen on it (for explaining a profile)
    ref: Any = None  # StorageWeakRef: says when the storage itself is freed
    key: int = 0
    last: int = 0  # the last op tick that returned it (a gradient's: AccumulateGrad's detach when it was stolen)


class _Live(TorchDispatchMode):
    """Sees every op's outputs; records each storage's size, birth and death (in op ticks).

    A storage is alive while a Python tensor refers to it, and after that for as long as C++ keeps it (autograd
    passes gradient buffers between nodes without Python references; a saved tensor outlives its Python name).
    So the last Python reference going away only makes a storage a candidate: a weak reference to the storage
    itself says when it is really freed, checked after every op.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tick = 0
        self.by_key: dict[int, _Storage] = {}
        self.records: list[_Storage] = []
        self.pending: set[_Storage] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.settle()  # what Python freed since the last op is not alive while this one runs
        out = func(*args, **(kwargs or {}))
        self.tick += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.see(t).last = self.tick
        self.sweep()
        return out

    def sweep(self) -> None:
        """Bury candidates whose storage is gone. They were alive while the last op ran, so they count at its tick."""
        if self.pending:
            for rec in [r for r in self.pending if r.ref.expired()]:
                self._bury(rec, self.tick + 1)

    def settle(self) -> None:
        """After Python let go of something between ops (``del out``): bury what died, now.

        No ``gc.collect()``: the runner does not collect between ``del out`` and its boundary either, so whatever a
        reference cycle keeps alive there is alive for the probe too.
        """
        for rec in [r for r in self.pending if r.ref.expired()]:
            self._bury(rec, self.tick + 1)

    def _bury(self, rec: _Storage, tick: int) -> None:
        rec.died = tick
        self.pending.discard(rec)
        if self.by_key.get(rec.key) is rec:
            del self.by_key[rec.key]

    def see(self, t: torch.Tensor, kind: str | None = None) -> _Storage:
        from torch.multiprocessing.reductions import StorageWeakRef

        ref = StorageWeakRef(t.untyped_storage())
        k = ref.cdata
        rec = self.by_key.get(k)
        if rec is not None and rec in self.pending and rec.ref.expired():
            self._bury(rec, self.tick)  # its address was reused by a new storage
            rec = None
        if rec is None:
            rec = _Storage(nbytes=int(t.untyped_storage().nbytes()), born=self.tick, what=f"{tuple(t.shape)} {t.dtype}")
            rec.ref, rec.key = ref, k
            self.by_key[k] = rec
            self.records.append(rec)
        if kind is not None:
            rec.kind = kind
        if t.__dict__.get("_blipmon_seen") is not rec:
            t.__dict__["_blipmon_seen"] = rec
            rec.refs += 1
            self.pending.discard(rec)
            weakref.finalize(t, self._release, rec)
        return rec

    def _release(self, rec: _Storage) -> None:
        rec.refs -= 1
        if rec.refs == 0 and rec.died is None:
            self.pending.add(rec)


# ----------------------------------------------------------------------------------------------------------------
# The traced micro-step


@dataclass(frozen=True)
class LayerCost:
    """One typical layer of a stack: what each further copy of it adds."""

    stack: str
    signature: str
    index: int  # its index in the short model
    short_count: int  # layers with this signature in the short model
    acts: int  # saved bytes first saved inside this layer
    grads: int  # gradient bytes of its parameters
    fwd: tuple[int, int]  # forward window, op ticks
    bwd: tuple[int, int] | None  # from the first to the last release of its saved storages
    # Storages it made that are not saved for backward but outlive the forward (held by the model's output until
    # the runner's ``del out``: a decoder's key/value cache), as (bytes, tick at which it was freed).
    kept: tuple[tuple[int, int], ...] = ()

    def kept_at(self, tick: int) -> int:
        """Bytes of ``kept`` still alive at ``tick`` (for a copy of this layer that ran before it)."""
        return sum(n for n, died in self.kept if tick < died)


@dataclass(frozen=True)
class Profile:
    """What one fake micro-step of the short model showed, ready to be scaled to the full depth."""

    acts: int  # saved-tensor bytes after forward (the probe's rule), short model
    batch: int  # bytes of the batch on the device
    grads: int  # gradient bytes produced by backward, short model
    # (tick, live non-parameter bytes, gradients alive, gradients in flight) in forward; the last is what a backward
    # that adds into existing gradients holds at that tick: each new gradient from the op that makes it to
    # AccumulateGrad's ``grad += new`` (where this trace's AccumulateGrad stole it with a ``detach``).
    fwd_curve: tuple[tuple[int, int, int, int], ...]
    bwd_curve: tuple[tuple[int, int, int, int], ...]  # the same in backward
    layers: tuple[LayerCost, ...]
    no_grad_params: frozenset[str]  # trainable parameters (canonical names) that received no gradient
    max_param_grad: int  # the largest single gradient (a transient while accumulating into existing grads)
    seconds: float
    saved: tuple[tuple[str, int, int, str], ...] = ()  # (stack or "", layer index or -1, bytes, shape/dtype)
    loss: int = 0  # bytes of the micro-step's loss (``out.loss / accumulate``), which the runner keeps for the mean
    recast: tuple[tuple[str, str], ...] = ()  # (layer-free parameter name, dtype) of parameters the step re-typed
    # ``trace(..., modules=True)`` only: where each saved storage alive after the forward was saved first, by the
    # probe's rule (``runner.probes.ModuleMap``): (the modules running then, outermost first, as paths of the model
    # inside its wrappers; the activation-checkpointed module that noted it, or None; the stacked layer it is a
    # per-layer cost of, as ``stack.index``, or None; bytes), summed per place. A layer's per-layer cost was made in
    # its forward or is the hidden state it received: a further layer of its kind adds one like it (what a stack's
    # layers share, such as the encoder states every cross-attention layer keeps or T5's position bias, is not).
    # ``estimate.modules`` folds it into any tree depth. Adds up to ``acts``.
    saved_where: tuple[tuple[tuple[str, ...], str | None, str | None, int], ...] = ()

    def extrapolate(self, extra: dict[tuple[str, str], int], *, grads_exist: bool) -> tuple[int, int, int]:
        """(acts after forward, forward peak, backward peak) of the full model, non-parameter bytes.

        ``extra[(stack, signature)]`` is how many more layers of that kind the full model has. Missing layers are
        placed next to the typical one: in forward they have all run by the time it runs; in backward they run
        right after it, so before its window they hold activations and after it they hold gradients. With
        ``grads_exist`` (a micro-step after the first of an accumulation window) backward adds into existing
        gradients, which are counted as static: a new gradient lives only from the op that makes it until
        AccumulateGrad adds it in place (the curve's fourth column).
        """
        acts = self.acts + sum(extra.get((c.stack, c.signature), 0) * c.acts for c in self.layers)
        costs = [(c, extra.get((c.stack, c.signature), 0)) for c in self.layers]
        costs = [(c, n) for c, n in costs if n > 0]
        fwd_peak = 0
        for tick, live, _g, _t in self.fwd_curve:
            add = sum(n * (c.acts + c.kept_at(tick)) for c, n in costs if tick >= c.fwd[0])
            fwd_peak = max(fwd_peak, live + add)
        bwd_peak = 0
        for tick, live, g_alive, g_flight in self.bwd_curve:
            base = live - g_alive + g_flight if grads_exist else live
            add = 0
            for c, n in costs:
                g = 0 if grads_exist else n * c.grads
                a = n * c.acts
                add += n * c.kept_at(tick)
                if c.bwd is None:  # nothing saved in it: where its gradients appear is unknown, take the larger
                    add += max(a, g)
                elif tick < c.bwd[0]:
                    add += a
                elif tick > c.bwd[1]:
                    add += g
                else:
                    add += max(a, g)
            bwd_peak = max(bwd_peak, base + add)
        return acts, fwd_peak, bwd_peak


def _signature(module: Any) -> str:
    """What makes two layers of a stack the same kind: their class and parameter names, shapes, dtypes, trainability."""
    parts = [type(module).__name__]
    for name, p in module.named_parameters():
        parts.append(f"{name}:{tuple(p.shape)}:{p.dtype}:{int(p.requires_grad)}")
    return "|".join(parts)


def _canonical(name: str) -> str:
    return name.removeprefix("base_model.model.")


def caches_off_under_checkpointing(model: Any) -> int:
    """Set ``use_cache`` false in the configs of the estimator's own checkpointed model; returns configs changed.

    With activation checkpointing on, a training forward of a model whose config says ``use_cache = True`` has
    transformers switch it off and log "`use_cache=True` is incompatible with gradient checkpointing. Setting
    `use_cache=False`." (``utils.generic``'s input check, a ``warning_once``). The real run's forward does the same,
    so the traced step is unchanged; without this the estimator printed that line on the stderr of ``blipmon fit``
    and ``estimate``, and, being a ``warning_once``, took it from the real run sharing the process. Only the
    estimator's model (built from the configuration for the trace) is changed, never the run's.
    """
    changed: set[int] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in changed and getattr(config, "use_cache", None) is True:
            config.use_cache = False
            changed.add(id(config))
    return len(changed)


def layer_signatures(model: Any) -> dict[str, list[str]]:
    """``{stack path: [signature of each layer]}`` for every stack of repeated layers in ``model``."""
    from blipmon.estimate.build import is_stack

    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if is_stack(name, module):
            out[_canonical(name)] = [_signature(m) for m in module]
    return out


def trace(
    model: Any,
    cfg: dict[str, Any],
    spec: Any,
    device: str,
    signatures: dict[str, list[str]],
    *,
    modules: bool = False,
) -> Profile:
    """Run one micro-step of ``model`` (fake, short) as ``run_train`` does and profile it.

    ``device`` is where the run would execute ("cpu" or "cuda"); it selects the attention kernels.
    ``signatures`` are the layer kinds of each stack, taken from the model before it became fake (a 4-bit weight
    has its logical shape there), so they compare with the full model's. ``modules`` also follows which modules
    run, for ``Profile.saved_where`` (a hook pair on every module: off for the plain estimate, which needs none).
    """
    import time

    from blipmon.estimate.static import layer_free_name
    from blipmon.runner.precision import autocast_for
    from blipmon.runner.probes import SavedTensorTracker
    from blipmon.runner.train import enable_activation_checkpointing

    if device not in _SUPPORTED_DEVICES:
        raise ValueError(f"device {device!r}: expected one of {_SUPPORTED_DEVICES}")
    t0 = time.perf_counter()
    t = cfg["train"]
    if t["act_ckpt"]:
        enable_activation_checkpointing(model)
        caches_off_under_checkpointing(model)
    model.train()
    params = {id(p): n for n, p in model.named_parameters()}
    param_list = [p for p in model.parameters()]
    dtypes = {id(p): p.dtype for p in param_list}
    tracker = SavedTensorTracker()
    live = _Live()
    for p in param_list:
        live.see(p, "param")
    for b in model.buffers():
        live.see(b, "param")

    # Layer windows and attribution of saved tensors to layers.
    current: list[tuple[str, int]] = []
    outputs: set[int] = set()  # id() of the records that a stacked layer returned
    windows: dict[tuple[str, int], list[int]] = {}
    in_forward = [False]
    hooks = []
    from blipmon.estimate.build import is_stack

    stack_of: dict[int, tuple[str, int]] = {}
    for name, module in model.named_modules():
        if is_stack(name, module):
            for i, layer in enumerate(module):
                stack_of[id(layer)] = (_canonical(name), i)

    def pre(mod: Any, _args: Any) -> None:
        if in_forward[0]:
            tag = stack_of[id(mod)]
            current.append(tag)
            w = windows.setdefault(tag, [live.tick, live.tick])
            w[0] = min(w[0], live.tick)

    def post(mod: Any, _args: Any, out: Any) -> None:
        if in_forward[0] and current:
            tag = current.pop()
            windows[tag][1] = live.tick
            for t in _tensors(out):  # what the layer hands on exists once, however deep the stack
                rec = live.by_key.get(_key(t))
                if rec is not None:
                    outputs.add(id(rec))

    for module in model.modules():
        if id(module) in stack_of:
            hooks.append(module.register_forward_pre_hook(pre))
            hooks.append(module.register_forward_hook(post))
    # Activation checkpointing keeps each checkpointed layer's inputs until backward: the probe notes them, and so
    # does this copy.
    _note_checkpoint_inputs(model, tracker, live)

    orig_pack = tracker._pack

    def pack(x: torch.Tensor) -> torch.Tensor:
        alias = orig_pack(x)
        rec = live.see(alias)
        if rec.kind == "temp":
            rec.kind = "saved"
        return alias

    tracker._pack = pack  # type: ignore[method-assign]
    saves = _SaveLog(model, tracker, hooks) if modules else None

    batch = _fake_batch(model, cfg, spec)
    batch_bytes = sum(live.see(v).nbytes for v in batch.values())
    float_dtype = torch.bfloat16 if t["precision"] == "bf16-true" else torch.float32
    attention = cuda_semantics() if device == "cuda" else contextlib.nullcontext()
    acc = t["accumulate_grad_batches"]
    try:
        with live, attention:
            for k, v in list(batch.items()):
                if v.is_floating_point() and v.dtype != float_dtype:
                    batch[k] = v.to(float_dtype)
            f0 = live.tick
            in_forward[0] = True
            with tracker.track(), autocast_for(t["precision"], torch.device("cpu")):
                out = model(**batch)
            in_forward[0] = False
            loss = out.loss / acc
            loss_bytes = int(loss.untyped_storage().nbytes())
            del out
            live.settle()
            f1 = live.tick
            acts = _unique_bytes(tracker.alive(), {_key(p) for p in param_list})
            first = saves.first_savers({_key(p) for p in param_list}, live) if saves is not None else []
            loss.backward()
            del loss, batch
            live.settle()
            b1 = live.tick
    finally:
        for h in hooks:
            h.remove()
    # A parameter whose data the step replaced (bitsandbytes' Linear4bit casts its bias to the compute dtype in its
    # first forward) is a parameter in its new storage: out of the curve, into the parameters (``recast``).
    recast: dict[str, str] = {}
    for p in param_list:
        if p.dtype != dtypes[id(p)]:
            recast[layer_free_name(params[id(p)])] = str(p.dtype).removeprefix("torch.")
            live.see(p, "param")
    # Classify: which storages ended up as gradients.
    grads_total = 0
    max_grad = 0
    no_grad: set[str] = set()
    for p in param_list:
        if p.grad is None:
            if p.requires_grad:
                no_grad.add(layer_free_name(params[id(p)]))
            continue
        rec = live.see(p.grad, "grad")
        grads_total += rec.nbytes
        max_grad = max(max_grad, rec.nbytes)
    fwd_curve = _curve(live.records, f0, f1)
    bwd_curve = _curve(live.records, min(f1 + 1, b1), b1)  # from the first op after `del out`
    layers = _layer_costs(model, live.records, windows, stack_of, signatures, outputs)
    saved_where = _SaveLog.summarise(first)  # after ``_layer_costs``, which tells which layer made each storage
    # Release the fake graph and gradients now: a cached profile must not pin them.
    for p in param_list:
        p.grad = None
    return Profile(
        acts=acts,
        batch=batch_bytes,
        grads=grads_total,
        fwd_curve=fwd_curve,
        bwd_curve=bwd_curve,
        layers=layers,
        no_grad_params=frozenset(no_grad),
        max_param_grad=max_grad,
        seconds=time.perf_counter() - t0,
        saved=tuple(
            (r.layer[0] if r.layer else "", r.layer[1] if r.layer else -1, r.nbytes, r.what)
            for r in live.records
            if r.kind == "saved"
        ),
        loss=loss_bytes,
        recast=tuple(sorted(recast.items())),
        saved_where=saved_where,
    )


def module_paths(model: Any) -> list[str]:
    """The paths of ``model.named_modules()`` inside its wrappers (``runner.probes.unwrap_model``): the names a
    run's ``module_tree`` uses (``estimate.modules`` builds its tree from them; the layering keeps the runner's
    imports here)."""
    from blipmon.runner.probes import unwrap_model

    root, _wrappers = unwrap_model(model)
    return [n for n, _m in root.named_modules()]


class _SaveLog:
    """Which modules were running when each tensor was saved: ``runner.probes.ModuleMap``'s view, at every depth.

    The probe keeps one slot (the innermost running module of its tree) per saved tensor; a trace serves every
    ``runtime.module_depth`` at once, so it keeps the whole chain of running modules (a linked frame, so saving a
    tensor copies nothing) and ``estimate.modules`` folds it as the probe's hooks at a given depth would have seen
    it. Module paths are those of the model inside PEFT's wrapper (``probes.unwrap_model``); a wrapper's call is
    the root's. Activation-checkpointing inputs are noted under the checkpointed module, as ``tracker.note`` does
    in the probe (``ModuleMap.slot_of``).
    """

    def __init__(self, model: Any, tracker: Any, handles: list[Any]) -> None:
        from blipmon.runner.probes import unwrap_model

        root, wrappers = unwrap_model(model)
        self.names: dict[int, str] = {}
        for n, m in root.named_modules():
            self.names.setdefault(id(m), n)
        for w in wrappers:
            self.names.setdefault(id(w), "")
        self.frame: tuple[str, Any] | None = None  # (innermost running module's path, the frame around it)
        self._outer: list[tuple[str, Any] | None] = []
        self.entries: list[tuple[Any, tuple[str, Any] | None, str | None]] = []
        from blipmon.estimate.build import is_stack

        self.inputs: dict[int, str] = {}  # storage key of the hidden state a stacked layer received -> its path
        hooked: set[int] = set()
        for n, m in root.named_modules():
            if is_stack(n, m):
                for i, layer in enumerate(m):
                    handles.append(layer.register_forward_pre_hook(self._received(f"{_canonical(n)}.{i}")))
        for m in [*wrappers, *root.modules()]:
            if id(m) in hooked:
                continue
            hooked.add(id(m))
            name = self.names[id(m)]
            handles.append(m.register_forward_pre_hook(self._enter(name)))
            handles.append(m.register_forward_hook(self._leave))
        plain_pack, plain_note = tracker._pack, tracker.note

        def pack(x: torch.Tensor) -> torch.Tensor:
            alias = plain_pack(x)
            self.entries.append((weakref.ref(alias), self.frame, None))
            return alias

        def note(t: torch.Tensor, module: Any = None) -> None:
            plain_note(t, module)
            noted = self.names.get(id(module)) if module is not None else None
            self.entries.append((weakref.ref(t), self.frame, noted))

        tracker._pack = pack
        tracker.note = note

    def _enter(self, name: str) -> Any:
        def enter(_m: Any, _args: Any) -> None:
            self._outer.append(self.frame)
            self.frame = (name, self.frame)

        return enter

    def _leave(self, _m: Any, _args: Any, _out: Any) -> None:
        self.frame = self._outer.pop() if self._outer else None

    def _received(self, layer: str) -> Any:
        def received(_m: Any, args: Any) -> None:
            if args and isinstance(args[0], torch.Tensor):
                self.inputs.setdefault(_key(args[0]), layer)

        return received

    def first_savers(self, exclude: set[int], live: _Live) -> list[tuple[tuple[str, ...], str | None, Any, int]]:
        """Each live saved storage (``exclude``: parameters) at its first live saver, in the order
        ``CountingSavedTensorTracker.count`` walks its entries: (running modules, noted by, the stacked layer that
        received it as its hidden state or its ledger record, bytes)."""
        seen: set[int] = set()
        out: list[tuple[tuple[str, ...], str | None, Any, int]] = []
        chains: dict[int, tuple[str, ...]] = {}
        for ref, frame, noted in self.entries:
            t = ref()
            if t is None:
                continue
            k = _key(t)
            if k in seen or k in exclude:
                continue
            seen.add(k)
            chain = chains.get(id(frame))
            if chain is None:
                names: list[str] = []
                f = frame
                while f is not None:
                    names.append(f[0])
                    f = f[1]
                chain = chains[id(frame)] = tuple(reversed(names))
            made = self.inputs.get(k) or live.by_key.get(k)
            out.append((chain, noted, made, int(t.untyped_storage().nbytes())))
        return out

    @staticmethod
    def summarise(
        first: list[tuple[tuple[str, ...], str | None, Any, int]],
    ) -> tuple[tuple[tuple[str, ...], str | None, str | None, int], ...]:
        """``first_savers`` summed per place, once ``_layer_costs`` has told which layer made each storage."""
        out: dict[tuple[tuple[str, ...], str | None, str | None], int] = {}
        for chain, noted, made, nbytes in first:
            layer = made if isinstance(made, str) else None
            if made is not None and not isinstance(made, str) and made.layer is not None:
                layer = f"{made.layer[0]}.{made.layer[1]}"
            where = (chain, noted, layer)
            out[where] = out.get(where, 0) + nbytes
        return tuple((*where, n) for where, n in out.items())


def _tensors(obj: Any, depth: int = 4) -> Iterator[torch.Tensor]:
    """The tensors in a module's output (a tensor, a tuple, a ``ModelOutput``), a few levels deep."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 0 and isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth - 1)


def _note_checkpoint_inputs(model: Any, tracker: Any, live: _Live) -> None:
    """``probes.track_checkpoint_inputs``, with the noted inputs also marked as saved storages in ``live``."""
    from blipmon.runner.probes import track_checkpoint_inputs

    def mark_saved(t: torch.Tensor) -> None:
        rec = live.see(t)
        if rec.kind == "temp":
            rec.kind = "saved"

    track_checkpoint_inputs(model, tracker, on_note=mark_saved)


def _unique_bytes(tensors: Any, exclude: set[int]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        k = _key(t)
        if k in seen or k in exclude:
            continue
        seen.add(k)
        total += int(t.untyped_storage().nbytes())
    return total


def _curve(records: list[_Storage], start: int, end: int) -> tuple[tuple[int, int, int, int], ...]:
    """Live non-parameter bytes, gradient bytes among them and gradients in flight after each op tick in [start, end].

    A gradient is "in flight" from its birth to the last op that returned it (AccumulateGrad's ``detach`` when it
    stole it): the interval in which a backward adding into existing gradients holds it as a temporary.
    """
    n = end - start + 1
    delta = [0] * (n + 1)
    gdelta = [0] * (n + 1)
    fdelta = [0] * (n + 1)
    for r in records:
        if r.kind == "param":
            continue
        born = max(r.born, start)
        died = end + 1 if r.died is None else r.died
        if died <= start or born > end:
            continue
        i, j = born - start, min(died, end + 1) - start
        delta[i] += r.nbytes
        delta[j] -= r.nbytes
        if r.kind == "grad":
            gdelta[i] += r.nbytes
            gdelta[j] -= r.nbytes
            k = min(max(r.last, r.born) + 1, died, end + 1) - start
            if k > i:
                fdelta[i] += r.nbytes
                fdelta[k] -= r.nbytes
    out = []
    live = g = f = 0
    for i in range(n):
        live += delta[i]
        g += gdelta[i]
        f += fdelta[i]
        out.append((start + i, live, g, f))
    return tuple(out)


def _layer_costs(
    model: Any,
    records: list[_Storage],
    windows: dict[tuple[str, int], list[int]],
    stack_of: dict[int, tuple[str, int]],
    signatures: dict[str, list[str]],
    outputs: set[int] | None = None,
) -> tuple[LayerCost, ...]:
    # A saved storage belongs to the layer in whose forward it was created: a layer's output kept by the next one
    # is the layer's own, while a tensor made once and handed to every layer (T5's position bias, a mask) belongs
    # to where it was made and does not grow with depth.
    spans = sorted((w[0], w[1], tag) for tag, w in windows.items())
    starts = [sp[0] for sp in spans]
    for r in records:
        if r.kind == "saved":
            i = bisect.bisect_right(starts, r.born) - 1
            if i >= 0 and spans[i][0] <= r.born <= spans[i][1]:
                r.layer = spans[i][2]
    acts: dict[tuple[str, int], int] = {}
    # What a layer made, did not save and did not return, but that outlives its forward: a cache entry the model's
    # output holds until ``del out``, autocast's cached low-precision copy of a weight that is not saved (a bias).
    kept: dict[tuple[str, int], list[tuple[int, int]]] = {}
    if outputs is not None:
        for r in records:
            if r.kind != "temp" or id(r) in outputs:
                continue
            i = bisect.bisect_right(starts, r.born) - 1
            if i >= 0 and spans[i][0] <= r.born <= spans[i][1] and (r.died is None or r.died > spans[i][1] + 1):
                kept.setdefault(spans[i][2], []).append((r.nbytes, r.died if r.died is not None else 1 << 62))
    rel: dict[tuple[str, int], list[int]] = {}
    for r in records:
        if r.kind == "saved" and r.layer is not None:
            acts[r.layer] = acts.get(r.layer, 0) + r.nbytes
            if r.died is not None:
                span = rel.setdefault(r.layer, [r.died, r.died])
                span[0] = min(span[0], r.died)
                span[1] = max(span[1], r.died)
    by_module = {tag: m for m in model.modules() if (tag := stack_of.get(id(m))) is not None}
    sigs: dict[tuple[str, int], str] = {tag: signatures[tag[0]][tag[1]] for tag in by_module}
    counts: dict[tuple[str, str], int] = {}
    for (stack, _i), sig in sigs.items():
        counts[(stack, sig)] = counts.get((stack, sig), 0) + 1
    typical: dict[tuple[str, str], tuple[str, int]] = {}
    for tag, sig in sorted(sigs.items()):
        typical[(tag[0], sig)] = tag  # the last layer of each kind
    out = []
    for (stack, sig), tag in typical.items():
        module = by_module[tag]
        grads = sum(int(p.grad.untyped_storage().nbytes()) for p in module.parameters() if p.grad is not None)
        win = windows.get(tag, [0, 0])
        span = rel.get(tag)
        out.append(
            LayerCost(
                stack=stack,
                signature=sig,
                index=tag[1],
                short_count=counts[(stack, sig)],
                acts=acts.get(tag, 0),
                grads=grads,
                fwd=(win[0], win[1]),
                bwd=(span[0], span[1]) if span else None,
                kept=tuple(kept.get(tag, ())),
            )
        )
    return tuple(out)


def caption_dataset(cfg: dict[str, Any], spec: Any, n: int | None = None) -> Any:
    """The run's synthetic data as the estimator sees it: ``runner.data``'s own dataset on the spec's architecture.

    Its captions hold only ordinary token ids (never the image placeholder or another special id), exactly as the
    run's; ``n`` items (default: one batch).
    """
    from blipmon.runner.data import SyntheticCaptions

    return SyntheticCaptions(
        spec.arch,
        spec.family,
        max(cfg["train"]["batch_size"], 1) if n is None else n,
        caption_tokens(cfg),
        cfg["runtime"]["seed"],
        image_placeholders=cfg["data"]["image_placeholders"],
    )


def _fake_batch(model: Any, cfg: dict[str, Any], spec: Any) -> dict[str, torch.Tensor]:
    """A batch with the run's shapes: real ids, masks and labels; fake pixels (``runner.data`` decides shapes)."""
    bs = cfg["train"]["batch_size"]
    ds = caption_dataset(cfg, spec)
    items = [ds[i] for i in range(min(bs, 2))]
    batch: dict[str, torch.Tensor] = {}
    mode = _fake_mode_of(model)
    for k, first in items[0].items():
        if k == "pixel_values":  # the only large input: shape and dtype are all that matter
            meta = torch.empty((bs, *first.shape), dtype=first.dtype, device="meta")
            batch[k] = mode.fake_tensor_converter.from_meta_and_device(mode, meta, torch.device("cpu"))
        else:
            batch[k] = torch.stack([items[i % len(items)][k] for i in range(bs)])
    return batch


def _fake_mode_of(model: Any) -> Any:
    for p in model.parameters():
        mode = getattr(p, "fake_mode", None)
        if mode is not None:
            return mode
    raise RuntimeError("model has no fake parameters")
