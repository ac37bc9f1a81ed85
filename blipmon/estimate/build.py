"""Building the model a run would train, without weights: on the meta device, or as fake tensors.

The estimate is only as good as its copy of the run, so this module follows ``blipmon.runner.models.load_model``
step by step (weight dtype per precision mode, the bitsandbytes quantization that QLoRA implies, tied heads) and
then hands the model to the runner's own ``apply_peft`` and ``enable_activation_checkpointing``: LoRA targets,
``prepare_model_for_kbit_training``'s fp32 upcast and which parameters stay trainable are decided by the same code
that trains. Nothing here allocates real parameter memory.

Two copies are built. The *full* model lives on the meta device and gives the parameter, gradient and optimizer
bytes exactly. The *short* model keeps at most ``KEEP_LAYERS`` layers per stack (vision encoder, Q-Former, language
model encoder/decoder) at full width and is converted to fake tensors, so a forward and backward pass on it costs
seconds however large the real model is; ``activations.py`` scales its per-layer figures back to full depth.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from blipmon.core.config import ConfigError

KEEP_LAYERS = 2  # layer 0 can be special (T5's relative position bias); layer 1 is a typical one
# Config attributes that count the layers of one stack, in the configs of the families blipmon trains.
_LAYER_KEYS = ("num_hidden_layers", "num_layers", "num_decoder_layers", "n_layer")


@dataclass
class Spec:
    """What of a configuration decides the model's memory, resolved the way the runner resolves it."""

    model_id: str
    arch: Any  # transformers PretrainedConfig of the full-size architecture
    family: str  # blip2-decoder | blip2-encdec | blip-vqa
    dtype: torch.dtype  # weight dtype at load
    quantization: str  # none | 8bit | 4bit-nf4 | 4bit-fp4 (after QLoRA's implied 4-bit)
    train: bool
    untie_from: str | None = None  # known hub id whose checkpoint stores an untied head
    notes: list[str] = field(default_factory=list)


def architecture(model_id: str, trust_remote_code: bool = False) -> tuple[Any, str | None]:
    """The architecture config of a model id without downloading anything: (config, known id or None).

    Tiny ids come from the runner, real ids from blipmon's shipped catalog, anything else from a local
    directory or the Hugging Face cache (``local_files_only``).
    """
    from blipmon.runner.models import TINY_MODELS, tiny_config

    if model_id in TINY_MODELS:
        return tiny_config(model_id), None
    try:
        from blipmon.architectures.catalog import architecture_config, canonical_id
    except ImportError:  # the catalog ships separately; without it only local configs work
        architecture_config = canonical_id = None  # type: ignore[assignment]
    if architecture_config is not None:
        cfg = architecture_config(model_id)
        if cfg is not None:
            return cfg, canonical_id(model_id)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_id, local_files_only=True, trust_remote_code=trust_remote_code), None
    except Exception as e:  # noqa: BLE001 - any failure means "not available offline"
        raise ConfigError(
            f"model.id = {model_id!r}: no architecture for it here (not a tiny model, not in blipmon's catalog, "
            f"no local config.json): {type(e).__name__}"
        ) from None


def resolve_spec(cfg: dict[str, Any]) -> Spec:
    """Mirror ``load_model``'s decisions for ``cfg`` (weights dtype, implied 4-bit for QLoRA)."""
    from blipmon.runner.models import family_of, model_class, weights_dtype

    m, t = cfg["model"], cfg["train"]
    arch, known = architecture(m["id"], bool(m.get("trust_remote_code", False)))
    if getattr(arch, "model_type", "") == "blip-2" and getattr(arch, "image_token_index", None) is None:
        # As the runner does for checkpoints older than the image placeholder token (mBLIP).
        arch.image_token_index = int(arch.text_config.vocab_size) - 1
    try:
        model_class(arch)
    except ValueError as e:
        raise ConfigError(f"model.id = {m['id']!r}: {e}") from None
    train = cfg["job"]["kind"] == "train"
    quant = m["quantization"]
    if t["qlora"] and train and quant == "none":
        quant = "4bit-nf4"
    spec = Spec(
        model_id=m["id"],
        arch=arch,
        family=family_of(arch),
        dtype=weights_dtype(cfg),
        quantization=quant,
        train=train,
        untie_from=known,
    )
    return spec


