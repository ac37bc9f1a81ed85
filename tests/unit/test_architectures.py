"""The shipped real-size architectures: configs, parameter counts, byte sizes, and ``blipmon models``.

The byte rule for quantized loads is checked against the real thing: tiny models saved with ``save_pretrained`` are
loaded by ``from_pretrained`` in 8-bit and 4-bit through bitsandbytes on the CPU, and the bytes of their actual
storages (weights, 8-bit row scales, 4-bit absmax / code tables, double-quantization state) must equal what
``param_bytes`` computes from the meta model, module by module. ``build_random`` is held to the same loads: a
random-weight model must be indistinguishable from ``from_pretrained`` except for the values.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import torch

from blipmon.architectures import catalog

# Published parameter counts as printed (Hugging Face model pages, model cards; see docs/architectures.md). A count
# matches a printed figure when it rounds to it.
PUBLISHED = {
    "Salesforce/blip2-opt-2.7b": "3.74B",
    "Salesforce/blip2-opt-6.7b": "7.75B",
    "Salesforce/blip2-flan-t5-xl": "3.94B",
    "Salesforce/blip2-flan-t5-xxl": "12.2B",
    "Salesforce/blip2-opt-6.7b-coco": "7.75B",
    "Gregor/mblip-mt0-xl": "4.8B",
}

# Published counts of the language models inside (model cards of the LLMs themselves).
PUBLISHED_LLM = {
    "Salesforce/blip2-flan-t5-xl": "2.85B",  # google/flan-t5-xl
    "Salesforce/blip2-flan-t5-xxl": "11.1B",  # google/flan-t5-xxl
    "Gregor/mblip-mt0-xl": "3.7B",  # bigscience/mt0-xl
    "Gregor/mblip-bloomz-7b": "7069016064",  # bigscience/bloom(z)-7b1: the exact figure of the BLOOM-7b1 model card
}


def _matches(count: int, printed: str) -> bool:
    """True when ``count`` rounds to ``printed``: "3.74B", "385M", or an exact integer."""
    if printed.isdigit():
        return count == int(printed)
    unit = {"B": 1e9, "M": 1e6}[printed[-1]]
    digits = printed[:-1]
    return f"{count / unit:.{len(digits.partition('.')[2])}f}" == digits


def _value(printed: str) -> float:
    return float(printed) if printed.isdigit() else float(printed[:-1]) * {"B": 1e9, "M": 1e6}[printed[-1]]


# -- the catalog ------------------------------------------------------------------------------------


def test_known_ids_are_exactly_the_shipped_files() -> None:
    shipped = {
        f.name.removesuffix(".json").replace("--", "/")
        for f in resources.files("blipmon.architectures").iterdir()
        if f.name.endswith(".json")
    }
    assert set(catalog.known_ids()) == shipped
    assert len(catalog.known_ids()) == 10
    for mid in shipped:
        raw = json.loads(resources.files("blipmon.architectures").joinpath(catalog._filename(mid)).read_text())
        assert raw["model_type"] in ("blip-2", "blip")


def test_architecture_config_types_and_unknown_ids() -> None:
    from transformers import Blip2Config, BlipConfig

    assert isinstance(catalog.architecture_config("Salesforce/blip2-opt-2.7b"), Blip2Config)
    assert isinstance(catalog.architecture_config("Salesforce/blip-vqa-base"), BlipConfig)
    assert catalog.architecture_config("salesforce/BLIP2-opt-2.7b") is not None  # hub ids are case-insensitive
    assert catalog.architecture_config("nobody/nothing") is None
    assert catalog.architecture_config("tiny/blip2-opt") is None
    with pytest.raises(KeyError, match="nobody/nothing"):
        catalog.param_count("nobody/nothing")
    # A fresh config each time: callers may set dtypes on it without touching the catalog.
    a = catalog.architecture_config("Salesforce/blip2-opt-2.7b")
    a.num_query_tokens = 1
    assert catalog.architecture_config("Salesforce/blip2-opt-2.7b").num_query_tokens == 32


def test_real_dimensions() -> None:
    """The fields memory depends on, as the checkpoints have them (sources in docs/architectures.md)."""
    c = catalog.architecture_config("Salesforce/blip2-opt-2.7b")
    v, q, t = c.vision_config, c.qformer_config, c.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.intermediate_size, v.image_size, v.patch_size) == (
        1408, 39, 6144, 224, 14,
    )  # fmt: skip
    assert (q.hidden_size, q.num_hidden_layers, q.encoder_hidden_size, c.num_query_tokens) == (768, 12, 1408, 32)
    assert (t.model_type, t.hidden_size, t.num_hidden_layers, t.ffn_dim, t.vocab_size) == (
        "opt",
        2560,
        32,
        10240,
        50304,
    )
    assert c.image_token_index == 50265
    coco = catalog.architecture_config("Salesforce/blip2-opt-2.7b-coco")
    assert coco.vision_config.image_size == 364  # the COCO fine-tunes run the ViT at 364 px
    xxl = catalog.architecture_config("Salesforce/blip2-flan-t5-xxl").text_config
    assert (xxl.model_type, xxl.d_model, xxl.d_ff, xxl.num_heads, xxl.num_layers) == ("t5", 4096, 10240, 64, 24)
    mt0 = catalog.architecture_config("Gregor/mblip-mt0-xl").text_config
    assert (mt0.model_type, mt0.d_model, mt0.vocab_size) == ("mt5", 2048, 250112)
    bloom = catalog.architecture_config("Gregor/mblip-bloomz-7b")
    assert bloom.use_decoder_only_language_model and bloom.text_config.n_layer == 30


@pytest.mark.parametrize("model_id", catalog.KNOWN_IDS)
def test_every_known_id_builds_on_meta(model_id: str) -> None:
    model = catalog.meta_model(model_id)
    params = list(model.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    count = catalog.param_count(model_id)
    assert isinstance(count, int) and count == sum(p.numel() for p in params)
    info = catalog.describe(model_id)
    assert info["params"] == count and sum(info["params_by_module"].values()) == count
    assert info["family"] in ("blip2-decoder", "blip2-encdec", "blip-vqa")
    assert info["bytes"]["float32"] == 4 * count
    assert info["bytes"]["bfloat16"] == 2 * count
    # fp16 upcasts _keep_in_fp32_modules (BLIP-2's qformer and query tokens, T5's wo) like from_pretrained.
    assert info["bytes"]["float16"] >= 2 * count
    for q in ("8bit", "4bit-nf4"):
        assert info["bytes"]["bfloat16"] > info["quantized"][q]["bfloat16"] > 0
    assert info["quantized"]["8bit"]["bfloat16"] > info["quantized"]["4bit-nf4"]["bfloat16"]


@pytest.mark.parametrize("model_id", sorted(PUBLISHED))
def test_counts_match_published_within_one_percent(model_id: str) -> None:
    count = catalog.param_count(model_id)
    assert _matches(count, PUBLISHED[model_id]), count
    assert abs(count - _value(PUBLISHED[model_id])) / _value(PUBLISHED[model_id]) < 0.01


@pytest.mark.parametrize("model_id", sorted(PUBLISHED_LLM))
def test_language_model_counts_match_their_model_cards(model_id: str) -> None:
    count = catalog.params_by_module(model_id)["language_model"]
    assert _matches(count, PUBLISHED_LLM[model_id]), count


def test_blip_vqa_base_count_against_the_385m_of_seed_004() -> None:
    """385M is the checkpoint's safetensors total, which stores the text decoder's LM head beside the word embedding
    it is tied to (equal values). Loaded, the two are one tensor: 361.2M parameters in memory."""
    count = catalog.param_count("Salesforce/blip-vqa-base")
    text = catalog.architecture_config("Salesforce/blip-vqa-base").text_config
    assert _matches(count, "361M")
    assert _matches(count + text.vocab_size * text.hidden_size, "385M")


def test_untied_heads_follow_the_checkpoint() -> None:
    """FLAN-T5 and mT0 train their lm_head separately: from_pretrained keeps it apart, and so do we."""
    t5 = catalog.params_by_module("Salesforce/blip2-flan-t5-xl")["language_model"]
    cfg = catalog.architecture_config("Salesforce/blip2-flan-t5-xl").text_config
    tied = catalog.meta_model(catalog.architecture_config("Salesforce/blip2-flan-t5-xl"))  # a config: class tying
    tied_build = sum(p.numel() for p in tied.language_model.parameters())
    assert t5 - tied_build == cfg.vocab_size * cfg.d_model
    # OPT and BLOOM tie their head to the embedding in the checkpoint too.
    opt = catalog.meta_model("Salesforce/blip2-opt-2.7b").language_model
    assert opt.lm_head.weight is opt.get_input_embeddings().weight


def test_fast_meta_build_ties_like_a_plain_build() -> None:
    """_build_meta skips torch's init calls for speed; the tying must be exactly that of ``cls(config)``."""

    def groups(model: Any) -> list[tuple[str, ...]]:
        seen: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            seen.setdefault(id(p), []).append(name)
        return sorted(tuple(v) for v in seen.values())

    for model_id in ("Salesforce/blip2-opt-2.7b", "Salesforce/blip-vqa-base"):
        cfg = catalog.architecture_config(model_id)
        with torch.device("meta"):
            plain = catalog.model_class(cfg)(catalog.architecture_config(model_id))
        assert groups(catalog._build_meta(cfg)) == groups(plain)


