"""Built-in presets: the fixed names (docs/configuration.md, `blipmon presets`), the seed lab's tables, and that every one validates."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest

from blipmon import cli
from blipmon.core import config, presets
from blipmon.core.config import ConfigError

LAB_NAMES = ["baseline", "reduced-batch", "grad-accum", "grad-accum-lr4x", "bf16-true", "bf16-mixed", "opt-6.7b",
             "flan-t5-xxl", "flan-t5-xxl-bs1", "sgd", "adam-8bit", "act-ckpt", "deepspeed-offload", "lora", "qlora"]  # fmt: skip

OPT27, OPT67, T5XXL = "Salesforce/blip2-opt-2.7b", "Salesforce/blip2-opt-6.7b", "Salesforce/blip2-flan-t5-xxl"

# The two tables of seed 002, row by row: model, batch/accumulate, precision, optim, act_ckpt, strategy, max_steps.
SEED_002 = {
    "a100": {
        "baseline": (OPT27, 32, 1, "32-true", "adamw", False, "auto", -1),
        "reduced-batch": (OPT27, 16, 1, "32-true", "adamw", False, "auto", -1),
        "grad-accum": (OPT27, 16, 4, "32-true", "adamw", False, "auto", -1),
        "grad-accum-lr4x": (OPT27, 16, 4, "32-true", "adamw", False, "auto", -1),
        "bf16-true": (OPT27, 16, 4, "bf16-true", "adamw", False, "auto", -1),
        "bf16-mixed": (OPT27, 16, 4, "bf16-mixed", "adamw", False, "auto", -1),
        "opt-6.7b": (OPT67, 16, 4, "bf16-true", "adamw", False, "auto", -1),
        "flan-t5-xxl": (T5XXL, 16, 4, "bf16-true", "adamw", False, "auto", -1),
        "flan-t5-xxl-bs1": (T5XXL, 1, 1, "bf16-true", "adamw", False, "auto", -1),
        "sgd": (T5XXL, 16, 4, "bf16-true", "sgd", False, "auto", -1),
        "adam-8bit": (T5XXL, 2, 2, "bf16-true", "adam_8bit", False, "auto", -1),
        "act-ckpt": (T5XXL, 2, 2, "bf16-true", "adam_8bit", True, "auto", -1),
        "deepspeed-offload": (T5XXL, 16, 4, "bf16-true", "deepspeed_cpu", False, "deepspeed_stage_2_offload", 2),
        "lora": (T5XXL, 32, 2, "32-true", "adamw", False, "auto", -1),
        "qlora": (T5XXL, 64, 1, "32-true", "adamw", False, "auto", -1),
    },
    "h100": {
        "baseline": (OPT27, 64, 1, "32-true", "adamw", False, "auto", -1),
        "reduced-batch": (OPT27, 16, 1, "32-true", "adamw", False, "auto", -1),
        "grad-accum": (OPT27, 16, 4, "32-true", "adamw", False, "auto", -1),
        "grad-accum-lr4x": (OPT27, 16, 4, "32-true", "adamw", False, "auto", -1),
        "bf16-true": (OPT27, 16, 4, "bf16-true", "adamw", False, "auto", -1),
        "bf16-mixed": (OPT27, 16, 4, "bf16-mixed", "adamw", False, "auto", -1),
        "opt-6.7b": (OPT67, 32, 2, "bf16-true", "adamw", False, "auto", -1),
        "flan-t5-xxl": (T5XXL, 32, 2, "bf16-true", "adamw", False, "auto", -1),
        "flan-t5-xxl-bs1": (T5XXL, 1, 1, "bf16-true", "adamw", False, "auto", -1),
        "sgd": (T5XXL, 32, 2, "bf16-true", "sgd", False, "auto", -1),
        "adam-8bit": (T5XXL, 2, 2, "bf16-true", "adam_8bit", False, "auto", -1),
        "act-ckpt": (T5XXL, 2, 2, "bf16-true", "adam_8bit", True, "auto", -1),
        "deepspeed-offload": (T5XXL, 32, 2, "bf16-true", "deepspeed_cpu", False, "deepspeed_stage_2_offload", 2),
        "lora": (T5XXL, 32, 2, "32-true", "adamw", False, "auto", -1),
        "qlora": (T5XXL, 64, 1, "32-true", "adamw", False, "auto", -1),
    },
}


def test_the_15_lab_names_exist_for_each_gpu() -> None:
    for gpu in ("h100", "a100"):
        assert sorted(presets.group(gpu)) == sorted(f"{gpu}/{n}" for n in LAB_NAMES)
        assert presets.group(gpu + "/") == presets.group(gpu)


def test_load_train_and_tiny_groups() -> None:
    assert sorted(presets.group("load")) == sorted(
        ["load/cpu-first", "load/fp16-gpu", "load/split-language-model", "load/auto", "load/mblip-8bit",
         "load/mblip-bf16", "load/mblip-cpu"]
    )  # fmt: skip
    assert sorted(presets.group("train")) == sorted(
        ["train/blip-vqa-lora", "train/blip-vqa-qlora", "train/mblip-bloomz-qlora"]
    )
    assert sorted(presets.group("tiny")) == sorted(["tiny/blip2-opt", "tiny/blip2-t5", "tiny/blip-vqa"])


def test_every_preset_is_in_a_known_group_and_named_as_its_key() -> None:
    for name in presets.names():
        assert name.split("/")[0] in presets.GROUPS
        assert presets.get(name)["name"] == name


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_validates_and_resolves(name: str) -> None:
    cfg = config.validate(presets.get(name))
    assert cfg["name"] == name and cfg["description"]
    assert config.resolve(name) == cfg


@pytest.mark.parametrize("gpu", ["a100", "h100"])
@pytest.mark.parametrize("row", LAB_NAMES)
def test_lab_presets_match_the_seed_tables(gpu: str, row: str) -> None:
    cfg = config.resolve(f"{gpu}/{row}")
    model, bs, acc, prec, optim, ckpt, strategy, max_steps = SEED_002[gpu][row]
    t = cfg["train"]
    assert cfg["model"]["id"] == model
    assert (t["batch_size"], t["accumulate_grad_batches"]) == (bs, acc)
    assert (t["precision"], t["optim"], t["act_ckpt"], t["strategy"], t["max_steps"]) == (
        prec,
        optim,
        ckpt,
        strategy,
        max_steps,
    )
    # The lab's shared settings.
    assert t["max_epochs"] == 2 and t["num_train_samples"] == 512
    assert t["lr"] == (2e-5 if row == "grad-accum-lr4x" else 5e-6)
    assert t["num_workers"] == (0 if (gpu, row) == ("h100", "deepspeed-offload") else 8)
    assert t["lora"]["enabled"] is (row == "lora")
    assert t["qlora"] is (row == "qlora")
    assert (t["lora"]["r"], t["lora"]["alpha"], t["lora"]["dropout"]) == (16, 32.0, 0.05)
    assert cfg["data"]["max_length"] == 50
    assert cfg["model"]["device_map"] == "cuda" and cfg["model"]["weights"] == "auto"


def test_seed_004_vqa_lora_and_qlora() -> None:
    lora, qlora = config.resolve("train/blip-vqa-lora"), config.resolve("train/blip-vqa-qlora")
    for cfg in (lora, qlora):
        assert cfg["model"]["id"] == "Salesforce/blip-vqa-base"
        assert cfg["train"]["batch_size"] == 32
        lo = cfg["train"]["lora"]
        assert lo["enabled"] and (lo["r"], lo["alpha"]) == (16, 32.0) and lo["target_modules"] == ["query", "value"]
    assert not lora["train"]["qlora"] and qlora["train"]["qlora"]


def test_seed_003_bloomz_4bit_lora() -> None:
    cfg = config.resolve("train/mblip-bloomz-qlora")
    assert cfg["model"]["id"] == "Gregor/mblip-bloomz-7b"
    assert cfg["model"]["quantization"] == "4bit-nf4" and cfg["train"]["lora"]["enabled"]


def test_loading_recipes_of_seeds_000_001_003() -> None:
    assert config.resolve("load/cpu-first")["model"]["device_map"] == "cpu-first"
    assert config.resolve("load/cpu-first")["runtime"]["alloc_conf"] == "max_split_size_mb:128"
    assert config.resolve("load/fp16-gpu")["model"]["dtype"] == "float16"
    split = config.resolve("load/split-language-model")["model"]["device_map"]
    assert split["language_model"] == 0
    assert {k for k, v in split.items() if v == "cpu"} == {
        "vision_model",
        "qformer",
        "language_projection",
        "query_tokens",
    }
    assert config.resolve("load/auto")["model"]["device_map"] == "auto"
    assert config.resolve("load/mblip-8bit")["model"]["quantization"] == "8bit"
    assert config.resolve("load/mblip-bf16")["model"]["dtype"] == "bfloat16"
    assert config.resolve("load/mblip-cpu")["model"]["device_map"] == "cpu"


@pytest.mark.parametrize("name", presets.group("tiny"))
def test_tiny_presets_are_random_weights_that_run_anywhere(name: str) -> None:
    cfg = config.resolve(name)
    assert cfg["model"]["id"] == name and cfg["model"]["weights"] == "random"
    assert cfg["model"]["device_map"] == "auto" and cfg["train"]["num_workers"] == 0


def test_get_returns_a_copy() -> None:
    p = presets.get("tiny/blip2-opt")
    p["train"]["batch_size"] = 999
    assert presets.get("tiny/blip2-opt")["train"]["batch_size"] != 999


# -- blipmon presets ---------------------------------------------------------------------------------


def test_presets_json_lists_every_preset_with_its_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["presets", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)
    names = [i["name"] for i in items]
    for gpu in ("h100", "a100"):
        assert sorted(n for n in names if n.startswith(gpu + "/")) == sorted(f"{gpu}/{n}" for n in LAB_NAMES)
    for group in ("load", "train", "tiny"):
        assert sorted(n for n in names if n.startswith(group + "/")) == sorted(presets.group(group))
    assert len(names) == len(set(names)) == len(presets.names())
    for i in items:
        assert set(i) == {"name", "description", "config"}
        assert i["config"] == config.resolve(i["name"])


def test_presets_text_lists_groups(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for group in presets.GROUPS:
        assert f"{group}/\n" in out
    assert out.index("tiny/") < out.index("h100/") < out.index("a100/")
    for name in presets.names():
        assert name in out


# -- what can run here (preflight, before any child starts) ----------------------------------------


def gpu_only(name: str) -> bool:
    return name.split("/")[0] in ("h100", "a100") or name in (
        "load/fp16-gpu",
        "load/split-language-model",
        "train/blip-vqa-lora",
        "train/blip-vqa-qlora",
        "train/mblip-bloomz-qlora",
    )


@pytest.mark.parametrize("name", presets.names())
def test_preflight_on_a_machine_without_a_gpu(name: str) -> None:
    from blipmon.runner.preflight import needs_gpu, preflight

    cfg = config.resolve(name)
    assert (needs_gpu(cfg) is not None) == gpu_only(name)
    if not gpu_only(name):
        preflight(cfg, cuda=False)
        return
    with pytest.raises(ConfigError) as ei:
        preflight(cfg, cuda=False)
    msg = str(ei.value)
    if cfg["train"]["strategy"] == "deepspeed_stage_2_offload" and importlib.util.find_spec("deepspeed") is None:
        assert "pip install 'blipmon[deepspeed]'" in msg
    else:
        assert "needs an NVIDIA GPU" in msg and "--set model.device_map=cpu" in msg


def test_the_cpu_advice_is_accepted_by_preflight() -> None:
    from blipmon.runner.preflight import preflight

    preflight(config.resolve("h100/baseline", ["model.device_map=cpu"]), cuda=False)


def test_gpu_presets_pass_preflight_where_there_is_a_gpu() -> None:
    from blipmon.runner.preflight import preflight

    preflight(config.resolve("h100/baseline"), cuda=True)


def _describe(cfg: dict[str, Any]) -> str:
    return cfg["description"]


def test_descriptions_say_where_the_row_comes_from() -> None:
    assert "Seed lab (H100 80GB)" in _describe(config.resolve("h100/baseline"))
    assert "Seed lab (A100 80GB)" in _describe(config.resolve("a100/baseline"))
