"""The architectures blipmon knows: their configs, parameter counts and parameter bytes per dtype and quantization.

Everything here is computed from the shipped ``config.json`` files by instantiating the model class on the meta
device (no weights, no network): parameter counts are never typed in, so a wrong config shows up as a wrong count
instead of hiding behind a hand-written number.

Two rules make the numbers match what ``from_pretrained`` really allocates, not just what the class builds:

- Untied heads. Building a model from its config ties every pair listed in ``_tied_weights_keys`` (transformers 5
  forces ``tie_word_embeddings=True`` on T5/mT5 configs). ``from_pretrained`` unties a pair when the checkpoint
  stores both tensors with different values, which is the case when the original config says
  ``"tie_word_embeddings": false`` (FLAN-T5, mT0: their ``lm_head`` was trained on its own). ``untie_like_checkpoint``
  applies that rule, so ``blip2-flan-t5-xl`` counts 3.94B parameters like the checkpoint, not 3.88B.
- Quantized sizes follow transformers' bitsandbytes integration: which ``nn.Linear`` modules are replaced is decided
  with transformers' own helpers (``get_keys_to_not_convert``: tied weights, the output embedding and the last
  parameter; plus the model's ``_keep_in_fp32_modules``, e.g. BLIP-2's ``qformer`` and T5's ``wo``), and the bytes
  of each replaced layer follow bitsandbytes' storage (8-bit: int8 weight + one fp32 scale per output row; 4-bit:
  two weights per byte + one fp32 absmax per 64-weight block + a 16-entry fp32 code, with the nested variant for
  double quantization). Everything else keeps the load dtype, with ``_keep_in_fp32_modules`` upcast to fp32 when the
  load dtype is float16, as ``from_pretrained`` does. ``tests/unit/test_architectures.py`` checks this rule against
  the storages of a tiny model really loaded in 8-bit and 4-bit.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

# Display order: the seven BLIP-2 checkpoints of seed 000, then BLIP VQA (seed 004), then mBLIP (seed 003).
KNOWN_IDS: tuple[str, ...] = (
    "Salesforce/blip2-opt-2.7b",
    "Salesforce/blip2-opt-6.7b",
    "Salesforce/blip2-flan-t5-xl",
    "Salesforce/blip2-flan-t5-xxl",
    "Salesforce/blip2-opt-2.7b-coco",
    "Salesforce/blip2-opt-6.7b-coco",
    "Salesforce/blip2-flan-t5-xl-coco",
    "Salesforce/blip-vqa-base",
    "Gregor/mblip-mt0-xl",
    "Gregor/mblip-bloomz-7b",
)

DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
_DTYPE_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZATIONS: tuple[str, ...] = ("none", "8bit", "4bit-nf4", "4bit-fp4")

# bitsandbytes storage constants (bitsandbytes 0.50: Params4bit's default block size, on every device).
BNB_4BIT_BLOCKSIZE = 64
BNB_4BIT_CODE_ENTRIES = 16  # the nf4 / fp4 lookup table, copied per layer
BNB_NESTED_BLOCKSIZE = 256  # double quantization re-quantizes the absmax values in blocks of 256
BNB_NESTED_CODE_ENTRIES = 256  # the dynamic 8-bit map, copied per layer


def _filename(model_id: str) -> str:
    return model_id.replace("/", "--") + ".json"


def canonical_id(model_id: str) -> str | None:
    """The known id spelled as shipped (hub ids are case-insensitive), or None."""
    if model_id in KNOWN_IDS:
        return model_id
    low = model_id.lower()
    return next((k for k in KNOWN_IDS if k.lower() == low), None)


def known_ids() -> list[str]:
    """Ids of the architectures whose configs ship inside blipmon, in display order."""
    return list(KNOWN_IDS)


@functools.cache
def _raw(model_id: str) -> dict[str, Any]:
    text = resources.files(__package__).joinpath(_filename(model_id)).read_text(encoding="utf-8")
    data = json.loads(text)  # data only: never eval, never unpickle
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ValueError(f"{_filename(model_id)}: not a config.json object with a model_type")
    return data


def raw_config(model_id: str) -> dict[str, Any] | None:
    """The shipped config.json content of ``model_id`` (a fresh copy), or None for an unknown id."""
    mid = canonical_id(model_id)
    return None if mid is None else copy.deepcopy(_raw(mid))


def _config_from_dict(raw: dict[str, Any]) -> Any:
    from transformers import Blip2Config, BlipConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    classes = {"blip-2": Blip2Config, "blip": BlipConfig}
    cls = classes.get(raw["model_type"]) or CONFIG_MAPPING[raw["model_type"]]
    return cls.from_dict(copy.deepcopy(raw))


def architecture_config(model_id: str) -> Any:
    """A fresh ``transformers`` config for a known id (Blip2Config, BlipConfig, ...), or None for an unknown id.

    Fresh on every call because configs are mutable and callers (the runner) set dtypes on them.
    """
    raw = raw_config(model_id)
    return None if raw is None else _config_from_dict(raw)


def model_class(config: Any) -> Any:
    """The class the seeds train for this architecture (kept in step with ``blipmon.runner.models.model_class``)."""
    from transformers import Blip2ForConditionalGeneration, BlipForQuestionAnswering

    classes = {"blip-2": Blip2ForConditionalGeneration, "blip": BlipForQuestionAnswering}
    mt = getattr(config, "model_type", "")
    if mt not in classes:
        raise ValueError(f"model_type {mt!r} is not supported yet (supported: {', '.join(classes)})")
    return classes[mt]


def family_of(config: Any) -> str:
    """Same families as the runner: ``blip2-decoder`` | ``blip2-encdec`` | ``blip-vqa``."""
    if config.model_type == "blip":
        return "blip-vqa"
    return "blip2-decoder" if config.use_decoder_only_language_model else "blip2-encdec"


def _require(model_id: str) -> str:
    mid = canonical_id(model_id)
    if mid is None:
        raise KeyError(f"unknown architecture {model_id!r}; known: {', '.join(KNOWN_IDS)}")
    return mid


def untie_like_checkpoint(model: Any, source: str | dict[str, Any]) -> int:
    """Give the language model its own output head where the real checkpoint stores one; returns parameters added.

    ``source`` is a known id or a raw config dict. Works on meta models and on real ones (random weights): the new
    head is a copy of the input embedding on the same device and dtype, so the memory is the checkpoint's. Mirrors
    ``PreTrainedModel.tie_weights`` during ``from_pretrained``, which also drops the pair from
    ``all_tied_weights_keys``.
    """
    import torch

    raw = source if isinstance(source, dict) else raw_config(source)
    if raw is None:
        return 0
    pairs: list[tuple[dict[str, Any], Any, str]] = []
    if isinstance(raw.get("text_config"), dict) and hasattr(model, "language_model"):
        pairs.append((raw["text_config"], model.language_model, "language_model."))
    else:
        pairs.append((raw, model, ""))
    added = 0
    for text_raw, lm, prefix in pairs:
        if text_raw.get("tie_word_embeddings") is not False:
            continue
        out, inp = lm.get_output_embeddings(), lm.get_input_embeddings()
        if out is None or inp is None or out.weight is not inp.weight:
            continue
        out.weight = torch.nn.Parameter(inp.weight.detach().clone(), requires_grad=inp.weight.requires_grad)
        added += out.weight.numel()
        out_name = next(n for n, m in lm.named_modules() if m is out)
        tied = getattr(model, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            tied.pop(f"{prefix}{out_name}.weight", None)
    return added


def upcast_like_pretrained(model: Any, dtype: Any) -> int:
    """Upcast ``_keep_in_fp32_modules`` to fp32 as ``from_pretrained(dtype=float16)`` does; returns tensors changed.

    ``_from_config(config, dtype=float16)`` (the random-weights path) leaves everything in fp16, so without this a
    random BLIP-2 in fp16 would weigh less than the real checkpoint (its Q-Former stays fp32, T5's ``wo`` too).
    ``_keep_in_fp32_modules_strict`` is upcast for bfloat16 as well. Parameters keep their identity (tied
    references stay tied).
    """
    import torch

    name = str(dtype).removeprefix("torch.")
    keep = module_pattern(model._keep_in_fp32_modules) if name == "float16" else None
    strict = (
        module_pattern(getattr(model, "_keep_in_fp32_modules_strict", None))
        if name in ("float16", "bfloat16")
        else None
    )
    changed = 0
    for pname, p in model.named_parameters():
        hit = (keep and keep.search(pname)) or (strict and strict.search(pname))
        if hit and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.to(torch.float32)
            changed += 1
    return changed


@dataclass(frozen=True)
class _Param:
    """One unique parameter of the meta model, with what decides its bytes."""

    module: str  # top-level child (vision_model, qformer, query_tokens, language_model, ...)
    numel: int
    keep_fp32: bool  # matches _keep_in_fp32_modules: fp32 when loading in float16
    keep_fp32_strict: bool  # matches _keep_in_fp32_modules_strict: fp32 when loading in float16 or bfloat16
    quant_shape: tuple[int, int] | None  # (out, in) when bitsandbytes replaces the Linear holding this weight


@dataclass(frozen=True)
class _Analysis:
    params: tuple[_Param, ...]

    @property
    def count(self) -> int:
        return sum(p.numel for p in self.params)


def module_pattern(keys: Any) -> re.Pattern[str] | None:
    """transformers' dtype-plan matching: an unanchored search for any of the keys (``*`` as a wildcard)."""
    keys = sorted(keys or ())
    if not keys:
        return None
    return re.compile("|".join(f"(?:{k.replace('*', '.*')})" for k in keys))


def _modules_to_not_convert(model: Any, skip_modules: list[str] | None) -> list[str]:
    """The Linear modules bitsandbytes leaves alone, decided by transformers' own helper where it has one."""
    keep = list(model._keep_in_fp32_modules or [])
    try:
        from transformers.quantizers.base import HfQuantizer

        return HfQuantizer.get_modules_to_not_convert(model, skip_modules, keep)
    except (ImportError, AttributeError):  # older/newer transformers: same rule, spelled out
        out = list(skip_modules or [])
        if skip_modules is None:
            tied = getattr(model, "all_tied_weights_keys", {}) or {}
            keys = set(tied) | set(tied.values()) | {list(model.named_parameters())[-1][0]}
            head = model.get_output_embeddings()
            keys |= {n for n, m in model.named_modules() if head is not None and m is head}
            out = [k.removesuffix(".weight") for k in keys]
        return list(set(out + keep))


def _should_convert(name: str, patterns: list[str]) -> bool:
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return bool(should_convert_module(name, patterns))
    except ImportError:
        boundary = r"(?:(?<=\.)|(?=\.|$))"
        return not any(re.match(rf"(?:{k}){boundary}", name) or name.endswith(k) for k in patterns)


def _no_init() -> Any:
    """Skip torch's per-layer init calls (meaningless on meta, ~40% of the build time); the caller re-ties."""
    try:
        from transformers.initialization import no_init_weights

        return no_init_weights()
    except ImportError:  # pragma: no cover - older transformers
        import contextlib

        return contextlib.nullcontext()


def _build_meta(config: Any) -> Any:
    """The model class instantiated on the meta device, tied exactly as a plain ``cls(config)`` would be."""
    import torch

    cls = model_class(config)
    config = copy.deepcopy(config)
    with torch.device("meta"):
        with _no_init():
            model = cls(config)
        model.init_weights()  # on meta this only ties weights, which _no_init skipped
    return model


def resolve_config(model: str | dict[str, Any] | Any) -> tuple[Any, dict[str, Any] | None]:
    """(config, raw config.json dict or None) for a known id, a raw dict or a config object."""
    if isinstance(model, str):
        raw = _raw(_require(model))
        return _config_from_dict(raw), raw
    if isinstance(model, dict):
        return _config_from_dict(model), model
    return model, None


def meta_model(model: str | dict[str, Any] | Any) -> Any:
    """The full-size model on the meta device (no memory), with its heads tied or not as the checkpoint has them.

    ``model`` is a known id, a raw config.json dict or a transformers config. For the estimator and for tests;
    never cached (modules are mutable).
    """
    config, raw = resolve_config(model)
    built = _build_meta(config)
    if raw is not None:
        untie_like_checkpoint(built, raw)
    return built


def _analyse(config: Any, raw: dict[str, Any] | None, skip_modules: list[str] | None = None) -> _Analysis:
    """Instantiate on meta and record, per unique parameter, what decides its bytes under each load."""
    from torch import nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - Conv1D has lived there for years
        Conv1D = ()  # noqa: N806

    model = _build_meta(config)
    # Decided on the tied model, as from_pretrained does before loading any weight.
    not_convert = _modules_to_not_convert(model, skip_modules)
    quantized: dict[int, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if (type(module) is nn.Linear or isinstance(module, Conv1D)) and _should_convert(name, not_convert):
            if isinstance(module, Conv1D):
                in_f, out_f = module.weight.shape
            else:
                in_f, out_f = module.in_features, module.out_features
            quantized[id(module.weight)] = (int(out_f), int(in_f))
    if raw is not None:
        untie_like_checkpoint(model, raw)
    keep = module_pattern(model._keep_in_fp32_modules)
    strict = module_pattern(getattr(model, "_keep_in_fp32_modules_strict", None))
    params = tuple(
        _Param(
            module=name.split(".", 1)[0],
            numel=int(p.numel()),
            keep_fp32=bool(keep and keep.search(name)),
            keep_fp32_strict=bool(strict and strict.search(name)),
            quant_shape=quantized.get(id(p)),
        )
        for name, p in model.named_parameters()  # unique parameters: tied ones once
        if p.is_floating_point()
    )
    return _Analysis(params)


@functools.cache
def _analysis_for(model_id: str) -> _Analysis:
    raw = _raw(model_id)
    return _analyse(_config_from_dict(raw), raw)


def param_count(model_id: str) -> int:
    """Parameters of the checkpoint as loaded (unique: tied weights once), from the architecture. Cached."""
    return _analysis_for(_require(model_id)).count


def _quantized_linear_bytes(out_f: int, in_f: int, quantization: str, double_quant: bool) -> int:
    n = out_f * in_f
    if quantization == "8bit":
        return n + 4 * out_f  # int8 weight (CB aliases it) + fp32 SCB per output row
    blocks = -(-n // BNB_4BIT_BLOCKSIZE)
    packed = (n + 1) // 2  # uint8 storage, two 4-bit weights per byte
    code = 4 * BNB_4BIT_CODE_ENTRIES
    if not double_quant:
        return packed + 4 * blocks + code  # fp32 absmax per block
    nested_blocks = -(-blocks // BNB_NESTED_BLOCKSIZE)
    # uint8 absmax per block + fp32 offset + fp32 absmax per nested block + fp32 nested code
    return packed + blocks + 4 + 4 * nested_blocks + 4 * BNB_NESTED_CODE_ENTRIES + code


def normalise_dtype(dtype: str, quantization: str) -> tuple[str, str]:
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in _DTYPE_SIZE:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
    quantization = {"4bit": "4bit-nf4", "int8": "8bit"}.get(quantization, quantization)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    return dtype, quantization


def _bytes(analysis: _Analysis, dtype: str, quantization: str, double_quant: bool) -> dict[str, int]:
    dtype, quantization = normalise_dtype(dtype, quantization)
    size = _DTYPE_SIZE[dtype]
    out: dict[str, int] = {}
    for p in analysis.params:
        if quantization != "none" and p.quant_shape is not None:
            nbytes = _quantized_linear_bytes(*p.quant_shape, quantization.split("-")[0], double_quant)
        elif (p.keep_fp32 and dtype == "float16") or (p.keep_fp32_strict and dtype in ("float16", "bfloat16")):
            nbytes = 4 * p.numel
        else:
            nbytes = size * p.numel
        out[p.module] = out.get(p.module, 0) + nbytes
    return out


def param_bytes(
    model: str | dict[str, Any] | Any,
    dtype: str = "float32",
    quantization: str = "none",
    *,
    double_quant: bool = False,
    by_module: bool = False,
) -> int | dict[str, int]:
    """Bytes of parameter storages as ``from_pretrained(dtype=..., quantization_config=...)`` allocates them.

    ``model`` is a known id, a raw config.json dict or a transformers config (for local or tiny models; those two are
    not cached, and a config object cannot tell an untied checkpoint head, so pass the raw dict when it matters). ``quantization`` is
    ``none`` | ``8bit`` | ``4bit-nf4`` | ``4bit-fp4`` (nf4 and fp4 take the same bytes). Quantized sizes include the
    quantization state (8-bit row scales, 4-bit absmax and code tables). With ``by_module`` the bytes are split by
    top-level module (``vision_model``, ``qformer``, ``language_model``, ...), the unit device maps place.
    """
    analysis = _analysis_for(_require(model)) if isinstance(model, str) else _analyse(*resolve_config(model))
    parts = _bytes(analysis, dtype, quantization, double_quant)
    return parts if by_module else sum(parts.values())


def params_by_module(model_id: str) -> dict[str, int]:
    """Parameter counts per top-level module (unique parameters)."""
    out: dict[str, int] = {}
    for p in _analysis_for(_require(model_id)).params:
        out[p.module] = out.get(p.module, 0) + p.numel
    return out


@functools.cache
def _describe(model_id: str) -> dict[str, Any]:
    raw = _raw(model_id)
    config = _config_from_dict(raw)
    analysis = _analysis_for(model_id)
    text = raw.get("text_config") or {}
    return {
        "id": model_id,
        "family": family_of(config),
        "model_type": raw["model_type"],
        "language_model": text.get("model_type", "blip_text_model"),
        "class": model_class(config).__name__,
        "params": analysis.count,
        "params_by_module": params_by_module(model_id),
        "bytes": {d: sum(_bytes(analysis, d, "none", False).values()) for d in DTYPE_NAMES},
        "quantized": {
            q: {d: sum(_bytes(analysis, d, q, False).values()) for d in DTYPE_NAMES} for q in ("8bit", "4bit-nf4")
        },
    }


def describe(model_id: str) -> dict[str, Any]:
    """Everything ``blipmon models`` shows for one id: family, parameters, parameter bytes per dtype and quantization.

    ``bytes[dtype]`` is an unquantized load in that dtype; ``quantized[q][dtype]`` a bitsandbytes load (no double
    quantization) whose unquantized parts are in ``dtype``. All in bytes, integers.
    """
    return copy.deepcopy(_describe(_require(model_id)))
