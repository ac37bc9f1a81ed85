"""Build a model with random weights that allocates exactly what ``from_pretrained`` would, quantized or not.

``weights = "random"`` must give the memory of the real checkpoint without downloading it. For unquantized loads
``cls._from_config`` plus ``catalog.untie_like_checkpoint`` and ``catalog.upcast_like_pretrained`` is enough. A
bitsandbytes load cannot be done that way: ``from_pretrained`` quantizes the checkpoint's tensors as it reads them,
and with no checkpoint it leaves every weight unquantized. ``build_random`` walks the same steps without a file:

1. the model skeleton with parameters on the meta device (buffers real, as they are computed in ``__init__``),
   built in the load dtype;
2. transformers' own ``HfQuantizer.preprocess_model`` swaps ``nn.Linear`` for bitsandbytes layers, with the same
   skip list as ``from_pretrained`` (tied weights, output embedding, ``_keep_in_fp32_modules``);
3. the heads the checkpoint keeps separate are untied;
4. each parameter is materialised on the target device, one at a time (peak extra memory: one layer): bitsandbytes
   weights are drawn in the load dtype and quantized on the device exactly as transformers' ``Bnb*Quantize`` ops
   do; the rest is drawn in the load dtype (fp32 for ``_keep_in_fp32_modules`` in float16).

The values are random (normal, std 0.02; norms at one, biases at zero): fine for memory and timing, meaningless
for accuracy. ``tests/unit/test_architectures.py`` checks the storages against a real ``from_pretrained`` load.
"""

from __future__ import annotations

import copy
from typing import Any

from blipmon.architectures import catalog


def _bnb_config(quantization: str, double_quant: bool, compute_dtype: Any) -> Any:
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.split("-")[1],
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _fill(t: Any, name: str, std: float, generators: dict[str, Any]) -> Any:
    """Random values that keep a forward pass finite: norms at one, biases at zero, the rest N(0, std)."""
    if not t.is_floating_point() or name.rsplit(".", 1)[-1] == "bias":
        return t.zero_()
    if t.dim() == 1 and ("norm" in name.lower() or "ln" in name.lower()):
        return t.fill_(1.0)
    return t.normal_(0.0, std, generator=generators[str(t.device)])


def build_random(
    model: str | dict[str, Any] | Any,
    *,
    dtype: str = "float32",
    quantization: str = "none",
    double_quant: bool = False,
    compute_dtype: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    std: float = 0.02,
) -> Any:
    """A random-weight model whose parameter storages are those ``from_pretrained`` allocates for the checkpoint.

    ``model`` is a known id, a raw config.json dict or a transformers config. ``dtype`` is the load dtype
    (``float32`` | ``bfloat16`` | ``float16``), ``quantization`` one of ``catalog.QUANTIZATIONS``; the 4-bit
    ``compute_dtype`` defaults to the load dtype. Everything lands on the single ``device`` (``cpu``, ``cuda``,
    ``cuda:1``...), as ``device_map={"": device}`` would place it; move unquantized models afterwards if needed.
    """
    import torch
    from accelerate import init_empty_weights

    config, raw = catalog.resolve_config(model)
    dtype, quantization = catalog.normalise_dtype(dtype, quantization)
    tdtype = getattr(torch, dtype)
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    cls = catalog.model_class(config)

    with init_empty_weights(include_buffers=False):
        skeleton = cls._from_config(copy.deepcopy(config), dtype=tdtype)
    # accelerate re-wraps every registered parameter, which breaks the identity tying relies on: tie again.
    skeleton.tie_weights(recompute_mapping=False)
    if quantization != "none":
        from transformers.quantizers import AutoHfQuantizer

        qconfig = _bnb_config(quantization, double_quant, getattr(torch, compute_dtype or dtype))
        quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=False)
        quantizer.preprocess_model(model=skeleton, dtype=tdtype, device_map={"": target}, checkpoint_files=None)
    if raw is not None:
        catalog.untie_like_checkpoint(skeleton, raw)

    keep = catalog.module_pattern(skeleton._keep_in_fp32_modules) if dtype == "float16" else None
    strict_keys = getattr(skeleton, "_keep_in_fp32_modules_strict", None)
    strict = catalog.module_pattern(strict_keys) if dtype in ("float16", "bfloat16") else None
    # One generator per device the values are drawn on: the target, and the CPU for 8-bit weights (which
    # bitsandbytes quantizes while moving them from the CPU, as transformers does).
    generators = {str(d): torch.Generator(device=d).manual_seed(seed) for d in {torch.device("cpu"), target}}
    done: dict[int, torch.nn.Parameter] = {}
    with torch.no_grad():
        for mod_name, module in skeleton.named_modules():
            for pname, param in list(module.named_parameters(recurse=False)):
                if id(param) not in done:
                    full = f"{mod_name}.{pname}" if mod_name else pname
                    done[id(param)] = _materialise(param, full, tdtype, target, keep, strict, std, generators)
                module._parameters[pname] = done[id(param)]  # tied names share one tensor, as loaded
            for bname, buf in list(module.named_buffers(recurse=False)):
                if buf is not None and buf.device != target:
                    module._buffers[bname] = buf.to(target)
    if quantization != "none":
        quantizer.postprocess_model(skeleton)
        skeleton.hf_quantizer = quantizer
    skeleton.eval()
    return skeleton


def _materialise(
    param: Any, name: str, dtype: Any, device: Any, keep: Any, strict: Any, std: float, generators: dict[str, Any]
) -> Any:
    """One parameter on ``device``: quantized the way transformers' Bnb*Quantize ops do it, or plain."""
    import torch

    kind = type(param).__name__
    if kind in ("Params4bit", "Int8Params"):
        import bitsandbytes as bnb

        kwargs = dict(param.__dict__)
        if kind == "Params4bit":  # drawn on the device, quantized there (transformers' Bnb4bitQuantize)
            value = _fill(torch.empty(tuple(param.shape), dtype=dtype, device=device), name, std, generators)
            return bnb.nn.Params4bit(value, requires_grad=False, **kwargs).to(device)
        kwargs.pop("SCB", None)  # drawn on the CPU, quantized on the move (transformers' Bnb8bitQuantize)
        value = _fill(torch.empty(tuple(param.shape), dtype=dtype), name, std, generators)
        return bnb.nn.Int8Params(value, requires_grad=False, **kwargs).to(device)
    target_dtype = param.dtype
    if param.is_floating_point():
        upcast = (keep is not None and keep.search(name)) or (strict is not None and strict.search(name))
        target_dtype = torch.float32 if upcast else dtype
    value = _fill(torch.empty(tuple(param.shape), dtype=target_dtype, device=device), name, std, generators)
    # Loaded parameters are fresh nn.Parameters: trainable, even the bias of a layer bitsandbytes replaced.
    return torch.nn.Parameter(value, requires_grad=value.is_floating_point())
