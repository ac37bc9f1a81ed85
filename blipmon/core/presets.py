"""Built-in configurations: the seed lab's experiment tables, the loading recipes and tiny demos.

The ``h100/*`` and ``a100/*`` rows are transcribed from the two tables of seed 002 (full
fine-tuning and PEFT) so a user can rerun the lab by name. Every preset is validated by the
same code as a user's TOML file (a unit test runs all of them through ``config.validate``).
"""

from __future__ import annotations

import copy
from typing import Any

# The built-in tiny architectures (built in code by blipmon.runner.models); named here, away from
# torch, so checking a configuration never pays for importing it.
TINY_MODELS = ("tiny/blip2-opt", "tiny/blip2-t5", "tiny/blip-vqa")

_MODELS = {
    "opt-2.7b": "Salesforce/blip2-opt-2.7b",
    "opt-6.7b": "Salesforce/blip2-opt-6.7b",
    "flan-t5-xxl": "Salesforce/blip2-flan-t5-xxl",
}

# (name, experiment, model, batch, accum, precision, optim, act_ckpt, strategy, max_steps, extra)
_LabRow = tuple[str, str, str, int, int, str, str, bool, str, int, dict[str, Any]]

_A100: list[_LabRow] = [
    ("baseline", "Baseline (expected OOM)", "opt-2.7b", 32, 1, "32-true", "adamw", False, "auto", -1, {}),
    ("reduced-batch", "Reduced batch size", "opt-2.7b", 16, 1, "32-true", "adamw", False, "auto", -1, {}),
    ("grad-accum", "Gradient accumulation", "opt-2.7b", 16, 4, "32-true", "adamw", False, "auto", -1, {}),
    (
        "grad-accum-lr4x",
        "Grad accum + LR x4 rerun",
        "opt-2.7b",
        16,
        4,
        "32-true",
        "adamw",
        False,
        "auto",
        -1,
        {"lr": 2e-5},
    ),
    ("bf16-true", "Reduced precision", "opt-2.7b", 16, 4, "bf16-true", "adamw", False, "auto", -1, {}),
    ("bf16-mixed", "Mixed precision", "opt-2.7b", 16, 4, "bf16-mixed", "adamw", False, "auto", -1, {}),
    ("opt-6.7b", "Larger model", "opt-6.7b", 16, 4, "bf16-true", "adamw", False, "auto", -1, {}),
    (
        "flan-t5-xxl",
        "Even larger model (expected OOM)",
        "flan-t5-xxl",
        16,
        4,
        "bf16-true",
        "adamw",
        False,
        "auto",
        -1,
        {},
    ),
    (
        "flan-t5-xxl-bs1",
        "XXL + smallest batch (expected OOM)",
        "flan-t5-xxl",
        1,
        1,
        "bf16-true",
        "adamw",
        False,
        "auto",
        -1,
        {},
    ),
    ("sgd", "Optimizer without state", "flan-t5-xxl", 16, 4, "bf16-true", "sgd", False, "auto", -1, {}),
    ("adam-8bit", "8-bit optimizer", "flan-t5-xxl", 2, 2, "bf16-true", "adam_8bit", False, "auto", -1, {}),
    ("act-ckpt", "Activation checkpointing", "flan-t5-xxl", 2, 2, "bf16-true", "adam_8bit", True, "auto", -1, {}),
    (
        "deepspeed-offload",
        "CPU offload (DeepSpeed ZeRO-2)",
        "flan-t5-xxl",
        16,
        4,
        "bf16-true",
        "deepspeed_cpu",
        False,
        "deepspeed_stage_2_offload",
        2,
        {},
    ),
    ("lora", "LoRA", "flan-t5-xxl", 32, 2, "32-true", "adamw", False, "auto", -1, {"lora": True}),
    ("qlora", "QLoRA", "flan-t5-xxl", 64, 1, "32-true", "adamw", False, "auto", -1, {"qlora": True}),
]

