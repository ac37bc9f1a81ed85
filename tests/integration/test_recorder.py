"""The recorder end to end: real ``blipmon run`` processes training the real tiny models on the CPU.

Five runs start together when the module starts (the machine has two cores; a child mostly pays
for importing torch), and every test below reads one of them, so each child runs exactly once.

The main run is the seed lab's memory story in miniature: tiny BLIP-2 OPT, full fp32 fine-tune,
AdamW, batch 2 with ``accumulate_grad_batches = 3`` over 12 samples: two optimizer steps of three
micro-steps each. Expected byte counts come from ``tiny_facts``, computed independently in this
process from the same checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blipmon.core.config import resolve
from blipmon.core.run import PHASES, RunData
from blipmon.core.schedule import schedule

pytestmark = pytest.mark.slow

ACCUM = (
    "name=seed-lab/accum 3",  # a slash and a space: the run directory must still be one safe folder
    "train.batch_size=2",
    "train.accumulate_grad_batches=3",
    "train.num_train_samples=12",
    "train.max_epochs=1",
)
SMALL = ("train.batch_size=4", "train.num_train_samples=8", "train.max_epochs=1")


@pytest.fixture(scope="module")
def runs(start_run: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    cwd = tmp_path_factory.mktemp("cwd")
    runs = {
        "accum": start_run("tiny/blip2-opt", *ACCUM),
        "t5": start_run("tiny/blip2-t5", *SMALL),
        # No --out: runs go to (docs/profile-format.md) ./profiles/<UTC timestamp>-<config name>/.
        "vqa": start_run("tiny/blip-vqa", *SMALL, use_out=False, cwd=cwd),
        "load": start_run("tiny/blip2-opt", "job.kind=load"),
        "generate": start_run("tiny/blip-vqa", "job.kind=generate", "train.batch_size=2"),
    }
    yield runs
    for rp in runs.values():
        rp.kill()


def finished(runs: dict[str, Any], key: str) -> tuple[Any, RunData]:
    fin = runs[key].finish()
    assert fin.returncode == 0, f"{fin.stderr}\n{runs[key].describe()}"
    return fin, fin.run()


@pytest.fixture(scope="module")
def accum(runs: dict[str, Any]) -> RunData:
    return finished(runs, "accum")[1]


def by_phase(run: RunData) -> list[tuple[int, int, str]]:
    return [(p["step"], p["micro_step"], p["phase"]) for p in run.phases]


# -- the main run: exit, output, where it went ------------------------------------------------------


def test_run_exits_0_prints_the_run_dir_and_stays_inside_out(runs: dict[str, Any]) -> None:
    fin, run = finished(runs, "accum")
    assert "Traceback" not in fin.stderr
    assert fin.stdout.strip().splitlines()[-1] == str(fin.run_dir)
    out = runs["accum"].root
    assert fin.run_dir.parent == out
    assert re.fullmatch(r"\d{8}T\d{6}-seed-lab-accum-3", fin.run_dir.name)
    assert run.status == "ok"
    assert run.exit == {**run.exit, "code": 0, "signal": None}
    assert (fin.run_dir / "child.log").is_file()


def test_run_without_out_goes_to_profiles_under_the_working_directory(runs: dict[str, Any]) -> None:
    fin, run = finished(runs, "vqa")
    assert fin.run_dir.parent == runs["vqa"].root
    assert fin.run_dir.parent.name == "profiles"
    assert re.fullmatch(r"\d{8}T\d{6}-tiny-blip-vqa", fin.run_dir.name)


def test_the_resolved_configuration_is_recorded(runs: dict[str, Any], accum: RunData) -> None:
    expected = resolve(runs["accum"].config, runs["accum"].sets)
    assert accum.config == expected
    assert json.loads((accum.path / "config.json").read_text()) == expected
    assert accum.name == "seed-lab/accum 3"


# -- the memory story -------------------------------------------------------------------------------


def test_params_are_constant_and_exact(accum: RunData, tiny_facts: dict[str, Any]) -> None:
    expected = tiny_facts["tiny/blip2-opt"].params_bytes
    assert accum.load is not None and accum.load["params_bytes"] == expected
    assert accum.phases and {p["params"] for p in accum.phases} == {expected}


def test_activations_appear_after_forward_and_are_freed_by_the_end_of_backward(accum: RunData) -> None:
    for p in accum.phases:
        where = (p["step"], p["micro_step"], p["phase"])
        if p["phase"] == "after_fwd":
            assert p["acts"] > 0, where
        else:
            assert p["acts"] == 0, where
    # Every micro-step saves the same tensors for the same shapes.
    assert len({p["acts"] for p in accum.phases if p["phase"] == "after_fwd"}) == 1


def test_no_grads_before_the_first_backward_then_grads_equal_params(accum: RunData, tiny_facts: dict[str, Any]) -> None:
    params = tiny_facts["tiny/blip2-opt"].params_bytes
    first_bwd = by_phase(accum).index((0, 0, "after_bwd"))
    assert all(p["grads"] == 0 for p in accum.phases[:first_bwd])
    # Full fp32 fine-tune: one fp32 gradient per parameter, accumulated in place over micro-steps.
    assert all(p["grads"] == params for p in accum.phases if p["phase"] == "after_bwd")
    assert all(p["grads"] == params for p in accum.phases if p["phase"] == "after_opt_step")
    mid_window = [p for p in accum.phases if p["phase"] == "before_fwd" and p["micro_step"] > 0]
    assert mid_window and all(p["grads"] == params for p in mid_window)
    # zero_grad(set_to_none=True) after each optimizer step: the next step starts with none.
    assert all(p["grads"] == 0 for p in accum.phases if (p["micro_step"], p["phase"]) == (0, "before_fwd"))


def test_no_optimizer_state_before_the_first_step_then_adamw_holds_2x_params(
    accum: RunData, tiny_facts: dict[str, Any]
) -> None:
    facts = tiny_facts["tiny/blip2-opt"]
    first_step = by_phase(accum).index((0, 2, "after_opt_step"))
    assert all(p["optim"] == 0 for p in accum.phases[:first_step])
    after = accum.phases[first_step:]
    assert after and all(p["optim"] == facts.adamw_state_bytes for p in after)
    # The expected figure is torch's own AdamW state on this model (measured in this process); it is 2x the
    # parameters (exp_avg and exp_avg_sq, each the size of its parameter) plus one step counter per tensor.
    assert facts.adamw_state_bytes == 2 * facts.params_bytes + facts.param_tensors * facts.adamw_step_bytes
    assert facts.adamw_step_bytes == 4  # a float32 scalar tensor


def test_accumulate_grad_batches_3_gives_three_micro_steps_and_one_optimizer_step(accum: RunData) -> None:
    expected = []
    for step in range(2):
        for micro in range(3):
            expected += [(step, micro, "before_fwd"), (step, micro, "after_fwd"), (step, micro, "after_bwd")]
        expected.append((step, 2, "after_opt_step"))
    assert by_phase(accum) == expected
    assert [s["step"] for s in accum.steps] == [0, 1]
    assert all(s["micro_steps"] == 3 for s in accum.steps)
    assert accum.plan["micro_per_step"] == 3
    assert accum.plan["total_steps"] == schedule(accum.config).total_steps == 2
    assert [p["t"] for p in accum.phases] == sorted(p["t"] for p in accum.phases)
    assert {p["rank"] for p in accum.phases} == {0}


def test_cpu_runs_have_no_allocator_figures(accum: RunData) -> None:
    for p in accum.phases:
        assert p["other"] is None and p["allocated"] is None and p["peak"] is None and p["reserved"] is None
        assert isinstance(p["host_rss"], int) and p["host_rss"] > 0


def test_steps_record_time_rate_and_a_finite_loss(accum: RunData) -> None:
    for s in accum.steps:
        assert s["seconds"] > 0
        assert s["samples_per_s"] > 0
        assert isinstance(s["loss"], float) and math.isfinite(s["loss"])


def test_the_sampler_records_a_host_memory_timeline(accum: RunData) -> None:
    assert len(accum.samples) >= 1
    assert all(r > 0 for r in accum.samples.host_rss)
    assert set(accum.samples.allocated) == {None}
    assert set(accum.samples.device_used) == {None}


def test_environment_says_cpu(accum: RunData) -> None:
    import torch
    import transformers

    env = accum.environment
    assert env["device"] == "cpu"
    assert env["gpu_name"] is None and env["gpu_total_bytes"] is None
    assert env["torch"] == torch.__version__ and env["transformers"] == transformers.__version__
    assert env["host_total_bytes"] > 0 and env["world_size"] == 1


# -- the other architectures train -------------------------------------------------------------------


@pytest.mark.parametrize(("key", "model"), [("t5", "tiny/blip2-t5"), ("vqa", "tiny/blip-vqa")])
def test_t5_and_vqa_tiny_models_train(runs: dict[str, Any], tiny_facts: dict[str, Any], key: str, model: str) -> None:
    fin, run = finished(runs, key)
    facts = tiny_facts[model]
    assert run.status == "ok"
    assert run.config["model"]["id"] == model
    assert [s["step"] for s in run.steps] == list(range(schedule(run.config).total_steps)) == [0, 1]
    assert all(math.isfinite(s["loss"]) for s in run.steps)
    assert {p["params"] for p in run.phases} == {facts.params_bytes}
    assert by_phase(run) == [(s, 0, ph) for s in range(2) for ph in PHASES]
    for p in run.phases:
        assert (p["acts"] > 0) == (p["phase"] == "after_fwd")
        assert p["grads"] == (facts.params_bytes if p["phase"] in ("after_bwd", "after_opt_step") else 0)
    assert [p["optim"] for p in run.phases if p["step"] == 0][:3] == [0, 0, 0]
    assert all(p["optim"] == facts.adamw_state_bytes for p in run.phases[3:])


# -- load and generate jobs ------------------------------------------------------------------------


def test_load_job_records_load_time_and_parameter_bytes(runs: dict[str, Any], tiny_facts: dict[str, Any]) -> None:
    fin, run = finished(runs, "load")
    expected = tiny_facts["tiny/blip2-opt"].params_bytes
    assert run.status == "ok"
    assert run.load is not None
    assert isinstance(run.load["seconds"], float) and run.load["seconds"] > 0
    assert run.load["params_bytes"] == expected
    assert run.load["placement"] == {"cpu": expected}
    assert run.load["weights"] == "random"
    assert run.phases == [] and run.steps == [] and run.generate == []
    summary = run.summary()
    assert summary["load"] == {"seconds": run.load["seconds"], "params_bytes": expected, "placement": {"cpu": expected}}


def test_generate_job_records_load_and_each_generate_call(runs: dict[str, Any], tiny_facts: dict[str, Any]) -> None:
    fin, run = finished(runs, "generate")
    expected = tiny_facts["tiny/blip-vqa"].params_bytes
    assert run.status == "ok"
    assert run.load is not None and run.load["seconds"] > 0 and run.load["params_bytes"] == expected
    assert [g["call"] for g in run.generate] == [0, 1, 2]
    for g in run.generate:
        assert g["seconds"] > 0 and g["batch_size"] == 2 and g["new_tokens"] > 0
        assert g["peak"] is None and g["host_rss"] > 0
    assert run.phases == [] and run.steps == []


# -- show and compare on real runs ----------------------------------------------------------------

SUMMARY_KEYS = {
    "format_version",
    "name",
    "status",
    "config",
    "environment",
    "load",
    "phases",
    "steps",
    "peaks",
    "oom",
    "exit",
    "modules",  # optional in DESIGN; every run with runtime.module_depth > 0 (the default) has it
}
MODULE_KEYS = {"step", "micro_step", "rank", "phase", "module", "params", "grads", "optim", "acts"}
ENV_KEYS = {"device", "gpu_name", "gpu_total_bytes", "host_total_bytes", "torch", "transformers", "world_size"}
PHASE_KEYS = {"step", "micro_step", "rank", "phase", "t", "params", "grads", "optim", "acts", "other", "allocated",
              "peak", "reserved", "host_rss"}  # fmt: skip
STEP_KEYS = {"step", "seconds", "loss", "samples_per_s"}
PEAK_KEYS = {"allocated", "reserved", "device_used", "host_rss"}


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def test_show_json_has_exactly_the_design_summary(runs: dict[str, Any], run_cli: Any) -> None:
    fin, _ = finished(runs, "accum")
    res = run_cli("show", fin.run_dir, "--json")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert set(s) == SUMMARY_KEYS
    assert s["format_version"] == 1 and s["name"] == "seed-lab/accum 3" and s["status"] == "ok"
    assert isinstance(s["config"], dict) and s["config"]["train"]["accumulate_grad_batches"] == 3
    env = s["environment"]
    assert set(env) == ENV_KEYS
    assert env["device"] == "cpu" and env["gpu_name"] is None and env["gpu_total_bytes"] is None
    assert is_int(env["host_total_bytes"]) and is_int(env["world_size"])
    assert isinstance(env["torch"], str) and isinstance(env["transformers"], str)
    load = s["load"]
    assert set(load) == {"seconds", "params_bytes", "placement"}
    assert isinstance(load["seconds"], float) and is_int(load["params_bytes"])
    assert all(is_int(v) for v in load["placement"].values())
    assert len(s["phases"]) == 20
    for p in s["phases"]:
        assert set(p) == PHASE_KEYS
        assert p["phase"] in PHASES and isinstance(p["t"], float)
        assert all(is_int(p[k]) for k in ("step", "micro_step", "rank", "params", "grads", "optim", "acts", "host_rss"))
        assert p["other"] is None and p["allocated"] is None and p["peak"] is None and p["reserved"] is None
    assert len(s["steps"]) == 2
    for st in s["steps"]:
        assert set(st) == STEP_KEYS
        assert is_int(st["step"]) and isinstance(st["seconds"], float) and isinstance(st["samples_per_s"], float)
        assert isinstance(st["loss"], float)
    assert set(s["peaks"]) == PEAK_KEYS
    assert s["peaks"]["allocated"] is None and s["peaks"]["reserved"] is None and s["peaks"]["device_used"] is None
    assert is_int(s["peaks"]["host_rss"]) and s["peaks"]["host_rss"] > 0
    assert s["oom"] is None
    # Per-module rows: each boundary's root ("") equals its phase record's four categories (issue 12).
    assert s["modules"] and all(set(m) == MODULE_KEYS for m in s["modules"])
    phases = {(p["step"], p["micro_step"], p["phase"]): p for p in s["phases"]}
    roots = [m for m in s["modules"] if m["module"] == ""]
    assert {(m["step"], m["micro_step"], m["phase"]) for m in roots} == set(phases)  # steps 0 and 1: in full
    for m in roots:
        p = phases[(m["step"], m["micro_step"], m["phase"])]
        assert [m[k] for k in ("params", "grads", "optim", "acts")] == [
            p[k] for k in ("params", "grads", "optim", "acts")
        ]
    assert s["exit"] == {"code": 0, "signal": None}


def test_show_text_summary(runs: dict[str, Any], run_cli: Any) -> None:
    fin, _ = finished(runs, "accum")
    res = run_cli("show", fin.run_dir)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "[ok]" in out and "finished (exit 0)" in out
    assert "batch 2 x accumulate 3" in out
    assert "random weights" in out
    for phase in PHASES:
        assert phase in out
    assert "warning" not in out and res.stderr == ""


def test_compare_in_all_four_formats(runs: dict[str, Any], run_cli: Any) -> None:
    dirs = [finished(runs, k)[0].run_dir for k in ("accum", "t5", "vqa")]
    names = ["seed-lab/accum 3", "tiny/blip2-t5", "tiny/blip-vqa"]

    table = run_cli("compare", *dirs)
    assert table.returncode == 0, table.stderr
    assert all(n in table.stdout for n in names)
    assert "peak host RSS" in table.stdout and "step time (median)" in table.stdout

    md = run_cli("compare", *dirs, "--format", "markdown")
    assert md.returncode == 0, md.stderr
    lines = md.stdout.splitlines()
    assert lines[0] == "| " + " | ".join(["", *names]) + " |"
    assert lines[1] == "|---|---|---|---|"
    assert any(line.startswith("| params @ peak phase |") for line in lines)

    raw = run_cli("compare", *dirs, "--format", "csv")
    assert raw.returncode == 0, raw.stderr
    rows = list(csv.reader(io.StringIO(raw.stdout)))
    assert rows[0] == ["metric", *names]
    by_label = {r[0]: r[1:] for r in rows[1:]}
    assert by_label["status"] == ["ok", "ok", "ok"]
    assert by_label["steps"] == ["2", "2", "2"]
    assert by_label["peak allocated"] == ["", "", ""]  # not measured on the CPU: empty, not zero

    js = run_cli("compare", *dirs, "--format", "json")
    assert js.returncode == 0, js.stderr
    data = json.loads(js.stdout)
    assert [r["name"] for r in data["runs"]] == names
    assert [Path(r["path"]) for r in data["runs"]] == dirs
    rows_js = {r["label"]: r for r in data["rows"]}
    assert rows_js["peak host RSS"]["kind"] == "bytes" and all(is_int(v) for v in rows_js["peak host RSS"]["values"])
    assert rows_js["peak allocated"]["values"] == [None, None, None]
    assert rows_js["steps"]["values"] == [2, 2, 2]
