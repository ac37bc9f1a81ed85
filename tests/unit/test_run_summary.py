"""A run as data: status from the end and exit records, peaks, and the fixed JSON summary (docs/profile-format.md)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blipmon import cli
from blipmon.core.layout import EVENTS
from blipmon.core.outcomes import RUN_STATUSES as STATUSES
from blipmon.core.run import PHASES, RunData, load_run, phase_total

GIB = 1024**3
HERE = socket.gethostname()


def header(**kw: Any) -> dict[str, Any]:
    return {"type": "header", "t": 0.0, "format_version": 1, "name": "lab/run", "pid": 1, "hostname": "elsewhere", **kw}


def phase(step: int, micro: int, name: str, **kw: Any) -> dict[str, Any]:
    base = {"type": "phase", "t": 1.0 + step, "step": step, "micro_step": micro, "rank": 0, "phase": name,
            "params": 100, "grads": 0, "optim": 0, "acts": 0, "other": None, "allocated": None, "peak": None,
            "reserved": None, "host_rss": 1000}  # fmt: skip
    return {**base, **kw}


def run_of(*events: dict[str, Any]) -> RunData:
    run = RunData()
    run.extend(list(events))
    return run


# -- status ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("end", "exit", "status"),
    [
        ({"status": "ok", "code": 0}, {"code": 0, "signal": None}, "ok"),
        ({"status": "oom", "code": 3}, {"code": 3, "signal": None}, "oom"),
        ({"status": "error", "code": 1}, {"code": 1, "signal": None}, "error"),
        ({"status": "stopped", "code": 4}, {"code": 4, "signal": None}, "stopped"),
        # the child got SIGKILL: only the parent's exit record says so
        (None, {"code": None, "signal": "SIGKILL"}, "killed"),
        # a stop signal the child could not handle (it died of it): still a stop
        (None, {"code": None, "signal": "SIGTERM"}, "stopped"),
        (None, {"code": None, "signal": "SIGINT"}, "stopped"),
        # the child wrote its end, then a late second signal finished it off: its end record wins
        ({"status": "stopped", "code": 4}, {"code": None, "signal": "SIGTERM"}, "stopped"),
        # no end record: the exit code decides
        (None, {"code": 0, "signal": None}, "ok"),
        (None, {"code": 3, "signal": None}, "oom"),
        (None, {"code": 4, "signal": None}, "stopped"),
        (None, {"code": 1, "signal": None}, "error"),
        (None, {"code": 139, "signal": None}, "error"),
        (None, {"code": None, "signal": "SIGSEGV"}, "error"),
        # the parent was killed and never wrote the exit record: the child's own end record
        ({"status": "ok", "code": 0}, None, "ok"),
        ({"status": "oom", "code": 3}, None, "oom"),
    ],
)
def test_status_from_end_and_exit_records(end: dict[str, Any] | None, exit: dict[str, Any] | None, status: str) -> None:
    events = [header()]
    if end:
        events.append({"type": "end", "t": 5.0, **end})
    if exit:
        events.append({"type": "exit", "t": None, **exit})
    run = run_of(*events)
    assert run.status == status
    assert run.finished
    assert run.summary()["status"] == status


def test_a_run_still_being_written_is_running() -> None:
    run = run_of(header(pid=1, hostname=HERE))  # pid 1 is alive on every Linux
    assert run.status == "running" and not run.finished


def test_a_run_whose_writer_died_without_an_end_record_is_killed() -> None:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    run = run_of(header(pid=dead, hostname=HERE))
    assert run.status == "killed"


def test_a_run_written_on_another_host_is_not_judged_by_local_pids() -> None:
    assert run_of(header(pid=999_999_999, hostname="another-host")).status == "running"


def test_statuses_are_the_design_ones() -> None:
    assert STATUSES == ("running", "ok", "oom", "error", "stopped", "killed")
    assert PHASES == ("before_fwd", "after_fwd", "after_bwd", "after_opt_step")


# -- folding events ----------------------------------------------------------------------------------


def test_unknown_event_kinds_and_phases_are_ignored() -> None:
    run = run_of(
        header(), {"type": "from_the_future", "t": 1.0}, phase(0, 0, "mid_backward"), phase(0, 0, "before_fwd")
    )
    assert [p["phase"] for p in run.phases] == ["before_fwd"]


def test_name_falls_back_to_config_then_directory(tmp_path: Path) -> None:
    assert run_of(header(name="a")).name == "a"
    assert (
        run_of(
            {"type": "header", "t": 0, "format_version": 1}, {"type": "config", "t": 0, "config": {"name": "b"}}
        ).name
        == "b"
    )
    r = RunData(path=tmp_path / "20260101T000000-x")
    assert r.name == "20260101T000000-x"


# -- peaks ---------------------------------------------------------------------------------------------


def test_peaks_on_cpu_are_null_except_host_rss() -> None:
    run = run_of(
        header(),
        {"type": "sample", "t": 0.5, "rss": 900},
        phase(0, 0, "after_fwd", host_rss=1500),
        {"type": "sample", "t": 1.5, "rss": 2500},
        {"type": "load", "t": 0.2, "seconds": 0.1, "params_bytes": 100, "placement": {"cpu": 100}, "peak": None,
         "host_rss": 700},
    )  # fmt: skip
    assert run.peaks() == {"allocated": None, "reserved": None, "device_used": None, "host_rss": 2500}


def test_peaks_on_cuda_take_the_allocator_peak_between_samples() -> None:
    """A spike between two samples is never missed: the per-phase allocator peak counts."""
    run = run_of(
        header(),
        {"type": "sample", "t": 0.5, "rss": 900, "alloc": 2 * GIB, "res": 3 * GIB, "dev": 4 * GIB},
        phase(0, 0, "after_fwd", allocated=3 * GIB, peak=7 * GIB, reserved=8 * GIB, other=GIB),
        {"type": "sample", "t": 1.5, "rss": 950, "alloc": 2 * GIB, "res": 8 * GIB, "dev": 9 * GIB},
        {"type": "generate", "t": 2.0, "call": 0, "seconds": 0.1, "peak": 5 * GIB, "host_rss": 960},
    )
    assert run.peaks() == {"allocated": 7 * GIB, "reserved": 8 * GIB, "device_used": 9 * GIB, "host_rss": 1000}


def test_peak_phase_and_phase_total() -> None:
    cpu = [phase(0, 0, "before_fwd"), phase(0, 0, "after_fwd", acts=50), phase(0, 0, "after_bwd", grads=100)]
    assert phase_total(cpu[1]) == 150 and phase_total(cpu[2]) == 200
    assert run_of(header(), *cpu).peak_phase() is cpu[2]
    cuda = [phase(0, 0, "after_fwd", allocated=10, peak=900), phase(0, 0, "after_bwd", allocated=800)]
    assert phase_total(cuda[0]) == 900 and phase_total(cuda[1]) == 800
    assert run_of(header()).peak_phase() is None


# -- the fixed JSON summary ------------------------------------------------------------------------

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
}


def full_run() -> RunData:
    return run_of(
        header(),
        {"type": "config", "t": 0.0, "config": {"name": "lab/run", "train": {"batch_size": 2}}},
        {"type": "environment", "t": 0.1, "device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3",
         "gpu_total_bytes": 80 * GIB, "host_total_bytes": 64 * GIB, "torch": "2.13.0", "transformers": "5.23.0",
         "world_size": 1, "python": "3.11", "cuda": "12.8"},
        {"type": "load", "t": 1.0, "seconds": 2.5, "params_bytes": 14 * GIB, "placement": {"cuda:0": 14 * GIB},
         "weights": "random", "peak": 14 * GIB, "host_rss": 3 * GIB},
        {"type": "plan", "t": 1.1, "total_steps": 2},
        phase(0, 0, "before_fwd", params=14 * GIB, allocated=14 * GIB, peak=14 * GIB, reserved=15 * GIB, other=0),
        phase(0, 0, "after_fwd", params=14 * GIB, acts=20 * GIB, allocated=34 * GIB, peak=40 * GIB,
              reserved=42 * GIB, other=0),
        {"type": "oom", "t": 3.0, "step": 0, "micro_step": 0, "phase": "backward", "requested_bytes": 2 * GIB,
         "message": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "allocated": 78 * GIB},
        {"type": "end", "t": 3.1, "status": "oom", "code": 3},
        {"type": "exit", "t": None, "code": 3, "signal": None, "wall": 123.0},
    )  # fmt: skip


def test_summary_has_exactly_the_design_keys() -> None:
    s = full_run().summary()
    assert set(s) == SUMMARY_KEYS
    assert set(s["environment"]) == {"device", "gpu_name", "gpu_total_bytes", "host_total_bytes", "torch",
                                     "transformers", "world_size"}  # fmt: skip
    assert set(s["load"]) == {"seconds", "params_bytes", "placement"}
    assert all(set(p) == {"step", "micro_step", "rank", "phase", "t", "params", "grads", "optim", "acts", "other",
                          "allocated", "peak", "reserved", "host_rss"} for p in s["phases"])  # fmt: skip
    assert set(s["peaks"]) == {"allocated", "reserved", "device_used", "host_rss"}
    assert set(s["oom"]) == {"step", "micro_step", "phase", "requested_bytes", "message", "module"}
    assert set(s["exit"]) == {"code", "signal"}


def test_summary_of_an_oom_run() -> None:
    s = full_run().summary()
    assert s["format_version"] == 1 and s["name"] == "lab/run" and s["status"] == "oom"
    assert s["environment"]["gpu_total_bytes"] == 80 * GIB and s["environment"]["device"] == "cuda"
    assert s["load"] == {"seconds": 2.5, "params_bytes": 14 * GIB, "placement": {"cuda:0": 14 * GIB}}
    assert s["oom"] == {"step": 0, "micro_step": 0, "phase": "backward", "requested_bytes": 2 * GIB,
                        "message": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
                        "module": None}  # fmt: skip
    assert s["peaks"]["allocated"] == 40 * GIB and s["peaks"]["reserved"] == 42 * GIB
    assert s["exit"] == {"code": 3, "signal": None}
    assert json.loads(json.dumps(s)) == s  # plain JSON: nothing that needs a custom encoder


def test_summary_of_a_run_with_almost_nothing_recorded() -> None:
    s = run_of(header(), {"type": "exit", "t": None, "code": None, "signal": "SIGKILL"}).summary()
    assert s["status"] == "killed"
    assert s["load"] is None and s["oom"] is None and s["phases"] == [] and s["steps"] == []
    assert s["environment"]["gpu_name"] is None and s["environment"]["world_size"] == 1
    assert isinstance(s["environment"]["host_total_bytes"], int)
    assert s["peaks"] == {"allocated": None, "reserved": None, "device_used": None, "host_rss": 0}
    assert s["exit"] == {"code": None, "signal": "SIGKILL"}


def test_a_phase_without_a_rank_is_rank_0() -> None:
    p = phase(0, 0, "before_fwd")
    del p["rank"]
    assert run_of(header(), p).summary()["phases"][0]["rank"] == 0


def test_show_json_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "run"
    d.mkdir()
    run = full_run()
    (d / EVENTS).write_text("".join(json.dumps(e) + "\n" for e in _events_of(run)))
    assert cli.main(["show", str(d), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == load_run(d).summary()
    assert printed["status"] == "oom"


def _events_of(run: RunData) -> list[dict[str, Any]]:
    evs: list[dict[str, Any]] = [run.header, {"type": "config", "t": 0.0, "config": run.config}, run.environment]
    evs += [x for x in (run.load, *run.phases, run.oom, run.end, run.exit) if x is not None]
    return evs


# -- other ranks' steps ------------------------------------------------------------------------------


def rank_step(rank: Any, step: Any, **kw: Any) -> dict[str, Any]:
    return {"type": "rank_step", "t": 2.0 + (step if isinstance(step, int) else 0), "rank": rank, "step": step,
            "seconds": 0.5, "loss": 1.5, "samples_per_s": 8.0, "micro_steps": 1, **kw}  # fmt: skip


def test_rank_steps_are_kept_typed_like_steps_apart_from_rank_0s_steps() -> None:
    run = run_of(
        header(world_size=2),
        {"type": "step", "t": 2.0, "step": 0, "seconds": 0.4, "loss": 1.0, "samples_per_s": 10.0},
        rank_step(1, 0, seconds=1, loss=None),
        rank_step(2, 0, samples_per_s=7),
        rank_step(1, 1),
    )
    assert [s["step"] for s in run.steps] == [0]  # rank 0's steps stay what they were
    assert [(s["rank"], s["step"]) for s in run.rank_steps] == [(1, 0), (2, 0), (1, 1)]
    first = run.rank_steps[0]
    assert first["seconds"] == 1.0 and isinstance(first["seconds"], float) and first["loss"] is None
    assert run.rank_steps[1]["samples_per_s"] == 7.0 and isinstance(run.rank_steps[0]["t"], float)
    assert run.steps_of(0) is run.steps
    assert [s["step"] for s in run.steps_of(1)] == [0, 1] and run.steps_of(3) == []


@pytest.mark.parametrize(
    "bad",
    [
        rank_step(None, 0),
        rank_step("1", 0),
        rank_step(True, 0),
        rank_step(-1, 0),
        rank_step(1.0, 0),
        rank_step(1, None),
        rank_step(1, "3"),
        rank_step(1, False),
        {"type": "rank_step", "t": 1.0},
        {"type": "rank_step", "rank": [1], "step": {"x": 1}},
    ],
)
def test_a_damaged_rank_step_is_dropped_never_a_crash(bad: dict[str, Any]) -> None:
    run = run_of(header(), bad, rank_step(1, 0))
    assert [(s["rank"], s["step"]) for s in run.rank_steps] == [(1, 0)]
    assert run.summary()["rank_steps"] == [{"rank": 1, "step": 0, "seconds": 0.5, "loss": 1.5, "samples_per_s": 8.0}]


def test_damaged_figures_of_a_rank_step_read_as_not_measured() -> None:
    run = run_of(header(), rank_step(1, 2, t="soon", seconds="fast", loss=[1], samples_per_s=True))
    (s,) = run.rank_steps
    assert (s["t"], s["seconds"], s["loss"], s["samples_per_s"]) == (None, None, None, None)
    json.dumps(run.summary(), allow_nan=False)


def test_summary_adds_rank_steps_only_for_a_run_that_has_them() -> None:
    assert "rank_steps" not in full_run().summary()  # the fixed keys, exactly, for a single-rank run
    run = run_of(header(), rank_step(1, 0), rank_step(1, 1, seconds=0.25))
    s = run.summary()
    assert set(s) == SUMMARY_KEYS | {"rank_steps"}
    assert [(r["rank"], r["step"], r["seconds"]) for r in s["rank_steps"]] == [(1, 0, 0.5), (1, 1, 0.25)]
    assert all(set(r) == {"rank", "step", "seconds", "loss", "samples_per_s"} for r in s["rank_steps"])