_H100: list[_LabRow] = [
    ("baseline", "Baseline (OOM)", "opt-2.7b", 64, 1, "32-true", "adamw", False, "auto", -1, {}),
    ("reduced-batch", "Reduced batch size", "opt-2.7b", 16, 1, "32-true", "adamw", False, "auto", -1, {}),
    ("grad-accum", "Gradient accumulation", "opt-2.7b", 16, 4, "32-true", "adamw", False, "auto", -1, {}),
    (
        "grad-accum-lr4x",
        "Grad accum + LR x4 rerun",
        "opt-2.7b",
        16,
        4,
        "32-true",
        "adamw",
        False,
        "auto",
        -1,
        {"lr": 2e-5},
    ),
    ("bf16-true", "Reduced precision", "opt-2.7b", 16, 4, "bf16-true", "adamw", False, "auto", -1, {}),
    ("bf16-mixed", "Mixed precision", "opt-2.7b", 16, 4, "bf16-mixed", "adamw", False, "auto", -1, {}),
    ("opt-6.7b", "Larger model", "opt-6.7b", 32, 2, "bf16-true", "adamw", False, "auto", -1, {}),
    ("flan-t5-xxl", "Even larger model (OOM)", "flan-t5-xxl", 32, 2, "bf16-true", "adamw", False, "auto", -1, {}),
    ("flan-t5-xxl-bs1", "XXL + smallest batch (OOM)", "flan-t5-xxl", 1, 1, "bf16-true", "adamw", False, "auto", -1, {}),
    ("sgd", "Optimizer without state", "flan-t5-xxl", 32, 2, "bf16-true", "sgd", False, "auto", -1, {}),
    ("adam-8bit", "8-bit optimizer", "flan-t5-xxl", 2, 2, "bf16-true", "adam_8bit", False, "auto", -1, {}),
    ("act-ckpt", "Activation checkpointing", "flan-t5-xxl", 2, 2, "bf16-true", "adam_8bit", True, "auto", -1, {}),
    (
        "deepspeed-offload",
        "CPU offload (DeepSpeed ZeRO-2)",
        "flan-t5-xxl",
        32,
        2,
        "bf16-true",
        "deepspeed_cpu",
        False,
        "deepspeed_stage_2_offload",
        2,
        {"num_workers": 0},
    ),
    ("lora", "LoRA", "flan-t5-xxl", 32, 2, "32-true", "adamw", False, "auto", -1, {"lora": True}),
    ("qlora", "QLoRA", "flan-t5-xxl", 64, 1, "32-true", "adamw", False, "auto", -1, {"qlora": True}),
]


# What torch reports as total_memory for the lab's "80 GB" cards (their OOM messages print it): the capacity a
# verdict about them must use. An "80 GB" card holds less than 80 GiB.
LAB_CARD_BYTES = {"a100": int(79.35 * 1024**3), "h100": int(79.11 * 1024**3)}

# The longest caption of a lab batch, in tokens: short captions (COCO-style, ~11 words on average) padded to
# the longest of 16-64 of them come to about 20-25 tokens with the BOS token.
LAB_CAPTION_TOKENS = 24


def _lab_preset(gpu: str, row: _LabRow) -> dict[str, Any]:
    name, experiment, model, bs, acc, prec, optim, ckpt, strategy, max_steps, extra = row
    model_id = _MODELS[model]
    train: dict[str, Any] = {
        "batch_size": bs,
        "accumulate_grad_batches": acc,
        "precision": prec,
        "optim": optim,
        "lr": extra.get("lr", 5e-6),
        "act_ckpt": ckpt,
        "max_epochs": 2,
        "max_steps": max_steps,
        "num_train_samples": 512,
        "num_workers": extra.get("num_workers", 8),
        "strategy": strategy,
        "devices": 1,
        "lora": {"enabled": bool(extra.get("lora")), "r": 16, "alpha": 32, "dropout": 0.05},
        "qlora": bool(extra.get("qlora")),
    }
    desc = (
        f"Seed lab ({gpu.upper()} 80GB) — {experiment}: {model_id.split('/')[-1]}, {prec}, {optim}, bs {bs}/acc {acc}"
    )
    if ckpt:
        desc += ", act ckpt"
    return {
        "name": f"{gpu}/{name}",
        "description": desc,
        "model": {"id": model_id, "weights": "auto", "dtype": "float32", "quantization": "none", "device_map": "cuda"},
        "job": {"kind": "train"},
        "train": train,
        # The lab tokenizes the captions alone (processor.tokenizer, padding=True to the longest caption of the
        # batch, max_length=50): no image placeholders, so BLIP-2's language model sees the caption only. Its
        # captions are not shipped; LAB_CAPTION_TOKENS models the longest caption of a batch (docs/memory-model.md).
        "data": {
            "source": "synthetic",
            "max_length": 50,
            "caption_tokens": LAB_CAPTION_TOKENS,
            "image_placeholders": False,
        },
        "runtime": {"alloc_conf": "", "sample_hz": 10.0},
    }


def _simple(name: str, description: str, **tables: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "description": description, **tables}


_SPLIT_MAP = {
    "language_model": 0,
    "vision_model": "cpu",
    "qformer": "cpu",
    "language_projection": "cpu",
    "query_tokens": "cpu",
}