def test_param_bytes_arguments() -> None:
    mid = "Salesforce/blip2-opt-2.7b"
    assert catalog.param_bytes(mid, "torch.bfloat16") == catalog.param_bytes(mid, "bfloat16")
    assert catalog.param_bytes(mid, "float16", "4bit") == catalog.param_bytes(mid, "float16", "4bit-nf4")
    assert catalog.param_bytes(mid, "float16", "4bit-fp4") == catalog.param_bytes(mid, "float16", "4bit-nf4")
    split = catalog.param_bytes(mid, "float16", "8bit", by_module=True)
    assert isinstance(split, dict) and sum(split.values()) == catalog.param_bytes(mid, "float16", "8bit")
    # BLIP-2 keeps the Q-Former out of bitsandbytes and, in fp16, in fp32.
    assert split["qformer"] == 4 * catalog.params_by_module(mid)["qformer"]
    with pytest.raises(ValueError, match="dtype"):
        catalog.param_bytes(mid, "int3")
    with pytest.raises(ValueError, match="quantization"):
        catalog.param_bytes(mid, "float16", "2bit")


# -- the quantized-size rule against real bitsandbytes storages -------------------------------------


def _odd_blip2_config() -> Any:
    """A tiny BLIP-2 whose Linear sizes are odd and not multiples of 64: exercises packing and block rounding."""
    from transformers import Blip2Config, OPTConfig

    text = OPTConfig(
        vocab_size=301, hidden_size=45, num_hidden_layers=1, ffn_dim=75, num_attention_heads=5,
        max_position_embeddings=64, word_embed_proj_dim=45, pad_token_id=1, bos_token_id=2, eos_token_id=2,
    )  # fmt: skip
    return Blip2Config(
        vision_config={"hidden_size": 45, "intermediate_size": 77, "num_hidden_layers": 1, "num_attention_heads": 5,
                       "image_size": 32, "patch_size": 16},
        qformer_config={"hidden_size": 40, "intermediate_size": 72, "num_hidden_layers": 2, "num_attention_heads": 4},
        text_config=text.to_dict(), num_query_tokens=3, image_token_index=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def saved_models(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    from blipmon.runner.models import model_class, tiny_config

    out = {name: (path, tiny_config(name)) for name, path in tiny_models.items()}
    cfg = _odd_blip2_config()
    path = tmp_path_factory.mktemp("odd-blip2")
    torch.manual_seed(0)
    model_class(cfg)(cfg).save_pretrained(path)
    out["odd/blip2-opt"] = (path, cfg)
    return out


def _storage_bytes(model: Any) -> dict[str, int]:
    """Bytes of the unique storages behind every parameter and its quantization state, per top-level module."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, int] = {}

    def add(top: str, t: torch.Tensor | None) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            out[top] = out.get(top, 0) + storage.nbytes()

    for name, p in model.named_parameters():
        top = name.split(".", 1)[0]
        add(top, p)
        add(top, getattr(p, "SCB", None))  # 8-bit: one fp32 scale per output row
        qs = getattr(p, "quant_state", None)  # 4-bit
        if qs is not None:
            for t in (qs.absmax, qs.code, qs.offset):
                add(top, t)
            if qs.state2 is not None:
                add(top, qs.state2.absmax)
                add(top, qs.state2.code)
    return out


def _signature(model: Any) -> dict[str, Any]:
    """What a loaded model is made of: per parameter name its class, dtype, shape, trainability, quantization state;
    which names share a tensor; the module classes; the buffers."""
    params = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        qs = getattr(p, "quant_state", None)
        q = None if qs is None else (qs.dtype, qs.blocksize, qs.quant_type, qs.nested, tuple(qs.shape))
        params[name] = (type(p).__name__, p.dtype, tuple(p.shape), p.requires_grad, q)
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {
        "params": params,
        "tied": sorted(tuple(v) for v in groups.values()),
        "modules": {n: type(m).__name__ for n, m in model.named_modules()},
        "buffers": {n: (b.dtype, tuple(b.shape), b.device.type) for n, b in model.named_buffers()},
    }


QUANT_CASES = [
    ("none", False),
    ("8bit", False),
    ("4bit-nf4", False),
    ("4bit-fp4", True),  # double quantization
]


@pytest.mark.parametrize("name", ["tiny/blip2-opt", "tiny/blip2-t5", "tiny/blip-vqa", "odd/blip2-opt"])
@pytest.mark.parametrize(("quantization", "double_quant"), QUANT_CASES)
def test_bytes_and_random_builds_equal_real_loads(
    saved_models: dict[str, tuple[Path, Any]], name: str, quantization: str, double_quant: bool
) -> None:
    """Against a real ``from_pretrained`` of the saved checkpoint, in float16 and bfloat16 (fp16 upcasts
    ``_keep_in_fp32_modules``, bf16 does not; fp32 is 4 bytes a parameter, checked above):

    - ``param_bytes`` equals the bytes of the real storages, module by module;
    - ``build_random`` gives the same model but for the values: modules, parameter classes, dtypes, shapes,
      trainability, quantization states, ties, buffers (values included) and storage bytes.
    """
    from transformers import BitsAndBytesConfig  # bitsandbytes is a dependency of blipmon: never skipped

    from blipmon.architectures.build import build_random

    path, cfg = saved_models[name]
    for dtype in ("float16", "bfloat16"):
        kwargs: dict[str, Any] = {}
        if quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        elif quantization != "none":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quantization.split("-")[1],
                bnb_4bit_use_double_quant=double_quant,
                bnb_4bit_compute_dtype=getattr(torch, dtype),
            )
        if kwargs:
            kwargs["device_map"] = {"": "cpu"}  # bitsandbytes >= 0.49 quantizes on the CPU
        loaded = catalog.model_class(cfg).from_pretrained(path, dtype=getattr(torch, dtype), **kwargs)
        expected = catalog.param_bytes(cfg, dtype, quantization, double_quant=double_quant, by_module=True)
        assert _storage_bytes(loaded) == expected, (name, quantization, dtype)
        assert getattr(loaded, "is_quantized", False) == (quantization != "none")

        built = build_random(cfg, dtype=dtype, quantization=quantization, double_quant=double_quant)
        assert _signature(built) == _signature(loaded), (name, quantization, dtype)
        real_buffers = dict(loaded.named_buffers())
        assert all(torch.equal(b, real_buffers[n]) for n, b in built.named_buffers())
        assert _storage_bytes(built) == expected
        assert getattr(built, "is_quantized", False) == (quantization != "none") and not built.training


def test_untied_head_matches_from_pretrained_and_random_build(tmp_path: Path) -> None:
    """A checkpoint whose T5 lm_head differs from its embedding (config ``tie_word_embeddings: false``) loads with two
    tensors; the catalog's count from the raw config and a random build untied with ``untie_like_checkpoint`` agree."""
    from safetensors.torch import load_file, save_file

    from blipmon.runner.models import model_class, tiny_config

    cfg = tiny_config("tiny/blip2-t5")
    torch.manual_seed(0)
    model_class(cfg)(cfg).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["text_config"]["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(raw))
    weights = {k: v.clone() for k, v in load_file(tmp_path / "model.safetensors").items()}
    shared = weights["language_model.shared.weight"]
    weights["language_model.lm_head.weight"] = torch.randn_like(shared)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded = model_class(cfg).from_pretrained(tmp_path)
    assert loaded.language_model.lm_head.weight is not loaded.language_model.shared.weight
    real = sum(p.numel() for p in loaded.parameters())
    assert sum(p.numel() for p in catalog.meta_model(raw).parameters()) == real
    assert catalog.param_bytes(raw, "float32") == 4 * real

    random = model_class(cfg)._from_config(catalog._config_from_dict(raw))
    added = catalog.untie_like_checkpoint(random, raw)
    assert added == shared.numel()
    assert sum(p.numel() for p in random.parameters()) == real
    assert "language_model.lm_head.weight" not in random.all_tied_weights_keys


def test_random_fp16_build_upcast_like_from_pretrained(saved_models: dict[str, tuple[Path, Any]]) -> None:
    """``_from_config(dtype=float16)`` leaves the Q-Former and T5's ``wo`` in fp16; ``upcast_like_pretrained`` makes the
    random build weigh what ``from_pretrained(dtype=float16)`` allocates."""
    path, cfg = saved_models["tiny/blip2-t5"]
    cls = catalog.model_class(cfg)
    random = cls._from_config(cfg, dtype=torch.float16)
    assert catalog.upcast_like_pretrained(random, torch.float16) > 0
    loaded = cls.from_pretrained(path, dtype=torch.float16)
    assert _storage_bytes(random) == _storage_bytes(loaded) == catalog.param_bytes(cfg, "float16", by_module=True)
    assert catalog.upcast_like_pretrained(cls._from_config(cfg, dtype=torch.bfloat16), "bfloat16") == 0


def test_build_random_unties_like_the_checkpoint() -> None:
    raw = catalog.raw_config("Salesforce/blip2-flan-t5-xl")
    text = raw["text_config"]
    raw["text_config"] = {**text, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 1, "num_decoder_layers": 1,
                          "num_heads": 4, "vocab_size": 256}  # fmt: skip
    raw["vision_config"] = {**raw["vision_config"], "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 32, "patch_size": 16}  # fmt: skip
    raw["qformer_config"] = {**raw["qformer_config"], "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 1, "num_attention_heads": 4}  # fmt: skip
    from blipmon.architectures.build import build_random

    built = build_random(raw, dtype="bfloat16")
    lm = built.language_model
    assert lm.lm_head.weight is not lm.shared.weight
    assert lm.encoder.embed_tokens.weight is lm.shared.weight
    assert sum(p.numel() for p in built.parameters()) == sum(p.numel() for p in catalog.meta_model(raw).parameters())
    assert catalog.param_bytes(raw, "bfloat16") == sum(_storage_bytes(built).values())


# -- blipmon models ---------------------------------------------------------------------------------


def test_models_json(capsys: pytest.CaptureFixture[str]) -> None:
    from blipmon.cli import main

    assert main(["models", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert isinstance(items, list) and [i["id"] for i in items] == catalog.known_ids()
    for item in items:
        assert type(item["params"]) is int and item["params"] > 0
        assert set(item["bytes"]) == {"float32", "bfloat16", "float16"}
        assert all(type(v) is int for v in item["bytes"].values())
        assert set(item["quantized"]) == {"8bit", "4bit-nf4"}
        assert all(type(v) is int for q in item["quantized"].values() for v in q.values())


def test_models_table(capsys: pytest.CaptureFixture[str]) -> None:
    from blipmon.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for mid in catalog.known_ids():
        assert mid in out
    assert "3.74B" in out and "12.23B" in out and "361M" in out
