"""Every training strategy of the seeds, run for real on CPU with the tiny models.

Each configuration trains in-process through ``blipmon.runner.child.record`` (the same code the
child runs) into a temporary run directory, and the assertions read the recorded profile, so
they check what a user would see in ``blipmon show``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from support import adamw_state_after_one_step, optimizer_state_bytes, unique_storage_bytes

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


# -- independent expected values: the tiny checkpoints loaded here with transformers, counted with torch ----------


def load_tiny(path: Path, **kwargs: Any) -> torch.nn.Module:
    """A tiny checkpoint loaded in this process as a user would (``from_pretrained``), not through blipmon."""
    from transformers import AutoConfig

    from blipmon.runner.models import model_class

    return model_class(AutoConfig.from_pretrained(path)).from_pretrained(path, **kwargs)


def bnb_config(quant: str) -> Any:
    """The bitsandbytes load a configuration's ``model.quantization`` names (fp32 compute, no double quant)."""
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.split("-")[1],
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=False,
    )


def quantized_param_bytes(path: Path, quant: str) -> int:
    """Parameter storages of a real bitsandbytes load on the CPU: packed/int8 weights at their real size, the rest fp32
    (the quantization state, absmax and row scales, is not a parameter)."""
    model = load_tiny(path, dtype=torch.float32, quantization_config=bnb_config(quant), device_map={"": "cpu"})
    return unique_storage_bytes(model.parameters())


def lora_elements(model: torch.nn.Module, targets: re.Pattern[str], r: int) -> int:
    """LoRA's added elements: A (r x in) and B (out x r) for every Linear whose name the targets match."""
    return sum(
        r * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and targets.fullmatch(name)
    )


OPT_QV = re.compile(r".*language_model.*\.(q_proj|v_proj)")  # the OPT decoder's query and value projections


def test_bf16_true_halves_params_grads_and_adam_state(
    tmp_path: Path, baseline: RunData, tiny_models: dict[str, Path], tiny_facts: dict[str, Any]
) -> None:
    facts = tiny_facts["tiny/blip2-opt"]
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "train.precision=bf16-true")
    base, bf16 = phase(baseline, "after_opt_step"), phase(run, "after_opt_step")
    assert base["params"] == base["grads"] == facts.params_bytes
    assert bf16["params"] == bf16["grads"] == facts.bytes_as(2)  # every parameter in bf16: 2 bytes each
    # AdamW keeps its moments in the parameters' dtype; the per-tensor step counters stay fp32 scalars:
    # what torch's AdamW allocates for the same model in bf16.
    bf16_state = adamw_state_after_one_step(
        list(load_tiny(tiny_models["tiny/blip2-opt"], dtype=torch.bfloat16).parameters())
    )
    assert bf16_state == 2 * facts.bytes_as(2) + facts.param_tensors * facts.adamw_step_bytes
    assert bf16["optim"] == bf16_state
    assert base["optim"] == facts.adamw_state_bytes


def test_bf16_mixed_keeps_fp32_weights(tmp_path: Path, baseline: RunData) -> None:
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "train.precision=bf16-mixed")
    assert phase(run, "after_opt_step")["params"] == phase(baseline, "after_opt_step")["params"]
    assert phase(run, "after_opt_step")["optim"] == phase(baseline, "after_opt_step")["optim"]


class SpyScaler(torch.amp.GradScaler):
    """torch's real GradScaler, remembering what the training loop asked of it (nothing is replaced)."""

    made: list[SpyScaler] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scaled: list[float] = []  # the scale each loss was multiplied by
        self.updates: list[tuple[float, float]] = []  # (scale before, after) per optimizer step
        type(self).made.append(self)

    def scale(self, outputs: Any) -> Any:
        self.scaled.append(self.get_scale())
        return super().scale(outputs)

    def update(self, new_scale: Any = None) -> None:
        before = self.get_scale()
        super().update(new_scale)
        self.updates.append((before, self.get_scale()))


def test_16_mixed_trains_with_a_grad_scaler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_facts: dict[str, Any]
) -> None:
    SpyScaler.made = []
    monkeypatch.setattr(torch.amp, "GradScaler", SpyScaler)
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "train.precision=16-mixed")
    assert [s["step"] for s in run.steps] == [0, 1]
    [scaler] = SpyScaler.made  # one scaler, on the device the model trains on
    assert scaler._device == "cpu"
    assert len(scaler.scaled) == 2 and scaler.scaled[0] == 2.0**16  # every backward went through scale()
    assert len(scaler.updates) == 2  # scaler.step + update at each optimizer step
    # A step whose gradients overflowed is skipped (the scale backs off): AdamW then has no state yet.
    ran = [after >= before for before, after in scaler.updates]
    for step in (0, 1):
        expected = tiny_facts["tiny/blip2-opt"].adamw_state_bytes if any(ran[: step + 1]) else 0
        assert phase(run, "after_opt_step", step)["optim"] == expected, (step, scaler.updates)
    # fp32 weights and gradients under autocast; the recorded losses are unscaled.
    assert phase(run, "after_bwd")["grads"] == tiny_facts["tiny/blip2-opt"].params_bytes
    assert all(0 < s["loss"] < 100 for s in run.steps)