_OTHER: list[dict[str, Any]] = [
    # Seed 000: load on the CPU first, then move, with a smaller allocator split size.
    _simple(
        "load/cpu-first",
        "Seed 000: blip2-flan-t5-xxl loaded on CPU first, then moved to the GPU; max_split_size_mb:128",
        model={"id": "Salesforce/blip2-flan-t5-xxl", "dtype": "float16", "device_map": "cpu-first"},
        job={"kind": "load"},
        runtime={"alloc_conf": "max_split_size_mb:128"},
    ),
    # Seed 001: everything on the GPU in fp16, versus the language model alone on GPU 0.
    _simple(
        "load/fp16-gpu",
        "Seed 001: blip2-opt-2.7b in fp16, all on the GPU (measured there: 13 GB, 0.5 s per caption)",
        model={"id": "Salesforce/blip2-opt-2.7b", "dtype": "float16", "device_map": "cuda"},
        job={"kind": "generate"},
    ),
    _simple(
        "load/split-language-model",
        "Seed 001: blip2-opt-2.7b fp16, language_model on GPU 0, vision/Q-Former/projection on CPU (10 GB, 2 s)",
        model={"id": "Salesforce/blip2-opt-2.7b", "dtype": "float16", "device_map": dict(_SPLIT_MAP)},
        job={"kind": "generate"},
    ),
    _simple(
        "load/auto",
        "Seed 003: mBLIP mT0-XL with device_map='auto' (accelerate places modules by free memory)",
        model={"id": "Gregor/mblip-mt0-xl", "dtype": "float32", "device_map": "auto"},
        job={"kind": "load"},
    ),
    _simple(
        "load/mblip-8bit",
        "Seed 003: mBLIP mT0-XL loaded in 8-bit (bitsandbytes), device_map='auto' (demo ~10 GB VRAM)",
        model={"id": "Gregor/mblip-mt0-xl", "quantization": "8bit", "device_map": "auto"},
        job={"kind": "generate"},
    ),
    _simple(
        "load/mblip-bf16",
        "Seed 003: mBLIP mT0-XL in bfloat16, device_map='auto'",
        model={"id": "Gregor/mblip-mt0-xl", "dtype": "bfloat16", "device_map": "auto"},
        job={"kind": "generate"},
    ),
    _simple(
        "load/mblip-cpu",
        "Seed 003: mBLIP mT0-XL CPU-only inference (~20 GB of RAM)",
        model={"id": "Gregor/mblip-mt0-xl", "dtype": "float32", "device_map": "cpu"},
        job={"kind": "generate"},
    ),
    # Seed 004: BLIP VQA base with LoRA on query/value, and QLoRA.
    _simple(
        "train/blip-vqa-lora",
        "Seed 004: BLIP VQA base (385M), LoRA r=16 alpha=32 on query/value, batch 32 (16-18 GB there)",
        model={"id": "Salesforce/blip-vqa-base", "device_map": "cuda"},
        train={
            "batch_size": 32,
            "lr": 5e-5,
            "max_epochs": 1,
            "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.1, "target_modules": ["query", "value"]},
        },
        data={"max_length": 32},
    ),
    _simple(
        "train/blip-vqa-qlora",
        "Seed 004: BLIP VQA base QLoRA (4-bit NF4 base + LoRA r=16 on query/value), batch 32 (under 5 GB there)",
        model={"id": "Salesforce/blip-vqa-base", "device_map": "cuda"},
        train={
            "batch_size": 32,
            "lr": 5e-5,
            "max_epochs": 1,
            "qlora": True,
            "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["query", "value"]},
        },
        data={"max_length": 32},
    ),
    _simple(
        "train/mblip-bloomz-qlora",
        "Seed 003: mBLIP BLOOMZ-7B, 4-bit base with LoRA on the language model",
        model={"id": "Gregor/mblip-bloomz-7b", "quantization": "4bit-nf4", "device_map": "cuda"},
        train={
            "batch_size": 8,
            "lr": 2e-4,
            "max_epochs": 1,
            "qlora": True,
            "lora": {"enabled": True, "r": 8, "alpha": 16},
        },
    ),
    # Tiny demos: random weights, built in code, run anywhere in seconds.
    _simple(
        "tiny/blip2-opt",
        "Tiny BLIP-2 with an OPT decoder (random weights): the default demo, runs on any CPU",
        model={"id": "tiny/blip2-opt", "weights": "random"},
        train={"batch_size": 8, "lr": 1e-3, "max_epochs": 2, "num_train_samples": 96, "num_workers": 0},
        data={"max_length": 24},
    ),
    _simple(
        "tiny/blip2-t5",
        "Tiny BLIP-2 with a T5 encoder-decoder (random weights)",
        model={"id": "tiny/blip2-t5", "weights": "random"},
        train={"batch_size": 8, "lr": 1e-3, "max_epochs": 2, "num_train_samples": 96, "num_workers": 0},
        data={"max_length": 24},
    ),
    _simple(
        "tiny/blip-vqa",
        "Tiny BLIP (v1) VQA model (random weights)",
        model={"id": "tiny/blip-vqa", "weights": "random"},
        train={"batch_size": 8, "lr": 1e-3, "max_epochs": 2, "num_train_samples": 96, "num_workers": 0},
        data={"max_length": 24},
    ),
]


def _all() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for gpu, rows in (("h100", _H100), ("a100", _A100)):
        for row in rows:
            p = _lab_preset(gpu, row)
            out[p["name"]] = p
    for p in _OTHER:
        out[p["name"]] = p
    return out


_PRESETS = _all()
GROUPS = ("tiny", "h100", "a100", "load", "train")


def names() -> list[str]:
    return list(_PRESETS)


def exists(name: str) -> bool:
    return name in _PRESETS


def get(name: str) -> dict[str, Any]:
    """A deep copy, so callers may merge overrides into it freely."""
    return copy.deepcopy(_PRESETS[name])


def group(prefix: str) -> list[str]:
    """Preset names in a group, e.g. ``h100/`` (the trailing slash is optional)."""
    prefix = prefix.rstrip("/") + "/"
    return [n for n in _PRESETS if n.startswith(prefix)]
