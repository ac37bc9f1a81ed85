"""Estimates of load and generate jobs (issue 13, item 1): placement, loading peaks, the KV cache, bad input.

Expected bytes are derived independently of ``estimate/load.py``: parameter counts per module from
``architectures.catalog.params_by_module`` times the dtype's size, the fp32-kept Q-Former from BLIP-2's
``_keep_in_fp32_modules``, and the key/value cache from the architecture's published sizes.
"""

from __future__ import annotations

import json

import pytest

from blipmon import cli
from blipmon.architectures import catalog
from blipmon.core.config import ConfigError, resolve
from blipmon.estimate import load, timeline
from blipmon.estimate.judge import judge

GIB = 1024**3
OPT = "Salesforce/blip2-opt-2.7b"


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: None)


def test_split_language_model_puts_the_language_model_alone_on_the_gpu() -> None:
    """Seed 001: blip2-opt-2.7b in fp16, language_model on GPU 0, the rest on the host."""
    counts = catalog.params_by_module(OPT)
    # fp16 everywhere but the Q-Former and query tokens, which BLIP-2 keeps in fp32 (_keep_in_fp32_modules)
    lm = 2 * counts["language_model"]
    rest = 2 * (counts["vision_model"] + counts["language_projection"]) + 4 * (
        counts["qformer"] + counts["query_tokens"]
    )
    split = judge(resolve("load/split-language-model"), gpu_memory=80 * GIB)
    est = split.estimate
    assert est.placement == {
        "language_model": "cuda:0",
        "vision_model": "cpu",
        "qformer": "cpu",
        "language_projection": "cpu",
        "query_tokens": "cpu",
    }
    # accelerate's dispatch moves the root's own host-mapped parameter (query_tokens, fp32) to the GPU for good
    qt = 4 * counts["query_tokens"]
    assert est.device("cuda:0").params == lm + qt
    assert est.device("cpu").params == rest - qt
    assert split.to_json()["placement"] == {"cuda:0": lm + qt, "cpu": rest - qt}
    whole = judge(resolve("load/fp16-gpu"), gpu_memory=80 * GIB).estimate
    assert whole.device("cuda:0").params == lm + rest  # everything on the GPU
    assert est.device("cuda:0").params < whole.device("cuda:0").params
    assert split.devices["cuda:0"] < judge(resolve("load/fp16-gpu"), gpu_memory=80 * GIB).devices["cuda:0"]
    # during generate the host-mapped modules run on the GPU, one module's own weights at a time: the largest is a
    # vision MLP's fc1 (1408 -> 6144, fp16), not the whole tower (tests/unit/test_load_fixes.py)
    assert est.device("cuda:0").offload_transient == (1408 * 6144 + 6144) * 2


def test_kv_cache_of_blip2_opt_in_fp16() -> None:
    """OPT-2.7B: 32 layers, hidden 2560; keys and values for the 32 query tokens and 30 new tokens, fp16."""
    cfg = resolve("load/fp16-gpu")
    model = load.model_tensors(OPT)
    b = cfg["train"]["batch_size"]
    assert load.kv_cache_bytes(model, cfg, "float16") == 32 * b * 2 * 2560 * 2 * (32 + 30)


def test_a_cpu_load_that_converts_reads_the_file_and_keeps_the_copies() -> None:
    """tiny/blip2-opt is saved in fp32: loaded in fp16, every converted parameter is read (its fp32 file pages) and
    copied (fp16); the Q-Former and query tokens stay fp32 (BLIP-2's _keep_in_fp32_modules), so they stay views of
    the mapped file like every parameter of an fp32 load: nothing of them is resident until read."""
    tiny = catalog.param_bytes(load._architecture("tiny/blip2-opt")[0], "float32", by_module=True)  # noqa: SLF001
    file_bytes = sum(tiny.values())
    half = catalog.param_bytes(load._architecture("tiny/blip2-opt")[0], "float16", by_module=True)  # noqa: SLF001
    est = load.estimate_load(
        resolve("tiny/blip2-opt", ["job.kind=load", "model.device_map=cpu", "model.dtype=float16"])
    )
    cpu = est.device("cpu")
    assert cpu.params == sum(half.values())
    converted = [k for k in half if k not in ("qformer", "query_tokens")]
    assert cpu.load == sum(half[k] + tiny[k] for k in converted) + cpu.buffers
    same = load.estimate_load(resolve("tiny/blip2-opt", ["job.kind=load", "model.device_map=cpu"])).device("cpu")
    assert same.params == file_bytes and same.load == same.buffers


