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
    optim_step_temp: int  # largest temporary inside optimizer.step() on the target device
    max_grad: int  # largest single gradient
    # Each tensor's bytes, for the caching allocator's rounding (``gpu.pack``): parameter storages with their
    # quantization state and the buffers; gradients; optimizer state on the device (paged and host state excluded).
    resident_tensors: tuple[int, ...] = ()
    grad_tensors: tuple[int, ...] = ()
    optim_device_tensors: tuple[int, ...] = ()
    largest_trainable_numel: int = 0  # DeepSpeed's offload gradient buffer is this many elements ...
    trainable_itemsize: int = 0  # ... of the first trainable parameter's dtype (ZeRO's ``self.dtype``)


def analyse(model: Any, cfg: dict[str, Any], no_grad: frozenset[str], device: str) -> Static:
    """Count the full meta ``model`` as a run on ``device`` would allocate it."""
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
    state, state_dev, host, temp = _optimizer(optim, grad_sizes, device)
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
        optim_step_temp=temp,
        max_grad=max((b for _n, b, _d in grad_sizes), default=0),
        resident_tensors=tuple(resident),
        grad_tensors=tuple(b for _n, b, _d in grad_sizes),
        optim_device_tensors=tuple(_optimizer_device_tensors(optim, grad_sizes, device)),
        largest_trainable_numel=largest_trainable,
        trainable_itemsize=trainable_itemsize,
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
        # CUDA runs the foreach implementation: exp_avg_sq.sqrt() for every parameter of a dtype group at once.
        # On the CPU the single-tensor loop needs one parameter's worth at a time.
        temp = sum(b for _n, b, _d in sizes) if device == "cuda" else max(b for _n, b, _d in sizes)
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
