"""Preflight refuses the device maps transformers and accelerate refuse, before loading (issue 13 follow-up 2).

(a) 8-bit or 4-bit (``model.quantization``, or ``train.qlora`` in a train job) with a table whose values are not all
"cpu" but include "cpu": transformers' ``Bnb8BitHfQuantizer``/``Bnb4BitHfQuantizer.validate_environment`` raise
"Some modules are dispatched on the CPU or the disk" (read from transformers' sources: ``values != {"cpu"} and
("cpu" in values or "disk" in values)``). (b) A table whose ``""`` entry is "cpu" beside a GPU entry: accelerate
offloads everything and fails with "weight is on the meta device". Both used to load and exit 1. The rule is
transformers' own, so it is checked against transformers' code too, and against the estimator's ``refused``.
"""

from __future__ import annotations

import pytest
from transformers import BitsAndBytesConfig
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

from blipmon.core.config import ConfigError, resolve
from blipmon.estimate import timeline
from blipmon.estimate.judge import judge
from blipmon.runner import preflight as pf

GIB = 1024**3
SPLIT = ('model.device_map={language_model = 0, vision_model = "cpu", qformer = "cpu", language_projection = "cpu", '
         'query_tokens = "cpu"}')  # fmt: skip
ROOT_ON_HOST = 'model.device_map={language_model = 0, "" = "cpu"}'
ALL_GPU = 'model.device_map={language_model = 0, "" = 0}'
ALL_HOST = 'model.device_map={language_model = "cpu", "" = "cpu"}'

BNB_8 = (
    "model.device_map puts vision_model = 'cpu', qformer = 'cpu', language_projection = 'cpu', query_tokens = 'cpu' "
    "on the host beside a GPU (language_model = 0), with model.quantization = '8bit': transformers refuses 8-bit modules dispatched on the "
    "CPU or the disk before loading (bitsandbytes: 'Some modules are dispatched on the CPU or the disk'; blipmon "
    "does not set llm_int8_enable_fp32_cpu_offload). Map every module to a GPU, every module to 'cpu', or load "
    "unquantized (model.quantization = 'none')"
)
BNB_QLORA = (
    "model.device_map puts '' = 'cpu' on the host beside a GPU (language_model = 0), with train.qlora = true (the "
    "base model in 4bit-nf4): transformers refuses 4-bit modules dispatched on the CPU or the disk before loading "
    "(bitsandbytes: 'Some modules are dispatched on the CPU or the disk'; blipmon does not set "
    "llm_int8_enable_fp32_cpu_offload). Map every module to a GPU, every module to 'cpu', or train without QLoRA "
    "(train.qlora = false)"
)
ROOT = (
    "model.device_map[''] = 'cpu' beside GPU entries (language_model = 0): accelerate offloads the whole model for "
    "the '' entry, and then cannot move the GPU modules' weights to the GPU (ValueError: 'weight is on the meta "
    "device'). Name the modules that go to the host instead of '' (e.g. {vision_model = 'cpu', qformer = 'cpu', ...})"
)


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: None)


def _refusal(preset: str, sets: list[str], *, cuda: bool) -> str:
    try:
        pf.preflight(resolve(preset, sets), cuda=cuda, bf16=True)
    except ConfigError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("cuda", [True, False])
@pytest.mark.parametrize(
    ("preset", "sets", "expected"),
    [
        ("tiny/blip2-opt", ["job.kind=load", "model.quantization=8bit", SPLIT], BNB_8),
        ("tiny/blip2-opt", ["job.kind=load", ROOT_ON_HOST], ROOT),
        ("tiny/blip2-opt", ["train.qlora=true", ROOT_ON_HOST], BNB_QLORA),
    ],
)
def test_a_map_transformers_refuses_is_refused_first_on_any_machine(
    preset: str, sets: list[str], expected: str, cuda: bool
) -> None:
    """On a GPU machine it used to pass (then load and exit 1); without one, the map is said before the GPU."""
    assert _refusal(preset, sets, cuda=cuda) == expected


@pytest.mark.parametrize(
    "sets",
    [
        ["job.kind=load", "model.quantization=8bit", ALL_GPU],
        ["job.kind=load", "model.quantization=4bit-nf4", ALL_HOST],  # the host alone: bitsandbytes allows it
        ["job.kind=load", "model.quantization=8bit", 'model.device_map={"" = "cpu"}'],
        ["job.kind=load", SPLIT],  # unquantized, named modules on the host: accelerate offloads them
        ["job.kind=load", 'model.device_map={vision_model = "cpu", "" = 0}'],
        ["train.qlora=true", ALL_GPU],
    ],
)
def test_maps_that_load_are_not_refused(sets: list[str]) -> None:
    assert _refusal("tiny/blip2-opt", sets, cuda=True) == ""


@pytest.mark.parametrize("quant", ["8bit", "4bit-nf4", "4bit-fp4"])
@pytest.mark.parametrize(
    "table",
    [
        {"language_model": 0, "vision_model": "cpu", "qformer": "cpu", "query_tokens": "cpu"},
        {"language_model": 0, "": "cpu"},
        {"language_model": "cuda:0", "": 0},
        {"language_model": "cpu", "": "cpu"},
        {"": 0},
    ],
)
def test_the_rule_is_transformers_own(quant: str, table: dict[str, object]) -> None:
    """blipmon's refusal agrees with the quantizers' own ``validate_environment`` (as blipmon configures them)."""
    if quant == "8bit":
        quantizer = Bnb8BitHfQuantizer(BitsAndBytesConfig(load_in_8bit=True))
    else:
        quantizer = Bnb4BitHfQuantizer(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant[5:]))
    transformers_says = ""
    try:
        quantizer.validate_environment(device_map=dict(table))
    except ValueError as e:
        transformers_says = str(e)
    cfg = resolve("tiny/blip2-opt", ["job.kind=load", f"model.quantization={quant}"])
    cfg["model"]["device_map"] = table
    refused = ""
    try:
        pf.check_map_loadable(cfg)
    except ConfigError as e:
        refused = str(e)
    assert bool(refused) == bool(transformers_says)
    if refused:
        assert transformers_says.startswith("Some modules are dispatched on the CPU or the disk.")
        assert "'Some modules are dispatched on the CPU or the disk'" in refused


@pytest.mark.parametrize(
    "sets",
    [
        ["job.kind=load", "model.quantization=8bit", SPLIT],
        ["job.kind=load", "model.quantization=4bit-nf4", ROOT_ON_HOST],
        ["job.kind=generate", ROOT_ON_HOST],
        ["job.kind=load", "model.quantization=8bit", ALL_GPU],
        ["job.kind=load", SPLIT],
        ["job.kind=load", "model.quantization=8bit", ALL_HOST],
    ],
)
def test_preflight_refuses_what_the_estimate_refuses(sets: list[str]) -> None:
    cfg = resolve("tiny/blip2-opt", sets)
    estimated = judge(cfg, gpu_memory=80 * GIB, host_memory=64 * GIB).refused
    assert bool(_refusal("tiny/blip2-opt", sets, cuda=True)) == bool(estimated)


def test_no_gpu_is_still_said_for_a_map_that_loads() -> None:
    assert _refusal("tiny/blip2-opt", ["job.kind=load", SPLIT], cuda=False).startswith(
        "this configuration needs an NVIDIA GPU (model.device_map puts language_model on a GPU)"
    )