def test_random_real_size_weights_are_built_in_place() -> None:
    """blip-vqa-base, random weights on the CPU: build_random draws every parameter on the host, once."""
    cfg = resolve("train/blip-vqa-lora", ["job.kind=load", "model.device_map=cpu", "model.weights=random",
                                          "train.lora.enabled=false"])  # fmt: skip
    est = load.estimate_load(cfg)
    assert est.path == "random"
    expected = 4 * catalog.param_count("Salesforce/blip-vqa-base")
    cpu = est.device("cpu")
    assert cpu.params == expected and cpu.load == expected + cpu.buffers


def test_the_runners_decisions_are_mirrored() -> None:
    from blipmon.runner import models

    assert load.TINY_VERSION == models.TINY_VERSION
    assert load.TINY_IDS == models.TINY_MODELS
    assert load.cache_root() == models.cache_root()
    assert load.MAX_NEW_TOKENS == 30  # runner.generate: min(data.max_length, 30)


def test_load_json_has_devices_placement_and_a_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["estimate", "load/split-language-model", "--gpu-memory", "24GiB", "--host-memory", "64GiB",
                     "--json"])  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(data["devices"]) == {"cuda:0", "cpu"}
    assert data["gpu_memory_bytes"] == 24 * GIB and data["host_memory_bytes"] == 64 * GIB
    assert data["verdict"] == "fits"
    assert data["judged"]["cpu"] == {"capacity_bytes": 64 * GIB, "capacity_source": "--host-memory", "verdict": "fits"}
    assert {p["phase"] for p in data["phases"]} == {"load", "generate"}
    code = cli.main(["estimate", "load/split-language-model", "--gpu-memory", "24GiB", "--host-memory", "4GiB"])
    out = capsys.readouterr().out
    assert code == 0 and "verdict  OUT OF MEMORY: host RAM" in out
    assert any(line.startswith("device   cuda:0") for line in out.splitlines())


def test_a_gpu_map_without_a_gpu_or_gpu_memory_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["estimate", "load/split-language-model"])
    _out, err = capsys.readouterr()
    assert code == 2 and "--gpu-memory" in err and "Traceback" not in err


def test_a_map_naming_no_module_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["estimate", "load/split-language-model", "--gpu-memory", "24GiB",
                     "--set", 'model.device_map={language_modle = 0, "" = "cpu"}'])  # fmt: skip
    _out, err = capsys.readouterr()
    assert code == 2 and "no module 'language_modle' in Salesforce/blip2-opt-2.7b" in err
    assert "Traceback" not in err
    with pytest.raises(ConfigError, match="places no device for"):
        judge(resolve("load/split-language-model", ["model.device_map={language_model = 0}"]), gpu_memory=GIB)


def test_a_load_job_with_training_settings_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["estimate", "tiny/blip2-opt", "--set", "job.kind=load", "--set", "train.lora.enabled=true"])
    _out, err = capsys.readouterr()
    assert code == 2 and "train.lora.enabled = true" in err and "trains nothing" in err


def test_eight_bit_with_modules_on_the_host_cannot_load() -> None:
    """bitsandbytes refuses an 8-bit model with modules on the host unless fp32 CPU offload is enabled."""
    cfg = resolve("load/mblip-8bit", ['model.device_map={language_model = 0, "" = "cpu"}'])
    j = judge(cfg, gpu_memory=80 * GIB)
    assert j.verdict == "oom" and "llm_int8_enable_fp32_cpu_offload" in " ".join(j.estimate.notes)


@pytest.mark.parametrize("model_id", [OPT, "Gregor/mblip-mt0-xl"])
@pytest.mark.parametrize(("dtype", "quant"), [("float16", "none"), ("bfloat16", "8bit"), ("float32", "4bit-nf4")])
def test_per_tensor_bytes_add_up_to_the_catalogs_per_module_bytes(model_id: str, dtype: str, quant: str) -> None:
    """The per-name table a device map needs sums, per top-level module, to ``catalog.param_bytes``."""
    model = load.model_tensors(model_id)
    mine: dict[str, int] = {}
    for t in model.tensors:
        if not t.buffer and t.floating:
            mine[t.top()] = mine.get(t.top(), 0) + t.nbytes(dtype, quant)
    assert mine == catalog.param_bytes(model_id, dtype, quant, by_module=True)
