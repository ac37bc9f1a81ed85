"""The knobs the fit advisor turns, what each costs the user, and when one cannot apply.

The knobs are the seed lab's walk from an out-of-memory baseline: a smaller micro-batch with gradient accumulation,
precision, the optimizer (stateless SGD, 8-bit Adam, paged 8-bit AdamW, DeepSpeed ZeRO-2 CPU offload), activation
checkpointing, LoRA and QLoRA. Each ``Move`` is one knob set to one value; moves of one ``group`` exclude each other
(a combination takes at most one optimizer). ``cost`` orders suggestions that both fit: what keeps the training's
maths first, what changes what is trained last (docs/fit.md, "Ranking").

A knob that cannot apply to a configuration is not offered, and the reason is kept (``Skipped``) so the user sees
why it is missing (a load job trains nothing; offload needs DeepSpeed). Knobs already set as the move would set
them are simply not moves.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from blipmon.core.units import fmt_bytes

# Cost ranks (lower first among suggestions that fit equally well): see docs/fit.md.
COST_ACCUMULATE = 1  # smaller micro-batch, accumulation keeps the effective batch: same maths, slower
COST_ACT_CKPT = 2
COST_BF16_MIXED = 3
COST_PAGED_8BIT = 4
COST_ADAM_8BIT = 4
COST_BF16_TRUE = 5
COST_OFFLOAD = 6
COST_SGD = 7
COST_SMALLER_BATCH = 8  # a smaller effective batch: the optimization itself changes
COST_LORA = 9
COST_QLORA = 10


@dataclass(frozen=True)
class Move:
    """One knob set to one value: the dotted keys it changes, its group, its cost rank and what it costs in words."""

    name: str
    group: str
    changes: dict[str, Any]
    cost: int
    note: str


@dataclass(frozen=True)
class Skipped:
    """A knob left out, and why (shown to the user; also in ``fit --json``'s ``skipped``)."""

    changes: dict[str, Any]
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"changes": dict(self.changes), "reason": self.reason}


@dataclass
class Knobs:
    moves: list[Move] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def deepspeed_available() -> bool:
    """DeepSpeed importable here (offload needs it; the runner's preflight refuses the run without it)."""
    return importlib.util.find_spec("deepspeed") is not None


OFFLOAD = {"train.optim": "deepspeed_cpu", "train.strategy": "deepspeed_stage_2_offload"}


def moves_for(cfg: dict[str, Any], *, deepspeed: bool | None = None) -> Knobs:
    """The single moves that could lower this configuration's peak, and the knobs that cannot apply, with why."""
    t, m = cfg["train"], cfg["model"]
    out = Knobs()
    if cfg["job"]["kind"] != "train":
        out.moves += load_moves(cfg)
        why = f"job.kind = {cfg['job']['kind']!r}: nothing is trained, so training knobs do not apply"
        for changes in (
            {"train.accumulate_grad_batches": "larger"},
            {"train.precision": "bf16-true"},
            {"train.optim": "sgd"},
            {"train.act_ckpt": True},
            {"train.lora.enabled": True},
            {"train.qlora": True},
        ):
            out.skipped.append(Skipped(changes, why))
        return out

    prec = t["precision"]
    if prec == "32-true":
        out.moves.append(
            Move("bf16-mixed", "precision", {"train.precision": "bf16-mixed"}, COST_BF16_MIXED, BF16_MIXED)
        )
        out.moves.append(Move("bf16-true", "precision", {"train.precision": "bf16-true"}, COST_BF16_TRUE, BF16_TRUE))
    elif prec in ("bf16-mixed", "16-mixed"):
        out.moves.append(Move("bf16-true", "precision", {"train.precision": "bf16-true"}, COST_BF16_TRUE, BF16_TRUE))

    optim = t["optim"]
    offloading = t["strategy"] == "deepspeed_stage_2_offload"
    if not offloading:
        if optim != "sgd":
            out.moves.append(Move("sgd", "optimizer", {"train.optim": "sgd"}, COST_SGD, SGD))
        if optim not in ("adam_8bit", "paged_adamw_8bit"):
            out.moves.append(Move("adam_8bit", "optimizer", {"train.optim": "adam_8bit"}, COST_ADAM_8BIT, ADAM_8BIT))
        if optim != "paged_adamw_8bit":
            out.moves.append(
                Move("paged_adamw_8bit", "optimizer", {"train.optim": "paged_adamw_8bit"}, COST_PAGED_8BIT, PAGED)
            )
        ds = deepspeed_available() if deepspeed is None else deepspeed
        if not ds:
            out.skipped.append(
                Skipped(dict(OFFLOAD), "DeepSpeed is not installed here (pip install 'blipmon[deepspeed]')")
            )
        elif t["num_nodes"] > 1:
            out.skipped.append(
                Skipped(dict(OFFLOAD), f"train.num_nodes = {t['num_nodes']}: several machines run with ddp only")
            )
        else:
            out.moves.append(Move("offload", "optimizer", dict(OFFLOAD), COST_OFFLOAD, OFFLOAD_NOTE))

    if not t["act_ckpt"]:
        out.moves.append(Move("act_ckpt", "act_ckpt", {"train.act_ckpt": True}, COST_ACT_CKPT, ACT_CKPT))

    lora, qlora = t["lora"]["enabled"], t["qlora"]
    if not lora and not qlora:
        out.moves.append(Move("lora", "adapters", {"train.lora.enabled": True}, COST_LORA, lora_note(cfg)))
    if not qlora:
        if m["quantization"] == "8bit":
            out.skipped.append(
                Skipped(
                    {"train.qlora": True},
                    "model.quantization = '8bit': QLoRA loads the base model in 4-bit (set 'none' or '4bit-nf4')",
                )
            )
        else:
            out.moves.append(Move("qlora", "adapters", {"train.qlora": True}, COST_QLORA, qlora_note(cfg)))
    return out


