"""Configuration: TOML files, ``--set`` overrides, validation messages, defaults, round trips."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blipmon.core import config
from blipmon.core.config import ConfigError, defaults, merge, parse_set, resolve, to_toml, validate


def error_of(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as ei:
        validate(raw)
    return str(ei.value)


# -- defaults and the schema ------------------------------------------------------------------------


def test_defaults_validate_and_have_the_four_tables() -> None:
    cfg = validate({})
    assert cfg == validate(defaults())
    assert {"model", "job", "train", "data", "runtime"} <= set(cfg)
    assert cfg["train"]["lora"] == {"enabled": False, "r": 16, "alpha": 32.0, "dropout": 0.05, "target_modules": []}
    assert cfg["runtime"]["sample_hz"] == 10.0 and isinstance(cfg["runtime"]["sample_hz"], float)


def test_every_default_passes_its_own_check() -> None:
    for key, field in config.SCHEMA.items():
        assert config._check_value(key, field, field.default) is None, key


def test_validate_does_not_modify_its_input() -> None:
    raw = {"train": {"lr": 1}}
    validate(raw)
    assert raw == {"train": {"lr": 1}}


def test_numbers_are_normalised_to_floats() -> None:
    cfg = validate({"train": {"lr": 1, "lora": {"alpha": 8, "dropout": 0}}, "runtime": {"sample_hz": 4}})
    assert cfg["train"]["lr"] == 1.0 and isinstance(cfg["train"]["lr"], float)
    assert isinstance(cfg["train"]["lora"]["alpha"], float) and isinstance(cfg["train"]["lora"]["dropout"], float)
    assert isinstance(cfg["runtime"]["sample_hz"], float)


# -- validation messages name the key, the value and what is allowed -------------------------------


@pytest.mark.parametrize(
    ("raw", "parts"),
    [
        ({"train": {"precision": "bf16"}}, ["train.precision = 'bf16'", "one of '32-true', 'bf16-true', 'bf16-mixed', '16-mixed'", "did you mean 'bf16-true'?"]),
        ({"train": {"optim": "adam"}}, ["train.optim = 'adam'", "'adamw', 'sgd', 'adam_8bit', 'paged_adamw_8bit', 'deepspeed_cpu'"]),
        ({"train": {"batch_size": 0}}, ["train.batch_size = 0", "expected an integer >= 1"]),
        ({"train": {"batch_size": 8.0}}, ["train.batch_size = 8.0", "expected an integer >= 1"]),
        ({"train": {"batch_size": True}}, ["train.batch_size = True", "expected an integer"]),
        ({"train": {"batch_size": "16"}}, ["train.batch_size = '16'", "expected an integer"]),
        ({"train": {"lr": 0}}, ["train.lr = 0", "expected a number >= 1e-10 and <= 10"]),
        ({"train": {"lr": float("inf")}}, ["train.lr = inf", "a finite number"]),
        ({"train": {"lr": float("nan")}}, ["train.lr = nan", "a finite number"]),
        ({"train": {"act_ckpt": "yes"}}, ["train.act_ckpt = 'yes'", "expected true/false"]),
        ({"train": {"act_ckpt": 1}}, ["train.act_ckpt = 1", "expected true/false"]),
        ({"train": {"max_steps": 0}}, ["train.max_steps = 0", "-1 (no limit) or a positive number"]),
        ({"train": {"max_steps": -2}}, ["train.max_steps = -2", ">= -1"]),
        ({"train": {"num_workers": -1}}, ["train.num_workers = -1", ">= 0"]),
        ({"train": {"lora": {"r": 0}}}, ["train.lora.r = 0", ">= 1"]),
        ({"train": {"lora": {"target_modules": ["q", ""]}}}, ["train.lora.target_modules", "a list of module names"]),
        ({"train": {"lora": {"target_modules": "q"}}}, ["train.lora.target_modules = 'q'"]),
        ({"train": {"lora": {"dropout": 1.0}}}, ["train.lora.dropout = 1.0", "[0, 1)"]),
        ({"model": {"weights": "pretrain"}}, ["model.weights = 'pretrain'", "'pretrained', 'random', 'auto'", "did you mean 'pretrained'?"]),
        ({"model": {"dtype": "fp16"}}, ["model.dtype = 'fp16'", "'float32', 'float16', 'bfloat16'"]),
        ({"model": {"quantization": "4bit"}}, ["model.quantization = '4bit'", "'none', '8bit', '4bit-nf4', '4bit-fp4'"]),
        ({"model": {"device_map": "gpu"}}, ["model.device_map = 'gpu'", "'cuda', 'cpu', 'auto', 'cpu-first' or a table"]),
        ({"model": {"device_map": {}}}, ["model.device_map = {}", "at least one module"]),
        ({"model": {"device_map": {"vision_model": "gpu"}}}, ["model.device_map.vision_model = 'gpu'", "a GPU index (0), 'cuda:N' or 'cpu'"]),
        ({"model": {"device_map": {"query_tokens": "disk"}}}, ["model.device_map.query_tokens = 'disk'", "disk offload is not supported", "put it on 'cpu'"]),
        ({"model": {"device_map": {"vision_model": True}}}, ["model.device_map.vision_model = True"]),
        ({"job": {"kind": "infer"}}, ["job.kind = 'infer'", "'train', 'load', 'generate'"]),
        ({"runtime": {"sample_hz": 0}}, ["runtime.sample_hz = 0", "expected a number >= 0.1 and <= 100"]),
        ({"data": {"max_length": 0}}, ["data.max_length = 0", ">= 1"]),
        ({"name": "../up"}, ["name = '../up'", "no '..'"]),
        ({"name": "/abs"}, ["name = '/abs'", "not starting with '/'"]),
        ({"name": ""}, ["name = ''"]),
        ({"name": "a|b"}, ["name = 'a|b'", "letters, digits"]),
    ],
)  # fmt: skip
def test_a_bad_value_names_the_key_the_value_and_what_is_allowed(raw: dict[str, Any], parts: list[str]) -> None:
    msg = error_of(raw)
    assert msg.startswith("invalid configuration:")
    for part in parts:
        assert part in msg


@pytest.mark.parametrize(
    ("raw", "unknown", "suggestion"),
    [
        ({"train": {"batchsize": 4}}, "train.batchsize", "train.batch_size"),
        ({"train": {"learning_rate": 1e-4}}, "train.learning_rate", None),
        ({"model": {"dtpye": "float16"}}, "model.dtpye", "model.dtype"),
        ({"runtime": {"sample_rate": 4}}, "runtime.sample_rate", "runtime.sample_hz"),
        ({"batch_size": 4}, "batch_size", "train.batch_size"),  # a key at the wrong level
        ({"trian": {"batch_size": 4}}, "trian.batch_size", "train.batch_size"),  # a typo in the table
        ({"trian": {}}, "trian", "train"),
        ({"train": {"lora": {"rank": 4}}}, "train.lora.rank", "train.lora.r"),
        ({"optimizer": {"name": "sgd"}}, "optimizer.name", None),
    ],
)
def test_unknown_keys_are_named_with_a_suggestion(raw: dict[str, Any], unknown: str, suggestion: str | None) -> None:
    msg = error_of(raw)
    assert f"unknown key {unknown!r}" in msg
    if suggestion:
        assert f"did you mean {suggestion!r}?" in msg


@pytest.mark.parametrize(("raw", "key"), [({"train": 5}, "train"), ({"train": {"lora": True}}, "train.lora")])
def test_a_table_given_a_value_says_it_expects_a_table(raw: dict[str, Any], key: str) -> None:
    msg = error_of(raw)
    assert f"{key} = " in msg and "expected a table" in msg
    assert "unknown key" not in msg


def test_all_problems_are_reported_at_once() -> None:
    msg = error_of({"train": {"batch_size": 0, "precision": "x", "nope": 1}, "model": {"dtype": "y"}})
    assert msg.count("\n  ") == 4


@pytest.mark.parametrize(
    ("raw", "parts"),
    [
        ({"train": {"qlora": True}, "model": {"quantization": "8bit"}}, ["train.qlora = true", "'8bit'"]),
        ({"train": {"optim": "deepspeed_cpu"}}, ["train.optim = 'deepspeed_cpu'", "deepspeed_stage_2_offload"]),
        (
            {"train": {"strategy": "deepspeed_stage_2_offload", "optim": "sgd"}},
            ["train.optim = 'sgd'", "'deepspeed_cpu'"],
        ),
        (
            {"model": {"quantization": "4bit-nf4"}},
            ["model.quantization = '4bit-nf4'", "full fine-tune", "train.lora.enabled"],
        ),
        ({"train": {"devices": 2}}, ["train.devices = 2", "'ddp'"]),
    ],
)
def test_combinations_that_cannot_work_are_refused(raw: dict[str, Any], parts: list[str]) -> None:
    msg = error_of(raw)
    for part in parts:
        assert part in msg


@pytest.mark.parametrize(
    "raw",
    [
        {"model": {"quantization": "8bit"}, "job": {"kind": "load"}},
        {"model": {"quantization": "4bit-nf4"}, "train": {"lora": {"enabled": True}}},
        {"train": {"strategy": "ddp", "devices": 2}},
    ],
)
def test_quantized_load_jobs_and_lora_on_quantized_weights_are_fine(raw: dict[str, Any]) -> None:
    """Accepted as written: the result is the defaults with exactly these values, nothing dropped or rewritten."""
    expected = defaults()
    for table, values in raw.items():
        for key, value in values.items():
            if isinstance(value, dict):
                expected[table][key].update(value)
            else:
                expected[table][key] = value
    assert validate(raw) == expected


def test_device_map_tables_are_values_not_tables_of_the_schema() -> None:
    dm = {"language_model": 0, "vision_model": "cpu", "qformer": "cuda:1", "query_tokens": "cpu"}
    assert validate({"model": {"device_map": dm}})["model"]["device_map"] == dm


# -- --set overrides ---------------------------------------------------------------------------------


def test_set_reads_values_as_toml_and_falls_back_to_strings() -> None:
    out = parse_set(
        [
            "train.batch_size=16",
            "train.lr=1e-4",
            "train.act_ckpt=true",
            "train.qlora = false",
            "model.id=tiny/blip2-t5",  # not TOML: a plain string
            'model.weights="random"',  # quoted TOML string
            "name=my run",
            "model.device_map={language_model = 0, vision_model = 'cpu'}",
            "train.lora.target_modules=['query', 'value']",
            "runtime.alloc_conf=max_split_size_mb:128",
        ]
    )
    assert out == {
        "train": {"batch_size": 16, "lr": 1e-4, "act_ckpt": True, "qlora": False,
                  "lora": {"target_modules": ["query", "value"]}},
        "model": {"id": "tiny/blip2-t5", "weights": "random",
                  "device_map": {"language_model": 0, "vision_model": "cpu"}},
        "name": "my run",
        "runtime": {"alloc_conf": "max_split_size_mb:128"},
    }  # fmt: skip
    assert type(out["train"]["act_ckpt"]) is bool


@pytest.mark.parametrize("item", ["train.batch_size", "=4", "train..batch_size=4", ".x=1"])
def test_malformed_set_items_are_refused(item: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        parse_set([item])


def test_set_into_a_value_that_is_not_a_table_is_refused() -> None:
    with pytest.raises(ConfigError, match="train.batch_size: expected a table"):
        parse_set(["train.batch_size=3", "train.batch_size.x=4"])


def test_later_set_items_win() -> None:
    assert parse_set(["train.batch_size=1", "train.batch_size=2"]) == {"train": {"batch_size": 2}}


def test_set_is_validated_like_the_file() -> None:
    with pytest.raises(ConfigError, match="train.batch_size = 'many'"):
        resolve("tiny/blip2-opt", ["train.batch_size=many"])
    with pytest.raises(ConfigError, match="unknown key 'train.batchsize'"):
        resolve("tiny/blip2-opt", ["train.batchsize=4"])


def test_set_overrides_a_preset_and_keeps_the_rest() -> None:
    cfg = resolve("tiny/blip2-opt", ["train.batch_size=2", "train.lora.enabled=true", "model.device_map=cpu"])
    assert cfg["train"]["batch_size"] == 2
    assert cfg["train"]["lora"]["enabled"] is True and cfg["train"]["lora"]["r"] == 16
    assert cfg["model"]["device_map"] == "cpu"
    assert cfg["train"]["lr"] == 1e-3  # from the preset
    assert cfg["name"] == "tiny/blip2-opt"


def test_merge_replaces_device_map_tables_whole_and_merges_the_rest() -> None:
    base = {"model": {"device_map": {"a": 0, "b": "cpu"}, "id": "x"}, "train": {"lora": {"r": 4, "alpha": 8}}}
    out = merge(base, {"model": {"device_map": {"c": 0}}, "train": {"lora": {"r": 8}}})
    assert out["model"] == {"device_map": {"c": 0}, "id": "x"}
    assert out["train"]["lora"] == {"r": 8, "alpha": 8}
    assert base["train"]["lora"]["r"] == 4  # the base is untouched


# -- TOML files --------------------------------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_a_toml_file_resolves_with_defaults_and_its_stem_as_name(tmp_path: Path) -> None:
    p = write(tmp_path, "bs16.toml", '[model]\nid = "tiny/blip2-opt"\n[train]\nbatch_size = 16\nact_ckpt = true\n')
    cfg = resolve(str(p))
    assert cfg["name"] == "bs16"
    assert cfg["train"]["batch_size"] == 16 and cfg["train"]["act_ckpt"] is True
    assert cfg["train"]["precision"] == "32-true"


def test_a_toml_file_name_wins_over_its_stem(tmp_path: Path) -> None:
    p = write(tmp_path, "x.toml", 'name = "lab/bs16"\n')
    assert resolve(str(p))["name"] == "lab/bs16"


@pytest.mark.parametrize(("stem", "name"), [("exp (v2)", "exp -v2"), ("..hidden", "hidden"), ("@@@", "unnamed")])
def test_a_file_stem_that_is_not_a_valid_name_is_made_one(tmp_path: Path, stem: str, name: str) -> None:
    p = write(tmp_path, f"{stem}.toml", "[train]\nbatch_size = 2\n")
    assert resolve(str(p))["name"] == name


def test_the_lab_table_syntax_of_design_md_parses(tmp_path: Path) -> None:
    text = """
