"""Parameters, gradients and optimizer state, exactly, from the full model on the meta device.

These three are arithmetic once the model is built the way the run builds it (``build.build_meta``): every byte
follows from a parameter's shape, dtype, class and trainability. The rules mirror the code that allocates them:

- parameters: unique storages (tied weights once); a bitsandbytes 4-bit weight is a packed uint8 storage of
  ``ceil(n / 2)`` bytes, an 8-bit one ``n`` bytes. Their quantization state (4-bit absmax per 64 weights and code
  table, 8-bit row scales) is real memory but not a parameter, so the probe does not count it: it is reported
  separately as ``quant_state`` and added to the totals.
- gradients: one per trainable parameter that takes part in the forward pass, in the parameter's dtype (fp32 under
  bf16-mixed and 16-mixed, whose weights stay fp32).
- optimizer state (created in the first ``step()``, only for parameters that have a gradient):
  ``torch.optim.AdamW``: ``exp_avg`` and ``exp_avg_sq`` like the parameter plus a 4-byte fp32 ``step`` scalar;
  SGD without momentum: nothing; bitsandbytes ``Adam8bit`` / ``PagedAdamW8bit``: for tensors of at least
  ``min_8bit_size`` (4096) elements two uint8 states plus two fp32 absmax per 256-element block, and the two 256-entry
  fp32 quantile maps shared by all; smaller tensors get two fp32 states (bitsandbytes' rule, see
  ``Optimizer2State.init_state``); DeepSpeed's CPU Adam keeps fp32 master weights, both moments and fp32 gradient
  partitions in host memory (ZeRO-2 offload), nothing on the GPU.

The optimizer step itself allocates temporaries, and which ones depends on the implementation torch or bitsandbytes
picks on the device (``optimizer_step``; docs/memory-model.md, "The optimizer step"):

- ``torch.optim.AdamW`` on the CPU runs ``_single_tensor_adam``: one parameter at a time, ``denom =
  (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)`` holds two temporaries of the parameter's size at once
  (the square root and the quotient), while the previous parameter's ``denom`` is still bound to its name;
- on CUDA it runs ``_multi_tensor_adam`` (torch's default for CUDA tensors, ``_default_to_fused_or_foreach``):
  ``torch._foreach_sqrt(exp_avg_sqs)`` makes one temporary per parameter for a whole (device, dtype) group at once,
  and the previous group's is still bound to its name while the next group computes its own;
- SGD without momentum adds the gradient in place on both paths;
- bitsandbytes' 8-bit optimizers update in place in one CUDA kernel, but their CPU kernels dequantize both states
  to fp32, make an fp32 copy of the gradient (and of a 16-bit parameter) and divide by a fresh square root;
  their state is created parameter by parameter inside the first step (``init_state`` just before the update).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes Optimizer2State(min_8bit_size=4096)
BNB_OPTIM_BLOCK = 256  # blockwise 8-bit state: one fp32 absmax per 256 elements
BNB_QMAP_BYTES = 2 * 256 * 4  # "dynamic" and "udynamic" quantile maps, fp32, shared by all parameters
BNB_4BIT_BLOCK = 64
BNB_4BIT_CODE_BYTES = 16 * 4
ADAM_STEP_BYTES = 4  # torch keeps ``step`` as a float32 scalar tensor per parameter (on the CPU unless fused)
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages state buffers of at least this many elements (CUDA only)

_INDEX = re.compile(r"\.\d+\.")


def layer_free_name(name: str) -> str:
    """A parameter name with layer indices replaced, so a short model's layer stands for all of its kind."""
    return _INDEX.sub(".#.", name.removeprefix("base_model.model."))


