"""Every training strategy of the seeds, run for real on CPU with the tiny models.

Each configuration trains in-process through ``blipmon.runner.child.record`` (the same code the
child runs) into a temporary run directory, and the assertions read the recorded profile, so
they check what a user would see in ``blipmon show``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from blipmon.core.config import resolve
from blipmon.core.profile import write_config
from blipmon.core.run import RunData, load_run
from blipmon.runner.child import record

FAST = ["train.num_train_samples=16", "train.batch_size=8", "train.max_epochs=1", "runtime.sample_hz=2"]


def run_inprocess(tmp_path: Path, preset: str = "tiny/blip2-opt", *overrides: str) -> RunData:
    cfg = resolve(preset, [*FAST, *overrides])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_config(run_dir, cfg)
    code = record(cfg, run_dir)
    run = load_run(run_dir)
    assert code == 0, (run.error or {}).get("traceback", run.error)
    assert run.status == "ok"
    return run


def phase(run: RunData, name: str, step: int = 0, micro: int = 0) -> dict[str, Any]:
    return next(p for p in run.phases if p["phase"] == name and p["step"] == step and p["micro_step"] == micro)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> RunData:
    return run_inprocess(tmp_path_factory.mktemp("base"))


def test_bf16_true_halves_params_grads_and_adam_state(tmp_path: Path, baseline: RunData) -> None:
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "train.precision=bf16-true")
    base, bf16 = phase(baseline, "after_opt_step"), phase(run, "after_opt_step")
    assert bf16["params"] * 2 == base["params"]
    assert bf16["grads"] * 2 == base["grads"]
    # AdamW keeps its moments in the parameters' dtype; the per-tensor step counters stay fp32 scalars.
    assert bf16["optim"] < base["optim"]


def test_bf16_mixed_keeps_fp32_weights(tmp_path: Path, baseline: RunData) -> None:
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "train.precision=bf16-mixed")
    assert phase(run, "after_opt_step")["params"] == phase(baseline, "after_opt_step")["params"]
    assert phase(run, "after_opt_step")["optim"] == phase(baseline, "after_opt_step")["optim"]


def test_16_mixed_trains_with_a_grad_scaler(tmp_path: Path) -> None:
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "train.precision=16-mixed")
    assert len(run.steps) == 2


def test_sgd_has_no_optimizer_state(tmp_path: Path) -> None:
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "train.optim=sgd")
    assert all(p["optim"] == 0 for p in run.phases)


@pytest.mark.parametrize("optim", ["adam_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_keep_less_state_than_adamw(tmp_path: Path, baseline: RunData, optim: str) -> None:
    run = run_inprocess(tmp_path, "tiny/blip2-opt", f"train.optim={optim}")
    eight = phase(run, "after_opt_step")["optim"]
    assert 0 < eight < phase(baseline, "after_opt_step")["optim"] / 2


def test_activation_checkpointing_keeps_fewer_activations(tmp_path: Path, baseline: RunData) -> None:
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "train.act_ckpt=true")
    assert 0 < phase(run, "after_fwd")["acts"] < phase(baseline, "after_fwd")["acts"]
    assert phase(run, "after_bwd")["acts"] == 0


def test_lora_trains_only_adapters(tmp_path: Path, baseline: RunData) -> None:
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "train.lora.enabled=true", "train.lora.r=4")
    trainable = run.plan["trainable_params"]
    assert 0 < trainable < run.plan["total_params"] / 10
    after = phase(run, "after_opt_step")
    assert after["grads"] == trainable * 4  # fp32 adapters only
    assert after["params"] > phase(baseline, "after_opt_step")["params"]  # base + adapters


def test_lora_on_blip_vqa_targets_query_and_value(tmp_path: Path) -> None:
    run = run_inprocess(tmp_path, "tiny/blip-vqa", "train.lora.enabled=true")
    assert run.plan["trainable_params"] > 0
    assert run.config["train"]["lora"]["target_modules"] == []  # the per-architecture default was used


def test_qlora_loads_a_4bit_base(tmp_path: Path, baseline: RunData) -> None:
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "train.qlora=true")
    assert phase(run, "after_opt_step")["params"] < phase(baseline, "after_opt_step")["params"]
    assert run.plan["trainable_params"] > 0


def test_t5_with_lora_and_accumulation(tmp_path: Path) -> None:
    run = run_inprocess(
        tmp_path, "tiny/blip2-t5", "train.lora.enabled=true", "train.accumulate_grad_batches=2", "train.batch_size=4"
    )
    assert [p["micro_step"] for p in run.phases if p["phase"] == "after_bwd" and p["step"] == 0] == [0, 1]


def test_cpu_first_loads_on_the_cpu(tmp_path: Path) -> None:
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "model.device_map=cpu-first")
    assert run.load and run.load["placement"] == {"cpu": run.load["params_bytes"]}


def test_explicit_device_map_of_seed_001(tmp_path: Path, baseline: RunData) -> None:
    # Seed 001's per-submodule map, with every module on the CPU since this machine has no GPU.
    modules = ["language_model", "vision_model", "qformer", "language_projection", "query_tokens"]
    table = "{" + ", ".join(f'{m} = "cpu"' for m in modules) + "}"
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "job.kind=load", f"model.device_map={table}")
    assert run.load and run.load["params_bytes"] == phase(baseline, "before_fwd")["params"]


@pytest.mark.parametrize("quant", ["8bit", "4bit-nf4", "4bit-fp4"])
def test_quantized_load_jobs_record_smaller_params(tmp_path: Path, baseline: RunData, quant: str) -> None:
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "job.kind=load", f"model.quantization={quant}")
    assert run.load is not None
    assert run.load["params_bytes"] < phase(baseline, "before_fwd")["params"]


def test_image_folder_dataset(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as fh:
        for i in range(5):
            Image.new("RGB", (40 + i, 30), (i * 40, 90, 200)).save(folder / f"{i}.png")
            fh.write(json.dumps({"file_name": f"{i}.png", "question": "what is it?", "answer": "food"}) + "\n")
    run = run_inprocess(tmp_path, "tiny/blip-vqa", f"data.source={json.dumps(str(folder))}", "train.batch_size=2")
    assert len(run.steps) == 3  # five images in batches of two, one epoch


@pytest.mark.parametrize("peft", ["train.lora.enabled=true", "train.qlora=true"])
def test_blip_vqa_with_activation_checkpointing_and_adapters(tmp_path: Path, peft: str) -> None:
    # BLIP's in-place position-embedding add used to fail on a leaf forced to require grad.
    run = run_inprocess(tmp_path, "tiny/blip-vqa", "train.act_ckpt=true", peft)
    assert phase(run, "after_bwd")["grads"] > 0 and phase(run, "after_bwd")["acts"] == 0