name = "h100/custom"
description = "Baseline: blip2-opt-2.7b, fp32, AdamW, batch 64"
[model]
id = "Salesforce/blip2-opt-2.7b"
weights = "auto"
dtype = "float32"
quantization = "none"
device_map = "cuda"
[job]
kind = "train"
[train]
batch_size = 64
accumulate_grad_batches = 1
precision = "32-true"
optim = "adamw"
lr = 5e-6
act_ckpt = false
max_epochs = 2
max_steps = -1
num_train_samples = 512
num_workers = 8
strategy = "auto"
lora = { enabled = false, r = 16, alpha = 32, dropout = 0.05 }
qlora = false
[data]
source = "synthetic"
max_length = 50
[runtime]
alloc_conf = ""
sample_hz = 10
"""
    cfg = resolve(str(write(tmp_path, "lab.toml", text)))
    assert cfg["train"]["batch_size"] == 64 and cfg["train"]["lr"] == 5e-6
    assert cfg["model"]["device_map"] == "cuda"


def test_errors_in_a_file_name_the_key(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.toml", '[train]\nprecision = "fp32"\n')
    with pytest.raises(ConfigError, match=r"train.precision = 'fp32'"):
        resolve(str(p))


def test_toml_syntax_errors_name_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "broken.toml", "[train\nbatch_size = 4\n")
    with pytest.raises(ConfigError, match=r"broken.toml: TOML syntax error.*line 1"):
        resolve(str(p))


def test_missing_file_and_unknown_preset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        resolve(str(tmp_path / "missing.toml"))
    with pytest.raises(
        ConfigError, match=r"neither a preset, a TOML file nor a run directory\. Did you mean: .*h100/baseline"
    ):
        resolve("h100/basline")
    with pytest.raises(ConfigError, match="See `blipmon presets`"):
        resolve("zzzzzzzz")


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "latin.toml"
    p.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="cannot read"):
        resolve(str(p))


# -- to_toml round trips -----------------------------------------------------------------------------


def test_to_toml_round_trips_a_full_configuration() -> None:
    cfg = validate({"model": {"device_map": {"language_model": 0, "vision model": "cpu"}},
                    "train": {"lora": {"enabled": True, "target_modules": ["q", "v"]}, "lr": 1e-7}})  # fmt: skip
    assert validate(tomllib.loads(to_toml(cfg))) == cfg


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@given(description=_text, alloc=_text)
def test_to_toml_round_trips_any_string(description: str, alloc: str) -> None:
    cfg = validate({"description": description, "runtime": {"alloc_conf": alloc}})
    back = tomllib.loads(to_toml(cfg))
    assert back["description"] == description and back["runtime"]["alloc_conf"] == alloc


@given(lr=st.floats(min_value=1e-10, max_value=10.0, allow_nan=False), bs=st.integers(1, 65_536))
def test_to_toml_round_trips_numbers(lr: float, bs: int) -> None:
    # Over the whole accepted range (a batch needs at least as many samples as it holds).
    cfg = validate({"train": {"lr": lr, "batch_size": bs, "num_train_samples": max(bs, 512)}})
    assert validate(tomllib.loads(to_toml(cfg))) == cfg


def test_get_reads_dotted_keys() -> None:
    cfg = validate({})
    assert config.get(cfg, "train.lora.r") == 16
    with pytest.raises(KeyError):
        config.get(cfg, "train.nope")


@pytest.mark.parametrize(
    ("precision", "bf16", "fp16"),
    [("32-true", False, False), ("bf16-true", True, False), ("bf16-mixed", True, False), ("16-mixed", False, True)],
)
def test_deepspeed_configuration_follows_the_precision_and_offloads_the_optimizer(
    precision: str, bf16: bool, fp16: bool
) -> None:
    from blipmon.core.config import resolve
    from blipmon.runner.zero_offload import ds_config

    cfg = resolve(
        "tiny/blip2-opt",
        ["train.optim=deepspeed_cpu", "train.strategy=deepspeed_stage_2_offload", f"train.precision={precision}",
         "train.batch_size=3", "train.accumulate_grad_batches=5"],
    )  # fmt: skip
    ds = ds_config(cfg, cuda=False)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (bf16, fp16)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (3, 5)


def test_a_saved_run_directory_is_its_configuration(tmp_path: Path) -> None:
    """`blipmon run profiles/<run> --set ...`: the same configuration again, with a change."""
    from blipmon.core.profile import write_config

    cfg = config.resolve("tiny/blip2-t5", ["train.batch_size=3", "data.image_placeholders=false"])
    run_dir = tmp_path / "20261123T120000-tiny-blip2-t5"
    run_dir.mkdir()
    write_config(run_dir, cfg)
    (run_dir / "events.jsonl").write_text("", encoding="utf-8")
    assert config.resolve(str(run_dir)) == cfg
    again = config.resolve(str(run_dir), ["train.batch_size=5"])
    assert again["train"]["batch_size"] == 5 and again["data"]["image_placeholders"] is False


def test_a_damaged_run_configuration_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="not a configuration object"):
        config.resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot read the run's configuration"):
        config.resolve(str(tmp_path))
    (tmp_path / "config.json").write_text('{"train": {"batch_size": "big"}}', encoding="utf-8")
    with pytest.raises(ConfigError, match="train.batch_size"):
        config.resolve(str(tmp_path))


def test_a_sweep_takes_saved_runs_beside_presets(tmp_path: Path) -> None:
    """A folder with a run's config.json is that run, not a folder of TOML files."""
    from blipmon.core.profile import write_config
    from blipmon.core.sweep import expand

    run_dir = tmp_path / "20261123T120000-tiny-blip2-opt"
    run_dir.mkdir()
    write_config(run_dir, config.resolve("tiny/blip2-opt", ["train.batch_size=3"]))
    (run_dir / "events.jsonl").write_text("", encoding="utf-8")
    entries = expand([str(run_dir), "tiny/blip2-t5"], ["train.max_steps=1"])
    assert [e.cfg["train"]["batch_size"] for e in entries][0] == 3
    assert all(e.cfg["train"]["max_steps"] == 1 for e in entries)


def test_a_model_folder_is_not_mistaken_for_a_run(tmp_path: Path) -> None:
    """A Hugging Face model folder has a config.json too: it is refused as a CONFIG, with the usual message."""
    (tmp_path / "config.json").write_text('{"architectures": ["Blip2ForConditionalGeneration"]}', encoding="utf-8")
    with pytest.raises(ConfigError, match="neither a preset, a TOML file nor a run directory"):
        config.resolve(str(tmp_path))