@dataclass(frozen=True)
class Static:
    """Bytes of what lives across the whole step."""

    params: int  # parameter storages as the probe counts them
    quant_state: int  # bitsandbytes quantization state (real memory, not parameters)
    buffers: int  # registered buffers (position ids, ...): real memory, not a probe category
    trainable_params: int  # number of trainable parameters (elements)
    total_params: int
    grads: int  # gradient bytes once backward has run
    optim: int  # optimizer state bytes once the first step has run (where the probe counts them)
    optim_device: int  # of which on the accelerator (excludes torch's CPU step scalars, paged and offloaded state)
    optim_host: int  # optimizer memory in host RAM (DeepSpeed offload: master weights, moments, grad partitions)
    optim_step_temp: int  # temporaries alive at the peak of a later optimizer.step() (the state exists already)
    max_grad: int  # largest single gradient
    # Each tensor's bytes, for the caching allocator's rounding (``gpu.pack``): parameter storages with their
    # quantization state and the buffers; gradients; optimizer state on the device (paged and host state excluded).
    resident_tensors: tuple[int, ...] = ()
    grad_tensors: tuple[int, ...] = ()
    optim_device_tensors: tuple[int, ...] = ()
    largest_trainable_numel: int = 0  # DeepSpeed's offload gradient buffer is this many elements ...
    trainable_itemsize: int = 0  # ... of the first trainable parameter's dtype (ZeRO's ``self.dtype``)
    # The first step creates the state while it runs: optimizer bytes at its peak (state made so far plus
    # temporaries); None means ``optim_device + optim_step_temp`` (all state first, then the updates, as torch does).
    optim_first_step_peak: int | None = None
    optim_before_step: int = 0  # optimizer memory on the device before the first step (bitsandbytes' maps, CPU)
    optim_outside_state: int = 0  # ... and for good, outside its state (the maps when no tensor gets 8-bit state)
    optim_step_tensors: tuple[int, ...] = ()  # the temporaries at a later step's peak, tensor by tensor
    optim_impl: str = ""  # which implementation runs the step on the device (``OptimStep.implementation``)
    # How the parameters' memory changes in the first forward (bitsandbytes' Linear4bit casts a bias to its compute
    # dtype there for good); the probe keeps counting the parameters as loaded, so ``params`` does not show it.
    params_change: int = 0

    @property
    def first_step_peak(self) -> int:
        """Optimizer-owned device bytes at the peak of the first ``step()`` (state created so far + temporaries)."""
        if self.optim_first_step_peak is not None:
            return self.optim_first_step_peak
        return self.optim_device + self.optim_step_temp


@dataclass(frozen=True)
class OptimStep:
    """What ``optimizer.step()`` allocates besides the state, as the implementation on the device runs it."""

    implementation: str  # single-tensor | foreach | bitsandbytes-cpu | bitsandbytes-cuda | in-place | none
    first_peak: int  # optimizer-owned bytes at the first step's peak: state created so far plus temporaries
    temp: int  # temporaries at a later step's peak (the state exists)
    tensors: tuple[int, ...] = ()  # those temporaries, tensor by tensor
    before: int = 0  # optimizer memory on the device before the first step
    outside: int = 0  # optimizer memory on the device for good that is not in its state (so not in ``optim``)


