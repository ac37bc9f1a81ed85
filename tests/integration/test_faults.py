"""Faults, with real processes: signals, out of memory, a failing job, bad input, broken profiles.

Every ``blipmon run`` here is a real subprocess whose child trains a tiny model; nothing in blipmon
is mocked. Exit codes are blipmon run's (core/outcomes.py, docs/profile-format.md): 0 finished, 1 the job raised, 2 usage or configuration
(nothing started), 3 out of memory (recorded), 4 stopped or killed.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from blipmon.core.config import resolve
from blipmon.core.layout import EVENTS
from blipmon.core.run import RunData
from blipmon.runner.launch import make_run_dir, run_dir_name

FOREVER = ("train.num_train_samples=1000000", "train.batch_size=2")  # runs until a test ends it

OOM_HEADROOM = 512 * 2**20  # address space the OOM run's child may still take once it has loaded
# 512 x (3x128x128 pixels + 108 tokens): the first forward needs ~1 GiB of activations, twice the
# headroom, so it fails in its first forward; the batch itself (~100 MiB, collated) fits.
OOM_RUN = ("train.batch_size=512", "train.num_train_samples=512", "data.max_length=100", "train.max_epochs=1")


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


def phases_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("type") == "phase"]


class AddressSpaceCap(threading.Thread):
    """Caps a run's child at its size once loaded plus ``OOM_HEADROOM``, from outside, with prlimit(2).

    The run can then never take more than that much more memory (safe on any machine), and no code
    of the recorder is touched: its allocations really fail. The cap goes on as soon as the ``load``
    record appears; the child still builds a 512-sample batch before its first forward, so the cap is
    in place before the big allocations (``events_at_cap`` lets the test check that it was).
    """

    def __init__(self, rp: Any) -> None:
        super().__init__(daemon=True)
        self.rp = rp
        self.events_at_cap: list[dict[str, Any]] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            events = self.rp.wait_for_record("load")
            pid = int(events[0]["pid"])
            limit = psutil.Process(pid).memory_info().vms + OOM_HEADROOM
            resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))
            self.events_at_cap = self.rp.events()
        except BaseException as e:  # reported by the test
            self.error = e


@pytest.fixture(scope="module")
def fault_runs(start_run: Any) -> Iterator[dict[str, Any]]:
    """Every faulty run of this module, started together so their children load at the same time."""
    runs = {
        "sigkill-child": start_run("tiny/blip2-opt", *FOREVER),
        "sigterm-child": start_run("tiny/blip2-opt", *FOREVER),
        "sigterm-parent": start_run("tiny/blip2-opt", *FOREVER),
        "parent-killed": start_run("tiny/blip2-opt", "train.num_train_samples=24"),  # batch 4: six steps
        "error": start_run("tiny/blip2-opt", "train.lora.enabled=true", 'train.lora.target_modules=["no_such_module"]'),
        "oom": start_run("tiny/blip2-opt", *OOM_RUN, fast=False),
    }
    runs["oom-cap"] = AddressSpaceCap(runs["oom"])
    runs["oom-cap"].start()
    # The parent is killed as soon as its child is up (still importing torch: long before it can finish).
    runs["parent-killed"].wait_for_record("header")
    runs["parent-killed"].proc.kill()
    yield runs
    for key, rp in runs.items():  # what a failed test left running: the endless runs above all
        if key != "oom-cap":
            rp.kill()


# -- signals ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkilled_child_is_killed_with_its_phases_kept(fault_runs: dict[str, Any]) -> None:
    rp = fault_runs["sigkill-child"]
    seen = phases_of(rp.wait_for(lambda evs: len(phases_of(evs)) >= 8))
    os.kill(rp.child_pid(), signal.SIGKILL)
    fin = rp.finish()
    assert fin.returncode == 4
    no_traceback(fin.stderr)
    run = fin.run()
    assert run.status == "killed"
    assert run.exit is not None and run.exit["signal"] == "SIGKILL" and run.exit["code"] is None
    assert run.end is None  # the child never got to write one: the parent's exit record says what happened
    assert len(run.phases) >= len(seen)
    assert run.phases[: len(seen)] == seen
    assert run.summary()["status"] == "killed"
    assert run.summary()["exit"] == {"code": None, "signal": "SIGKILL"}


@pytest.mark.slow
def test_sigterm_to_the_child_stops_it_with_status_stopped_and_exit_4(fault_runs: dict[str, Any]) -> None:
    rp = fault_runs["sigterm-child"]
    seen = phases_of(rp.wait_for(lambda evs: len(phases_of(evs)) >= 4))
    os.kill(rp.child_pid(), signal.SIGTERM)
    fin = rp.finish()
    assert fin.returncode == 4
    no_traceback(fin.stderr)
    run = fin.run()
    assert run.status == "stopped"
    assert run.end == {**run.end, "status": "stopped", "code": 4}
    assert run.exit == {**run.exit, "code": 4, "signal": None}
    assert "stopped by SIGTERM" in run.notes
    assert run.phases[: len(seen)] == seen
    assert run.error is None and run.oom is None


@pytest.mark.slow
def test_sigterm_to_blipmon_run_stops_the_child_and_records_it(fault_runs: dict[str, Any]) -> None:
    """A scheduler or ``timeout`` stopping the headless parent must not leave the child training."""
    rp = fault_runs["sigterm-parent"]
    rp.wait_for_record("phase")
    child = rp.child_pid()
    rp.proc.send_signal(signal.SIGTERM)
    fin = rp.finish()
    rp.wait_child_exited()
    assert fin.returncode == 4
    no_traceback(fin.stderr)
    run = fin.run()
    assert run.status == "stopped"
    assert run.end is not None and run.end["status"] == "stopped"
    assert run.exit is not None and run.exit["code"] == 4
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
def test_parent_sigkilled_while_the_child_finishes_and_saves_its_run(fault_runs: dict[str, Any], load_run: Any) -> None:
    rp = fault_runs["parent-killed"]
    fin = rp.finish()
    assert fin.returncode == -signal.SIGKILL
    rp.wait_child_exited()
    run = load_run(fin.run_dir)
    assert run.exit is None  # nobody was left to append it ...
    assert run.end == {**run.end, "status": "ok", "code": 0}  # ... so the status is the child's own
    assert run.status == "ok"
    assert len(run.steps) == run.plan["total_steps"] == 6
    assert run.summary()["exit"] == {"code": None, "signal": None}


# -- the job fails -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_job_that_raises_gives_status_error_and_exit_1(fault_runs: dict[str, Any], run_cli: Any) -> None:
    fin = fault_runs["error"].finish()
    assert fin.returncode == 1
    no_traceback(fin.stderr)  # the traceback is in the profile and child.log, not on the user's terminal
    run = fin.run()
    assert run.status == "error"
    assert run.error is not None and "no_such_module" in run.error["message"]
    assert "Traceback" in run.error["traceback"]
    assert run.end == {**run.end, "status": "error", "code": 1}
    show = run_cli("show", fin.run_dir)
    assert show.returncode == 0 and "failed with an error" in show.stdout and "no_such_module" in show.stdout


# -- out of memory on the host ---------------------------------------------------------------------


@pytest.mark.slow
def test_host_oom_in_the_child_is_recorded_as_oom_with_step_and_phase(fault_runs: dict[str, Any], run_cli: Any) -> None:
    rp, cap = fault_runs["oom"], fault_runs["oom-cap"]
    fin = rp.finish()
    cap.join(timeout=60)
    assert cap.error is None, cap.error
    assert cap.events_at_cap is not None and not phases_of(cap.events_at_cap)  # capped before training began
    run = fin.run()
    assert run.status == "oom", run.error
    assert fin.returncode == 3
    no_traceback(fin.stderr)
    assert run.oom is not None
    assert run.oom["step"] == 0 and run.oom["micro_step"] == 0
    assert run.oom["phase"] in ("forward", "backward")
    assert isinstance(run.oom["requested_bytes"], int) and run.oom["requested_bytes"] > 0
    assert "allocate" in run.oom["message"]
    assert run.end == {**run.end, "status": "oom", "code": 3}
    summary = run.summary()
    assert summary["oom"]["step"] == 0 and summary["oom"]["requested_bytes"] == run.oom["requested_bytes"]
    show = run_cli("show", fin.run_dir)
    assert "OUT OF MEMORY at step 0" in show.stdout


# -- bad input: exit 2 before anything starts -------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["tiny/blip2-opt", "--set", "train.batchsize=4"], ["unknown key 'train.batchsize'", "'train.batch_size'"]),
        (["tiny/blip2-opt", "--set", "trian.batch_size=4"], ["unknown key 'trian.batch_size'", "'train.batch_size'"]),
        (
            ["tiny/blip2-opt", "--set", "train.precision=bf16"],
            [
                "train.precision = 'bf16'",
                "'32-true', 'bf16-true', 'bf16-mixed', '16-mixed'",
                "did you mean 'bf16-true'",
            ],
        ),
        (["tiny/blip2-opt", "--set", "train.batch_size=0"], ["train.batch_size = 0", "an integer >= 1"]),
        (["tiny/blip2-opt", "--set", "train.act_ckpt=yes"], ["train.act_ckpt = 'yes'", "true/false"]),
        (["tiny/blip2-opt", "--set", "train.batch_size"], ["expected KEY=VALUE"]),
        (["tiny/blip2-opt", "--set", "name=../../escaped"], ["name = '../../escaped'", "no '..'"]),
        (["tiny/blip2-op"], ["neither a preset, a TOML file nor a run directory", "tiny/blip2-opt"]),
        (["no/such.toml"], ["no/such.toml", "no such configuration file"]),
        (["tiny/blip2-opt", "--set", "model.id=tiny/nope"], ["model.id = 'tiny/nope'", "tiny/blip2-opt"]),
    ],
)
def test_bad_configuration_exits_2_naming_the_problem_without_traceback(
    run_cli: Any, tmp_path: Path, args: list[str], says: list[str]
) -> None:
    out = tmp_path / "out"
    res = run_cli("run", *args, "--out", out)
    assert res.returncode == 2
    no_traceback(res.stderr)
    for text in says:
        assert text in res.stderr
    assert res.stdout == ""
    assert not out.exists()  # nothing was started or created


def test_toml_syntax_error_names_the_file_and_line(run_cli: Any, tmp_path: Path) -> None:
    bad = tmp_path / "lab.toml"
    bad.write_text('[train]\nbatch_size = 4\nprecision = "32-true\n')
    res = run_cli("run", bad, "--out", tmp_path / "out")
    assert res.returncode == 2
    no_traceback(res.stderr)
    assert str(bad) in res.stderr and "line 3" in res.stderr


def test_gpu_only_preset_on_a_cpu_machine_exits_2_before_loading_and_says_how_to_run_on_cpu(
    run_cli: Any, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    res = run_cli("run", "h100/baseline", "--out", out)  # run_cli hides any GPU: CUDA_VISIBLE_DEVICES=""
    assert res.returncode == 2
    no_traceback(res.stderr)
    assert "needs an NVIDIA GPU" in res.stderr
    assert "model.device_map = 'cuda'" in res.stderr
    assert "--set model.device_map=cpu" in res.stderr
    assert not out.exists()


@pytest.mark.parametrize("preset", ["h100/deepspeed-offload", "a100/deepspeed-offload"])
def test_gpu_offload_presets_without_a_gpu_exit_2_with_a_plain_message(
    run_cli: Any, tmp_path: Path, preset: str
) -> None:
    out = tmp_path / "out"
    res = run_cli("run", preset, "--out", out)
    assert res.returncode == 2
    no_traceback(res.stderr)
    # One plain line: DeepSpeed is installed (the test extra), so what is missing is the GPU the device map names.
    assert res.stderr.startswith("blipmon: ") and res.stderr.count("\n") == 1
    assert "needs an NVIDIA GPU" in res.stderr and "model.device_map = 'cuda'" in res.stderr
    assert "--set model.device_map=cpu" in res.stderr
    assert not out.exists()


def test_out_that_cannot_be_a_folder_exits_2(run_cli: Any, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    res = run_cli("run", "tiny/blip2-opt", "--out", not_a_dir)
    assert res.returncode == 2
    no_traceback(res.stderr)
    assert f"--out {not_a_dir}" in res.stderr and "cannot create the run directory" in res.stderr


# -- run directory names cannot escape the profiles folder -------------------------------------------

NASTY_NAMES = ["../../etc/passwd", "..", ".", "/abs/olute", "a/../../b", "..\\..\\win", "~/home", "", " ", "-", "x" * 500,
               "name\x00with-nul", "\n", "évaluation", "a//b"]  # fmt: skip


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_run_directory_names_cannot_escape_the_profiles_folder(tmp_path: Path, name: str) -> None:
    flat = run_dir_name({"name": name})
    assert "/" not in flat and "\\" not in flat and "\x00" not in flat and "\n" not in flat
    assert not flat.startswith(".") and len(flat) <= 120
    root = tmp_path / "profiles"
    made = make_run_dir({"name": name}, root)
    assert made.parent.resolve() == root.resolve()
    assert made.is_dir()


def test_runs_with_the_same_name_in_the_same_second_get_their_own_folders(tmp_path: Path) -> None:
    made = {make_run_dir({"name": "same"}, tmp_path) for _ in range(5)}
    assert len(made) == 5 and all(p.parent == tmp_path for p in made)


# -- show refuses broken profiles with a message, exit 2 -------------------------------------------

HEADER = {"type": "header", "t": 0.0, "format_version": 1, "name": "r", "pid": 1, "hostname": "elsewhere"}


def write_lines(run_dir: Path, *lines: str | bytes) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / EVENTS, "wb") as fh:
        for line in lines:
            fh.write(line if isinstance(line, bytes) else line.encode())
    return run_dir


def rec(d: dict[str, Any]) -> str:
    return json.dumps(d) + "\n"


BROKEN = {
    "missing": (lambda p: p / "nope", "no such run directory"),
    "a file": (lambda p: (p / "f.txt", (p / "f.txt").write_text("x"))[0], "not a directory"),
    "unrelated directory": (lambda p: ((p / "u").mkdir(), (p / "u" / "notes.md").write_text("hi"), p / "u")[2], "not a blipmon run"),
    "empty events": (lambda p: write_lines(p / "e"), "recorded nothing yet"),
    "only a half-written header": (lambda p: write_lines(p / "h", rec(HEADER)[:20]), "recorded nothing readable yet"),
    "newer format": (lambda p: write_lines(p / "v", rec({**HEADER, "format_version": 99})), "newer than this blipmon reads"),
    "not a header first": (lambda p: write_lines(p / "s", rec({"type": "sample", "t": 1.0, "rss": 5})), "not a blipmon profile"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN))
def test_show_on_a_broken_profile_exits_2_with_a_clear_message(run_cli: Any, tmp_path: Path, case: str) -> None:
    make, says = BROKEN[case]
    target = make(tmp_path)
    for args in (["show", target], ["show", target, "--json"], ["compare", target, target]):
        res = run_cli(*args)
        assert res.returncode == 2, (args, res.stderr)
        no_traceback(res.stderr)
        assert says in res.stderr
        assert res.stderr.startswith("blipmon: ")


def test_show_skips_a_corrupt_line_with_a_warning_naming_it(run_cli: Any, tmp_path: Path) -> None:
    d = write_lines(
        tmp_path / "c",
        rec(HEADER),
        rec({"type": "step", "t": 1.0, "step": 0, "seconds": 1.0, "loss": 2.0, "samples_per_s": 4.0}),
        '{"type": "step", "t": 2.0, "st\n',
        rec({"type": "step", "t": 3.0, "step": 1, "seconds": 1.0, "loss": 1.0, "samples_per_s": 4.0}),
        rec({"type": "end", "t": 4.0, "status": "ok", "code": 0}),
        '{"type": "half',  # not written yet: no warning for this one
    )
    res = run_cli("show", d, "--json")
    assert res.returncode == 0, res.stderr
    assert "line 3 is corrupt and was skipped" in res.stderr
    assert "line 6" not in res.stderr
    summary = json.loads(res.stdout)
    assert [s["step"] for s in summary["steps"]] == [0, 1]
    assert summary["status"] == "ok"


def test_resolved_config_of_a_toml_file_with_overrides(tmp_path: Path) -> None:
    """The same resolution ``blipmon run`` does, on a file: table keys, --set on top, validated."""
    f = tmp_path / "my lab (v2).toml"
    f.write_text('[model]\nid = "tiny/blip-vqa"\n[train]\nbatch_size = 4\nlora = { enabled = true, r = 4 }\n')
    cfg = resolve(str(f), ["train.lora.alpha=8", "train.act_ckpt=true"])
    assert cfg["name"] == "my lab -v2"
    assert cfg["train"]["lora"] == {**cfg["train"]["lora"], "enabled": True, "r": 4, "alpha": 8.0}
    assert cfg["train"]["act_ckpt"] is True and cfg["train"]["batch_size"] == 4


def test_summary_of_a_killed_run_read_back(tmp_path: Path) -> None:
    """A profile cut mid-line by SIGKILL, then the parent's exit record: the half line is skipped."""
    from blipmon.runner.launch import append_exit

    d = write_lines(tmp_path / "k", rec(HEADER), rec({"type": "phase", "t": 1.0, "step": 0, "micro_step": 0,
                    "phase": "before_fwd", "params": 10, "grads": 0, "optim": 0, "acts": 0, "host_rss": 5}),
                    '{"type":"phase","t":2.0,"st')  # fmt: skip
    append_exit(d, -signal.SIGKILL)
    from blipmon.core.run import load_run

    run: RunData = load_run(d)
    assert run.status == "killed"
    assert len(run.phases) == 1
    assert any("line 3 is corrupt" in w for w in run.warnings)