COST_HALF_WEIGHTS = 1
COST_DEVICE_MAP = 3
COST_8BIT_WEIGHTS = 4
COST_4BIT_WEIGHTS = 5


def load_moves(cfg: dict[str, Any]) -> list[Move]:
    """The loading seeds' knobs for a load or generate job: half-precision weights, 8-bit and 4-bit loading, and
    ``device_map = "auto"`` (the GPU while modules fit, the rest on the CPU)."""
    m = cfg["model"]
    out: list[Move] = []
    if m["quantization"] == "none" and m["dtype"] == "float32":
        out.append(Move("float16", "dtype", {"model.dtype": "float16"}, COST_HALF_WEIGHTS, HALF_WEIGHTS))
        out.append(Move("bfloat16", "dtype", {"model.dtype": "bfloat16"}, COST_HALF_WEIGHTS, HALF_WEIGHTS))
    if m["quantization"] == "none":
        out.append(Move("8bit", "quantization", {"model.quantization": "8bit"}, COST_8BIT_WEIGHTS, EIGHT_BIT))
    if m["quantization"] in ("none", "8bit"):
        out.append(Move("4bit", "quantization", {"model.quantization": "4bit-nf4"}, COST_4BIT_WEIGHTS, FOUR_BIT))
    if m["device_map"] in ("cuda", "cpu-first"):
        out.append(Move("auto map", "device_map", {"model.device_map": "auto"}, COST_DEVICE_MAP, AUTO_MAP))
    return out


HALF_WEIGHTS = "16-bit weights: half the memory of fp32; generation's numerics barely change"
EIGHT_BIT = "8-bit weights (bitsandbytes LLM.int8): about a quarter of fp32; slower matmuls, small quality loss"
FOUR_BIT = "4-bit NF4 weights (bitsandbytes): about an eighth of fp32; dequantizing costs time, some quality loss"
AUTO_MAP = (
    "device_map = 'auto': accelerate fills the GPU and puts the modules that do not fit on the CPU, which run "
    "there, much slower"
)

BF16_MIXED = (
    "bf16-mixed: the weights stay fp32, the forward and backward run in bfloat16 (autocast): numerics close to "
    "fp32; needs a GPU with bfloat16 (Ampere or newer)"
)
BF16_TRUE = (
    "bf16-true: weights, gradients and optimizer state in bfloat16: half their memory, but updates lose precision "
    "(no fp32 master weights); needs a GPU with bfloat16 (Ampere or newer)"
)
SGD = (
    "SGD without momentum keeps no optimizer state, but trains differently from AdamW: expect to retune the "
    "learning rate and to need more steps"
)
ADAM_8BIT = (
    "8-bit Adam (bitsandbytes) keeps the optimizer state in 8 bits: a quarter of AdamW's, with slightly different "
    "numerics; needs bitsandbytes with CUDA"
)
PAGED = (
    "paged 8-bit AdamW: as 8-bit Adam, and its large state buffers live in CUDA managed memory that can page out "
    "to host RAM under pressure (slower steps when it does)"
)
OFFLOAD_NOTE = (
    "DeepSpeed ZeRO-2 offload keeps the fp32 master weights, gradients and optimizer state in host RAM and moves "
    "the optimizer step to the CPU (slower steps)"
)
ACT_CKPT = (
    "activation checkpointing keeps only each layer's input and recomputes the forward in the backward: roughly a "
    "third more compute per step, the same maths"
)


def lora_note(cfg: dict[str, Any]) -> str:
    r = cfg["train"]["lora"]["r"]
    return (
        f"LoRA trains low-rank adapters only (r = {r}); the base weights stay frozen, so no gradients or optimizer "
        "state for them: results can differ from a full fine-tune"
    )


def qlora_note(cfg: dict[str, Any]) -> str:
    r = cfg["train"]["lora"]["r"]
    return (
        f"QLoRA: the base model in 4-bit NF4 with LoRA adapters (r = {r}): trains adapters only, and the 4-bit base "
        "changes the forward's numerics and costs dequantization time; needs bitsandbytes with CUDA"
    )


def offload_host_note(host_bytes: int | None, host_memory: int | None) -> str:
    """How much host RAM the offloaded state needs, against ``--host-memory`` when given."""
    if not host_bytes:
        return ""
    if host_memory is None:
        return f"needs {fmt_bytes(host_bytes)} of host RAM for the offloaded state (give --host-memory to check it)"
    return f"needs {fmt_bytes(host_bytes)} of host RAM for the offloaded state, of {fmt_bytes(host_memory)}"


def accumulate_note(batch: int, acc: int, effective: int, old_effective: int) -> str:
    """What a smaller micro-batch costs: nothing in the maths when accumulation keeps the effective batch.

    ``effective`` and ``old_effective`` are per optimizer step over all ranks (``batch x accumulation x ranks``).
    """
    steps = f"{acc} accumulation step{'s' if acc != 1 else ''}"
    if effective == old_effective:
        return (
            f"micro-batch {batch} with {steps} keeps the effective batch of {effective}: the same maths, but each "
            f"optimizer step takes {acc} forward and backward passes (longer)"
        )
    return (
        f"micro-batch {batch} with {steps} cannot keep the effective batch: it changes from {old_effective} to "
        f"{effective}, which changes the optimization (retune the learning rate)"
    )
