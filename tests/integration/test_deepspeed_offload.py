"""DeepSpeed ZeRO-2 with optimizer offload, run for real on the CPU (DeepSpeed's CPU accelerator, gloo).

The seed lab's last row moves the optimizer to the host; what a user must see is where the memory
went: no optimizer state on the device, fp32 master weights and Adam moments on the host, and
gradients that DeepSpeed keeps outside ``.grad``. The first DeepSpeed run on a machine compiles its
CPU Adam (a minute or two), so the runs here are real children with a generous timeout. The fp32 run's modules
(issue 12) are held here too: the root equal to the phases, each module's own share of the flat buffer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import deepspeed  # noqa: F401 - the test extra installs it: a broken install fails here, never skips
import pytest
from module_checks import OPT_DEPTH2, check_root_and_children, own_param_bytes, tiny_model

from blipmon.core.run import RunData, load_run
from blipmon.runner.preflight import preflight

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

OFFLOAD = ["train.optim=deepspeed_cpu", "train.strategy=deepspeed_stage_2_offload"]
FAST = ["train.num_train_samples=16", "train.batch_size=4", "train.max_steps=2", "runtime.sample_hz=2"]


def record(tmp_path: Path, *sets: str, predict: bool = False) -> RunData:
    cmd = [sys.executable, "-m", "blipmon", "run", "tiny/blip2-opt", "--out", str(tmp_path)]
    for s in [*FAST, *OFFLOAD, *sets]:
        cmd += ["--set", s]
    env = {**os.environ, "BLIPMON_PREDICT": "1" if predict else "0", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=880)
    assert res.returncode == 0, res.stderr[-3000:]
    run = load_run(Path(res.stdout.strip().splitlines()[-1]))
    assert run.status == "ok"
    return run


def at(run: RunData, phase: str, step: int, micro: int = 0) -> dict:
    return next(p for p in run.phases if (p["phase"], p["step"], p["micro_step"]) == (phase, step, micro))


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> RunData:
    return record(tmp_path_factory.mktemp("ds32"), "train.accumulate_grad_batches=2", predict=True)


def flat_numel(facts: Any) -> int:
    """Elements of ZeRO-2's flat parameter group for a full fine-tune of one rank: every parameter, padded to an
    even count (DeepSpeed aligns the group to 2 elements x world size; ``nccl_start_alignment_factor``)."""
    n = facts.param_numel
    return n + (-n) % 2


def test_optimizer_memory_is_on_the_host_and_reported_apart(fp32: RunData, tiny_facts: dict[str, Any]) -> None:
    n = flat_numel(tiny_facts["tiny/blip2-opt"])  # counted from the model, not the run's own plan
    assert fp32.plan["trainable_params"] == tiny_facts["tiny/blip2-opt"].param_numel
    assert at(fp32, "before_fwd", 0)["params"] == 4 * n  # the fp32 weights, now views of one flat buffer
    end = at(fp32, "after_opt_step", 1, 1)
    # fp32 master partition (4 B) + exp_avg + exp_avg_sq (8 B) per trainable parameter, all in host RAM.
    assert end["optim"] == end["optim_host"] == 12 * n
    # Before the first step only the master copy exists; Adam's moments appear at the first step.
    assert at(fp32, "before_fwd", 0)["optim"] == 4 * n
    # Gradients never sit in .grad: the fp32 partition grads (4 B) plus the host accumulator (4 B, accumulating).
    assert at(fp32, "after_bwd", 0, 1)["grads"] == at(fp32, "after_bwd", 0, 1)["grads_host"] == 8 * n
    assert [s["step"] for s in fp32.steps] == [0, 1]


def test_show_and_compare_say_where_the_optimizer_went(fp32: RunData) -> None:
    from blipmon.core.report import compare_rows, render_show

    assert "offload  at the last phase: optimizer state" in render_show(fp32)
    labels = [row.label for row in compare_rows([fp32])]
    assert "optim on host @ peak phase" in labels and "grads on host @ peak phase" in labels


def test_the_prediction_matches_what_was_measured(fp32: RunData) -> None:
    pred = {(p["phase"], p["step"]): p for p in fp32.prediction["phases"]}
    for key in [("after_bwd", 0), ("after_opt_step", 0), ("after_opt_step", 1)]:
        measured = at(fp32, key[0], key[1], 1)
        for cat in ("params", "grads", "optim"):
            assert pred[key][cat] == measured[cat], (key, cat)


def test_bf16_true_halves_the_model_but_keeps_fp32_optimizer_state_on_the_host(
    tmp_path: Path, fp32: RunData, tiny_facts: dict[str, Any]
) -> None:
    bf16 = record(tmp_path, "train.precision=bf16-true")
    n = flat_numel(tiny_facts["tiny/blip2-opt"])
    assert at(bf16, "before_fwd", 0)["params"] == 2 * n  # bf16: 2 bytes a parameter
    assert at(bf16, "after_opt_step", 1)["optim_host"] == at(bf16, "after_opt_step", 1)["optim"] == 12 * n


def test_modules_root_equals_the_phase_and_children_fit_their_parents(fp32: RunData) -> None:
    """Issue 12's bar under ZeRO-2 with offload, every micro-step of both steps."""
    check_root_and_children(fp32, "zero-offload")
    assert fp32.modules.trees[0] == OPT_DEPTH2  # the engine's ``module.`` dropped


def test_deepspeed_flat_buffer_is_split_by_module(
    fp32: RunData, tiny_models: dict[str, Path], tiny_facts: dict[str, Any]
) -> None:
    """ZeRO-2 makes every fp32 weight a view of one flat buffer: each module still gets its own weights' bytes,
    the buffer's alignment padding the root; the strategy's gradient and optimizer partitions are the root's."""
    names = list(fp32.modules.trees[0])
    expected = own_param_bytes(tiny_model(tiny_models["tiny/blip2-opt"]), names)
    rows = fp32.modules.at(0, "after_opt_step")
    assert rows[0].params == 4 * flat_numel(tiny_facts["tiny/blip2-opt"])
    assert [r.params for r in rows[1:]] == expected[1:]
    assert all(r.optim == 0 for r in rows[1:]) and rows[0].optim == 12 * flat_numel(tiny_facts["tiny/blip2-opt"])
    grads = fp32.modules.at(0, "after_bwd", micro_step=1)
    assert all(r.grads == 0 for r in grads[1:]) and grads[0].grads == 8 * flat_numel(tiny_facts["tiny/blip2-opt"])


def test_several_ranks_with_offload_are_refused_before_loading() -> None:
    from blipmon.core.config import ConfigError, resolve

    cfg = resolve("tiny/blip2-opt", [*OFFLOAD, "train.devices=2"])
    with pytest.raises(ConfigError, match="train.devices"):
        preflight(cfg, cuda=False)