def analyse(
    model: Any, cfg: dict[str, Any], no_grad: frozenset[str], device: str, recast: dict[str, str] | None = None
) -> Static:
    """Count the full meta ``model`` as a run on ``device`` would allocate it.

    ``recast`` (layer-free parameter name -> dtype name) lists parameters whose storage the first forward replaces
    with one of another dtype (``activations.Profile.recast``): their change is ``params_change``.
    """
    import torch

    recast = recast or {}
    change = 0
    optim = cfg["train"]["optim"]
    params = quant = buffers = 0
    total_n = train_n = 0
    grads = 0
    grad_sizes: list[tuple[int, int, Any]] = []  # (numel, bytes, dtype) of parameters that get a gradient
    resident: list[int] = []
    largest_trainable = trainable_itemsize = 0
    for name, p in model.named_parameters():
        cls = type(p).__name__
        n = p.numel()
        total_n += n
        if cls == "Params4bit":
            stored = (n + 1) // 2 * _itemsize(getattr(p, "quant_storage", None))
            block = getattr(p, "blocksize", None) or BNB_4BIT_BLOCK
            absmax = -(-n // block) * 4
            quant += absmax + BNB_4BIT_CODE_BYTES
            resident += [stored, absmax, BNB_4BIT_CODE_BYTES]
        elif cls == "Int8Params":
            stored = n
            scales = 4 * (p.shape[0] if p.dim() else 1)
            quant += scales
            resident += [stored, scales]
        else:
            stored = n * p.element_size()
            resident.append(stored)
            new = recast.get(layer_free_name(name))
            if new is not None and hasattr(torch, new):
                change += n * torch.empty((), dtype=getattr(torch, new)).element_size() - stored
        params += stored
        if p.requires_grad:
            train_n += n
            if not trainable_itemsize:
                trainable_itemsize = p.element_size()
            largest_trainable = max(largest_trainable, n)
            if layer_free_name(name) not in no_grad:
                b = n * p.element_size()
                grads += b
                grad_sizes.append((n, b, p.dtype))
    for b in model.buffers():
        buffers += b.numel() * b.element_size()
        resident.append(b.numel() * b.element_size())
    state, state_dev, host, _temp = _optimizer(optim, grad_sizes, device)
    step = optimizer_step(optim, grad_sizes, device)
    if cfg["train"]["strategy"] == "deepspeed_stage_2_offload":
        # ZeRO-2 offload: fp32 gradient partitions live in host memory next to the optimizer, and a second fp32
        # copy accumulates them across micro-steps when accumulating (``accumulated_grads_in_cpu``).
        copies = 2 if cfg["train"]["accumulate_grad_batches"] > 1 else 1
        host += copies * sum(4 * n for n, _b, _d in grad_sizes)
    return Static(
        params=params,
        quant_state=quant,
        buffers=buffers,
        trainable_params=train_n,
        total_params=total_n,
        grads=grads,
        optim=state,
        optim_device=state_dev,
        optim_host=host,
        optim_step_temp=step.temp,
        max_grad=max((b for _n, b, _d in grad_sizes), default=0),
        resident_tensors=tuple(resident),
        grad_tensors=tuple(b for _n, b, _d in grad_sizes),
        optim_device_tensors=tuple(_optimizer_device_tensors(optim, grad_sizes, device)),
        largest_trainable_numel=largest_trainable,
        trainable_itemsize=trainable_itemsize,
        optim_first_step_peak=step.first_peak,
        optim_before_step=step.before,
        optim_outside_state=step.outside,
        optim_step_tensors=step.tensors,
        optim_impl=step.implementation,
        params_change=change,
    )


def _optimizer_device_tensors(name: str, sizes: list[tuple[int, int, Any]], device: str) -> list[int]:
    """Each optimizer state tensor the caching allocator holds (the same rules as ``_optimizer``, tensor by tensor).

    AdamW's ``step`` scalars stay on the host; bitsandbytes' paged buffers live in CUDA managed memory, outside the
    caching allocator; DeepSpeed's CPU Adam keeps everything on the host.
    """
    if device != "cuda" or not sizes or name in ("sgd", "deepspeed_cpu"):
        return []
    out: list[int] = []
    if name == "adamw":
        for _n, b, _d in sizes:
            out += [b, b]
        return out
    any_8bit = False
    for n, _b, _d in sizes:
        paged = name == "paged_adamw_8bit" and n >= PAGED_MIN_NUMEL
        if n < BNB_MIN_8BIT_SIZE:
            out += [] if paged else [4 * n, 4 * n]
        else:
            any_8bit = True
            out += ([] if paged else [n, n]) + [4 * -(-n // BNB_OPTIM_BLOCK)] * 2
    if any_8bit:
        out += [BNB_QMAP_BYTES // 2] * 2
    return out


def _itemsize(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype or torch.uint8).element_size()


def _optimizer(name: str, sizes: list[tuple[int, int, Any]], device: str) -> tuple[int, int, int, int]:
    """(state bytes as the probe counts them, of which on the device, host bytes, step temporary)."""
    if not sizes:
        return 0, 0, 0, 0
    if name == "sgd":
        return 0, 0, 0, 0  # momentum 0: torch keeps no state; foreach add_ is in place
    if name == "adamw":
        moments = sum(2 * b for _n, b, _d in sizes)
        steps = ADAM_STEP_BYTES * len(sizes)
        temp = optimizer_step(name, sizes, device).temp
        return moments + steps, moments if device == "cuda" else moments + steps, 0, temp
    if name in ("adam_8bit", "paged_adamw_8bit"):
        total = 0
        paged = 0
        any_8bit = False
        for n, _b, _d in sizes:
            if n < BNB_MIN_8BIT_SIZE:
                s = 2 * 4 * n
            else:
                any_8bit = True
                s = 2 * n + 2 * 4 * -(-n // BNB_OPTIM_BLOCK)
            total += s
            if name == "paged_adamw_8bit" and device == "cuda" and n >= PAGED_MIN_NUMEL:
                paged += 2 * (n if n >= BNB_MIN_8BIT_SIZE else 4 * n)
        if any_8bit:
            total += BNB_QMAP_BYTES
        return total, total - paged, 0, 0
    if name == "deepspeed_cpu":
        # DeepSpeedCPUAdam keeps fp32 exp_avg and exp_avg_sq (its state, as a probe would count it) next to the
        # fp32 master weights of the ZeRO partition, all in host memory.
        moments = sum(2 * 4 * n for n, _b, _d in sizes)
        return moments, 0, moments + sum(4 * n for n, _b, _d in sizes), 0
    raise ValueError(f"train.optim = {name!r}: no memory model for it")


def adamw_implementation(device: str) -> str:
    """The AdamW implementation torch picks for the runner's ``AdamW(params, lr=lr)`` on ``device``.

    ``torch.optim.adam.adam`` asks ``_default_to_fused_or_foreach(params, differentiable, use_fused=False)``: foreach
    when every parameter is on a device with foreach kernels (``_get_foreach_kernels_supported_devices``: cuda, xpu,
    ...), never fused unless asked; the CPU is not among them, so it runs the single-tensor loop.
    """
    return "foreach" if device == "cuda" else "single-tensor"


def optimizer_step(
    name: str, sizes: list[tuple[int, int, Any]], device: str, implementation: str | None = None
) -> OptimStep:
    """The optimizer step's own memory for parameters ``sizes`` (``(numel, bytes, dtype)`` in the optimizer's order).

    ``implementation`` overrides the one the device gets (``adamw_implementation``); tests use it to hold the
    foreach model to a real foreach step on the CPU.
    """
    if not sizes or name in ("sgd", "deepspeed_cpu"):
        return OptimStep("in-place" if sizes else "none", 0, 0)
    if name == "adamw":
        impl = implementation or adamw_implementation(device)
        moments = sum(2 * b for _n, b, _d in sizes)
        steps = ADAM_STEP_BYTES * len(sizes) if device != "cuda" else 0  # on the host unless fused/capturable
        if impl == "single-tensor":
            tensors = _single_tensor_adam_temps(sizes)
        elif impl == "foreach":
            tensors = _foreach_adam_temps(sizes)
        elif impl == "fused":
            tensors = ()  # one kernel per group updates params and state in place
        else:
            raise ValueError(f"AdamW implementation {impl!r}: expected single-tensor, foreach or fused")
        temp = sum(tensors)
        # _init_group creates every parameter's state before the first update.
        return OptimStep(impl, moments + steps + temp, temp, tensors)
    if name in ("adam_8bit", "paged_adamw_8bit"):
        return _bnb_step(name, sizes, device)
    raise ValueError(f"train.optim = {name!r}: no memory model for its step")


def _single_tensor_adam_temps(sizes: list[tuple[int, int, Any]]) -> tuple[int, ...]:
    """``_single_tensor_adam``'s temporaries at its peak: ``exp_avg_sq.sqrt()`` and its quotient by
    ``bias_correction2_sqrt`` (both the parameter's size and dtype) while the previous parameter's ``denom`` is
    still bound (it is rebound only when the new quotient is assigned)."""
    best: tuple[int, ...] = ()
    prev = 0
    for _n, b, _d in sizes:
        now = (prev, b, b) if prev else (b, b)
        if sum(now) > sum(best):
            best = now
        prev = b
    return best


def _foreach_adam_temps(sizes: list[tuple[int, int, Any]]) -> tuple[int, ...]:
    """``_multi_tensor_adam``'s temporaries at its peak: ``torch._foreach_sqrt(exp_avg_sqs)`` is one tensor per
    parameter of a (device, dtype) group, and the previous group's list is still bound while the next is made.

    With two groups that is both, whatever their order; with more, the two largest (an upper bound: torch's
    grouping order decides which two meet).
    """
    groups: dict[str, list[int]] = {}
    for _n, b, d in sizes:
        groups.setdefault(str(d), []).append(b)
    ranked = sorted(groups.values(), key=sum, reverse=True)
    return tuple(b for g in ranked[:2] for b in g)


def _bnb_state_bytes(n: int) -> int:
    if n < BNB_MIN_8BIT_SIZE:
        return 2 * 4 * n
    return 2 * n + 2 * 4 * -(-n // BNB_OPTIM_BLOCK)


def _bnb_cpu_temps(n: int, itemsize: int) -> tuple[int, ...]:
    """bitsandbytes' CPU update of one parameter of ``n`` elements: its temporaries at their peak.

    8-bit (``_optimizer_update_8bit_blockwise_cpu``): both states dequantized to fp32, ``g.float() * gnorm_scale``,
    ``p.data.float()`` (a copy only for a 16-bit parameter), then ``state2_fp32.sqrt()`` and its quotient: six (or
    five) fp32 tensors of the parameter's size. 32-bit, for parameters under ``min_8bit_size``
    (``_optimizer_update_32bit_cpu``): the gradient in fp32, the parameter in fp32 (16-bit only), then
    ``state2.sqrt() + eps`` and ``state1 / that``.
    """
    f = 4 * n
    half = itemsize != 4
    if n < BNB_MIN_8BIT_SIZE:
        return (f, f, f) + ((f,) if half else ())
    return (f, f, f, f, f) + ((f,) if half else ())


def _bnb_step(name: str, sizes: list[tuple[int, int, Any]], device: str) -> OptimStep:
    """bitsandbytes' 8-bit Adam/AdamW (paged or not): state made per parameter inside the first step."""
    any_8bit = any(n >= BNB_MIN_8BIT_SIZE for n, _b, _d in sizes)
    qmaps = BNB_QMAP_BYTES if any_8bit else 0
    if device == "cuda":
        # One CUDA kernel per parameter updates p, both states and their absmax in place; paged state buffers
        # (>= 100k elements) are CUDA managed memory outside the caching allocator.
        dev_state = sum(
            0 if name == "paged_adamw_8bit" and n >= PAGED_MIN_NUMEL else _bnb_state_bytes(n) for n, _b, _d in sizes
        )
        if name == "paged_adamw_8bit":  # the absmax of a paged 8-bit state stays an ordinary tensor
            dev_state += sum(
                2 * 4 * -(-n // BNB_OPTIM_BLOCK)
                for n, _b, _d in sizes
                if n >= PAGED_MIN_NUMEL and n >= BNB_MIN_8BIT_SIZE
            )
        return OptimStep("bitsandbytes-cuda", dev_state + qmaps, 0)
    # CPU (paged buffers fall back to ordinary ones there). ``Optimizer8bit.__init__`` makes the two quantile maps
    # (``fill_qmap``) whatever the parameters; they enter the state (``qmap1``/``qmap2``) only for 8-bit tensors.
    made = 0
    first = 0
    best: tuple[int, ...] = ()
    for n, b, _d in sizes:
        made += _bnb_state_bytes(n)
        temps = _bnb_cpu_temps(n, b // n if n else 4)
        first = max(first, made + sum(temps))
        if sum(temps) > sum(best):
            best = temps
    maps = BNB_QMAP_BYTES
    return OptimStep("bitsandbytes-cpu", maps + first, sum(best), best, before=maps, outside=0 if any_8bit else maps)


@dataclass(frozen=True)
class ParamBytes:
    """One parameter's share of the three static categories, by the rules ``analyse`` adds up."""

    name: str  # its path in the model inside the wrappers (PEFT's ``base_model.model.`` dropped)
    params: int  # its storage as the probe counts it (packed for a quantized weight)
    grads: int  # its gradient once backward has run (0: frozen, or no gradient reaches it)
    optim: int  # its optimizer state once the first step has run, as the probe counts it


def per_parameter(model: Any, cfg: dict[str, Any], no_grad: frozenset[str]) -> list[ParamBytes]:
    """Each parameter of the full meta ``model`` with its parameter, gradient and optimizer bytes (issue 12).

    The same rules as ``analyse`` parameter by parameter, so each column adds up to its ``params``, ``grads`` and
    ``optim`` exactly (``tests/unit/test_predict_modules.py`` holds them to it); tied weights appear once, under
    the first name ``named_parameters()`` gives, as the probe attributes them. State an optimizer shares between
    parameters (bitsandbytes' two quantile maps) belongs to the first parameter that holds it: the probe counts a
    storage at the first parameter of ``optimizer.state`` that has it, and the state is made in parameter order.
    DeepSpeed's offloaded state is the strategy's, not a parameter's: ``analyse`` and the phases say where it is.
    """
    from blipmon.core.modules import canonical_name

    optim = cfg["train"]["optim"]
    out: list[ParamBytes] = []
    qmaps_given = False
    for name, p in model.named_parameters():
        cls = type(p).__name__
        n = p.numel()
        if cls == "Params4bit":
            stored = (n + 1) // 2 * _itemsize(getattr(p, "quant_storage", None))
        elif cls == "Int8Params":
            stored = n
        else:
            stored = n * p.element_size()
        grad = state = 0
        if p.requires_grad and layer_free_name(name) not in no_grad:
            grad = n * p.element_size()
            if optim == "adamw":
                state = 2 * grad + ADAM_STEP_BYTES
            elif optim in ("adam_8bit", "paged_adamw_8bit"):
                state = _bnb_state_bytes(n)
                if n >= BNB_MIN_8BIT_SIZE and not qmaps_given:
                    state += BNB_QMAP_BYTES
                    qmaps_given = True
            elif optim == "deepspeed_cpu":
                state = 2 * 4 * n
        out.append(ParamBytes(canonical_name(name), stored, grad, state))
    return out