def short_config(arch: Any, keep: int = KEEP_LAYERS) -> Any:
    """A copy of ``arch`` with at most ``keep`` layers in every stack, all widths unchanged."""
    short = copy.deepcopy(arch)

    def walk(c: Any) -> None:
        # T5 derives num_decoder_layers from num_layers only when it is None; both are set explicitly here.
        for key in _LAYER_KEYS:
            v = getattr(c, key, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > keep:
                setattr(c, key, keep)
        layer_types = getattr(c, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) > keep:
            c.layer_types = layer_types[:keep]
        for sub in getattr(c, "sub_configs", {}) or {}:
            sc = getattr(c, sub, None)
            if sc is not None and hasattr(sc, "to_dict"):
                walk(sc)

    walk(short)
    return short


def _bnb_config(spec: Spec) -> Any:
    """The BitsAndBytesConfig ``load_model`` passes for this quantization, or None."""
    if spec.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quantization.split("-")[1],
        bnb_4bit_compute_dtype=torch.bfloat16 if spec.dtype == torch.bfloat16 else torch.float32,
        bnb_4bit_use_double_quant=False,
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers and peft warn about things that matter for real weights only (missing keys, meta tensors)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    peft_log = logging.getLogger("peft")
    old_peft = peft_log.level
    peft_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        peft_log.setLevel(old_peft)


def build_meta(spec: Spec, arch: Any, cfg: dict[str, Any]) -> Any:
    """The model as the runner would train it, on the meta device: quantized, untied, LoRA-wrapped.

    ``arch`` is ``spec.arch`` or its shortened copy. The returned model is in train mode; activation
    checkpointing is not enabled here (it only matters to the fake forward, see ``to_fake``).
    """
    from transformers.modeling_utils import local_torch_dtype

    from blipmon.runner.models import LoadedModel, model_class
    from blipmon.runner.train import apply_peft

    cls = model_class(arch)
    arch = copy.deepcopy(arch)
    bnb_cfg = _bnb_config(spec)
    with _quiet():
        if bnb_cfg is None:
            with torch.device("meta"):
                model = cls._from_config(arch, dtype=spec.dtype)
        else:
            # from_pretrained's order: build under the load dtype, then let the quantizer swap the Linear layers.
            from transformers.quantizers import AutoHfQuantizer

            quantizer = AutoHfQuantizer.from_config(bnb_cfg, pre_quantized=False)
            arch.dtype = spec.dtype
            with torch.device("meta"), local_torch_dtype(spec.dtype, cls.__name__):
                model = cls(arch)
                quantizer.preprocess_model(model=model, dtype=spec.dtype, device_map={"": "cpu"}, checkpoint_files=None)
            quantizer.postprocess_model(model)
        if spec.untie_from is not None:
            try:
                from blipmon.architectures.catalog import untie_like_checkpoint

                untie_like_checkpoint(model, spec.untie_from)
            except ImportError:
                pass
        if spec.train:
            loaded = LoadedModel(model=model, family=spec.family, seconds=0.0, weights="random", device=_META)
            try:
                model = apply_peft(loaded, cfg)
            except (ValueError, KeyError) as e:  # peft: no module matches the targets; an unknown family
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"train.lora: the run would fail to apply LoRA to {spec.model_id}: {first}") from None
        model.train()
    return model


_META = torch.device("meta")


def is_stack(name: str, module: Any) -> bool:
    """A ModuleList of repeated layers of the same class (what the short model truncates)."""
    if not isinstance(module, torch.nn.ModuleList) or len(module) == 0 or name.endswith(("lora_A", "lora_B")):
        return False
    first = type(module[0])
    return all(type(m) is first for m in module) and any(True for _ in module[0].parameters())