def test_sgd_has_no_optimizer_state(tmp_path: Path) -> None:
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "train.optim=sgd")
    assert all(p["optim"] == 0 for p in run.phases)


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("optim", ["adam_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_keep_less_state_than_adamw(
    tmp_path: Path, baseline: RunData, optim: str, tiny_models: dict[str, Path]
) -> None:
    import bitsandbytes as bnb

    run = run_inprocess(tmp_path, "tiny/blip2-opt", f"train.optim={optim}")
    # The state bitsandbytes' own optimizer allocates for the same model after one real step.
    params = list(load_tiny(tiny_models["tiny/blip2-opt"]).parameters())
    opt = (bnb.optim.Adam8bit if optim == "adam_8bit" else bnb.optim.PagedAdamW8bit)(params, lr=1e-3)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    expected = optimizer_state_bytes(opt)
    assert phase(run, "after_opt_step")["optim"] == expected
    assert expected < phase(baseline, "after_opt_step")["optim"] / 2  # what the name says, on these numbers


def test_activation_checkpointing_keeps_fewer_activations(tmp_path: Path, baseline: RunData) -> None:
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "train.act_ckpt=true")
    assert 0 < phase(run, "after_fwd")["acts"] < phase(baseline, "after_fwd")["acts"]
    assert phase(run, "after_bwd")["acts"] == 0


def test_lora_trains_only_adapters(tmp_path: Path, tiny_models: dict[str, Path], tiny_facts: dict[str, Any]) -> None:
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "train.lora.enabled=true", "train.lora.r=4")
    adapters = lora_elements(load_tiny(tiny_models["tiny/blip2-opt"]), OPT_QV, 4)
    assert adapters == 4 * 4 * (64 + 64)  # two layers x (q_proj, v_proj), each 64 -> 64
    assert run.plan["trainable_params"] == adapters
    after = phase(run, "after_opt_step")
    assert after["grads"] == adapters * 4  # fp32 adapters only
    assert after["params"] == tiny_facts["tiny/blip2-opt"].params_bytes + adapters * 4  # base + adapters


def test_lora_on_blip_vqa_targets_query_and_value(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    from blipmon.runner.models import load_model
    from blipmon.runner.train import apply_peft

    run = run_inprocess(tmp_path, "tiny/blip-vqa", "train.lora.enabled=true")
    assert run.config["train"]["lora"]["target_modules"] == []  # the per-architecture default was used
    r = run.config["train"]["lora"]["r"]
    model = load_tiny(tiny_models["tiny/blip-vqa"])
    query_value = re.compile(r".*\.(query|value)")
    expected = lora_elements(model, query_value, r)
    assert expected == 16 * r * (64 + 64)  # self- and cross-attention query and value, 2 layers, encoder and decoder
    assert run.plan["trainable_params"] == expected
    assert phase(run, "after_bwd")["grads"] == expected * 4
    # Which modules got adapters: exactly every query and value Linear (same shapes as key: the count alone
    # could not tell them apart), from the runner's own apply_peft on the configuration the run used.
    wrapped = apply_peft(load_model(run.config, cuda=False), run.config)
    adapted = {name.removeprefix("base_model.model.") for name, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {
        name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and query_value.fullmatch(name)
    }


def test_qlora_loads_a_4bit_base(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "train.qlora=true")
    path = tiny_models["tiny/blip2-opt"]
    adapters = lora_elements(load_tiny(path), OPT_QV, run.config["train"]["lora"]["r"])
    assert run.plan["trainable_params"] == adapters
    # The 4-bit NF4 base as bitsandbytes stores it, plus the fp32 adapters.
    assert phase(run, "after_opt_step")["params"] == quantized_param_bytes(path, "4bit-nf4") + adapters * 4


def test_t5_with_lora_and_accumulation(tmp_path: Path) -> None:
    run = run_inprocess(
        tmp_path, "tiny/blip2-t5", "train.lora.enabled=true", "train.accumulate_grad_batches=2", "train.batch_size=4"
    )
    assert [p["micro_step"] for p in run.phases if p["phase"] == "after_bwd" and p["step"] == 0] == [0, 1]


def test_cpu_first_loads_on_the_cpu(tmp_path: Path) -> None:
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "model.device_map=cpu-first")
    assert run.load and run.load["placement"] == {"cpu": run.load["params_bytes"]}


def test_explicit_device_map_of_seed_001(tmp_path: Path, tiny_facts: dict[str, Any]) -> None:
    # Seed 001's per-submodule map, with every module on the CPU since this machine has no GPU.
    modules = ["language_model", "vision_model", "qformer", "language_projection", "query_tokens"]
    table = "{" + ", ".join(f'{m} = "cpu"' for m in modules) + "}"
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "job.kind=load", f"model.device_map={table}")
    assert run.load and run.load["params_bytes"] == tiny_facts["tiny/blip2-opt"].params_bytes
    assert run.load["placement"] == {"cpu": tiny_facts["tiny/blip2-opt"].params_bytes}


@pytest.mark.parametrize("quant", ["8bit", "4bit-nf4", "4bit-fp4"])
def test_quantized_load_jobs_record_smaller_params(
    tmp_path: Path, quant: str, tiny_models: dict[str, Path], tiny_facts: dict[str, Any]
) -> None:
    run = run_inprocess(tmp_path, "tiny/blip2-opt", "job.kind=load", f"model.quantization={quant}")
    assert run.load is not None
    expected = quantized_param_bytes(tiny_models["tiny/blip2-opt"], quant)
    assert run.load["params_bytes"] == expected
    assert expected < tiny_facts["tiny/blip2-opt"].params_bytes  # what the name says, on these numbers


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
