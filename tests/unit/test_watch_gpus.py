"""``blipmon watch`` on GPUs: only the command's GPUs are summed, each with its capacity; containers and refusals said.

NVML is the fake of ``fake_nvml``: four GPUs in NVML's order, other users' jobs on three of them, and the
watched command's process (a real child of this test, so it is in the tree ``Watch`` scans) listed on one.
Every expected figure is the one the fake devices were given.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fake_nvml as fk
import pytest
from support import PATIENCE_S, read_events, subprocess_env

from blipmon.core.run import load_run
from blipmon.runner.watch import Watch

GIB = 1024**3
MIB = 1024**2
OTHERS = 5_000_000  # other users' processes (PIDs beyond pid_max: never in the tree)


@pytest.fixture
def child() -> Iterator[int]:
    """A real process under this one: what ``Watch`` sees as the command's tree."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        yield proc.pid
    finally:
        proc.communicate(b"")


def host(child: int) -> list[fk.FakeGpu]:
    """Four GPUs: others' jobs on 0, 2 and 3 (20 GiB each); the command's process on GPU 1 (3 GiB of 5 GiB used)."""
    gpus = [
        fk.FakeGpu(uuid=fk.uuid(i), total=(80 + i) * GIB, used=20 * GIB, procs=[fk.Proc(OTHERS + i, 20 * GIB)])
        for i in range(4)
    ]
    gpus[1].used = 5 * GIB
    gpus[1].procs = [fk.Proc(OTHERS + 1, 2 * GIB), fk.Proc(child, 3 * GIB)]
    return gpus


def watch(tmp_path: Path, gpus: list[fk.FakeGpu], *, own_ns: bool = False) -> Watch:
    w = Watch(["true"], tmp_path / "run", 10, {"name": "watch/t", "runtime": {"sample_hz": 10}},
              gpu_module=fk.make(gpus), own_pid_namespace=own_ns)  # fmt: skip
    w._start_record()
    return w


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    (tmp_path / "run").mkdir()
    return tmp_path / "run"


def events(w: Watch) -> list[dict[str, Any]]:
    w.writer.close()
    return read_events(w.run_dir / "events.jsonl")


def notes(evs: list[dict[str, Any]]) -> list[str]:
    return [e["message"] for e in evs if e["type"] == "note"]


def test_only_the_gpu_holding_the_command_is_summed(tmp_path: Path, run_dir: Path, child: int) -> None:
    gpus = host(child)
    w = watch(tmp_path, gpus)
    flat, tree = w.sample()
    assert flat["dev"] == 5 * GIB  # GPU 1's used memory, not 65 GiB over the host
    assert flat["proc_gpu"] == 3 * GIB
    assert tree["gpus"] == {"GPU 1": {"used": 5 * GIB, "total": 81 * GIB}}
    assert tree["gpu"] == {str(child): 3 * GIB}
    assert tree["devs"] == [20 * GIB, 5 * GIB, 20 * GIB, 20 * GIB]
    envs = [e for e in events(w) if e["type"] == "environment"]
    # At the start of a four-GPU host the command's GPU is not known; once seen, the environment names it.
    assert envs[0]["gpu_total_bytes"] is None and envs[0]["command_gpus"] == []
    assert envs[-1]["gpu_total_bytes"] == 81 * GIB and envs[-1]["command_gpus"] == ["GPU 1"]
    assert [g["total_bytes"] for g in envs[-1]["gpus"]] == [80 * GIB, 81 * GIB, 82 * GIB, 83 * GIB]


def test_a_second_gpu_joins_the_sum_and_the_capacity(tmp_path: Path, run_dir: Path, child: int) -> None:
    gpus = host(child)
    w = watch(tmp_path, gpus)
    w.sample()
    gpus[3].procs = [fk.Proc(child, 1 * GIB)]
    gpus[3].used = 7 * GIB
    flat, tree = w.sample()
    assert flat["dev"] == 5 * GIB + 7 * GIB and flat["proc_gpu"] == 4 * GIB
    assert tree["gpus"] == {
        "GPU 1": {"used": 5 * GIB, "total": 81 * GIB},
        "GPU 3": {"used": 7 * GIB, "total": 83 * GIB},
    }
    env = [e for e in events(w) if e["type"] == "environment"][-1]
    assert env["gpu_total_bytes"] == 81 * GIB + 83 * GIB
    assert env["gpu_name"] == "2 x NVIDIA H100 80GB HBM3"


def test_before_the_command_uses_a_gpu(tmp_path: Path, run_dir: Path, child: int) -> None:
    gpus = host(child)
    gpus[1].procs = [fk.Proc(OTHERS + 1, 2 * GIB)]
    w = watch(tmp_path, gpus)
    flat, tree = w.sample()
    assert "dev" not in flat and "gpus" not in tree  # no GPU of the command's to measure
    assert flat["proc_gpu"] == 0  # on the host every list answered: it truly holds none


def test_in_a_container_host_pids_make_own_memory_unknown(tmp_path: Path, run_dir: Path, child: int) -> None:
    gpus = host(OTHERS + 99)  # the command's process is listed under its host PID
    w = watch(tmp_path, gpus, own_ns=True)
    flat, _ = w.sample()
    assert "proc_gpu" not in flat  # unknown, not 0 B
    assert flat["dev"] == 65 * GIB  # every GPU the container sees: no way to tell which the command uses
    evs = events(w)
    assert sum("PID namespace of its own" in n for n in notes(evs)) == 1
    assert next(e for e in evs if e["type"] == "environment")["gpu_total_bytes"] == (80 + 81 + 82 + 83) * GIB


def test_in_a_container_cuda_visible_devices_names_the_gpus(
    tmp_path: Path, run_dir: Path, child: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    w = watch(tmp_path, host(OTHERS + 99), own_ns=True)
    flat, tree = w.sample()
    assert flat["dev"] == 20 * GIB and tree["gpus"] == {"GPU 2": {"used": 20 * GIB, "total": 82 * GIB}}


def test_a_refused_process_query_is_noted_not_swallowed(tmp_path: Path, run_dir: Path, child: int) -> None:
    gpus = host(child)
    for g in gpus:
        g.fail["nvmlDeviceGetComputeRunningProcesses"] = fk.NVML_ERROR_NOT_SUPPORTED
    w = watch(tmp_path, gpus)
    for _ in range(3):
        flat, _ = w.sample()
        assert "proc_gpu" not in flat and "dev" not in flat
    w._final_notes()
    said = notes(events(w))
    assert sum("nvmlDeviceGetComputeRunningProcesses failed for GPU 1" in n for n in said) == 1
    assert any("not found in NVML's process lists" in n for n in said)


def test_withheld_process_memory_is_unknown_with_a_note(tmp_path: Path, run_dir: Path, child: int) -> None:
    gpus = host(child)
    gpus[1].procs = [fk.Proc(child, None)]
    w = watch(tmp_path, gpus)
    flat, _ = w.sample()
    assert "proc_gpu" not in flat and flat["dev"] == 5 * GIB  # the GPU is still known to be the command's
    assert sum("withholds their memory" in n for n in notes(events(w))) == 1


def test_a_failing_memory_query_costs_only_that_gpu(tmp_path: Path, run_dir: Path, child: int) -> None:
    gpus = host(child)
    gpus[1].fail["nvmlDeviceGetMemoryInfo"] = fk.NVML_ERROR_NO_PERMISSION
    w = watch(tmp_path, gpus)  # capacity read at start fails too: unknown, not a crash
    flat, tree = w.sample()
    assert "dev" not in flat and flat["proc_gpu"] == 3 * GIB and flat["rss"] > 0
    assert tree["gpus"] == {"GPU 1": {"used": None, "total": None}}
    assert sum("nvmlDeviceGetMemoryInfo failed for GPU 1" in n for n in notes(events(w))) == 1


def test_mig_devices_are_the_units(tmp_path: Path, run_dir: Path, child: int) -> None:
    migs = [fk.FakeGpu(uuid=fk.mig_uuid(j), total=(10 + j) * GIB, used=(j + 1) * GIB) for j in range(2)]
    migs[1].procs = [fk.Proc(child, 512 * MIB)]
    gpus = [fk.FakeGpu(uuid=fk.uuid(0), total=80 * GIB, used=0, migs=migs)]
    w = watch(tmp_path, gpus)
    flat, tree = w.sample()
    assert flat["dev"] == 2 * GIB and flat["proc_gpu"] == 512 * MIB
    assert tree["gpus"] == {"GPU 0 MIG 1": {"used": 2 * GIB, "total": 11 * GIB}}
    assert not any("failed" in n for n in notes(events(w)))  # the MIG parent's refusals are never asked


# -- end to end: a real ``Watch.run`` in its own process, then ``show`` ----------------------------------------
DRIVER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import psutil
    sys.path.insert(0, sys.argv[2])
    import fake_nvml as fk
    from blipmon.runner.watch import Watch
    from blipmon.core.profile import write_config

    GIB = 1024**3
    me = psutil.Process()

    def the_tree():  # the command's processes, listed live as NVML would on the host
        return [fk.Proc(p.pid, 3 * GIB) for p in me.children(recursive=True)]

    gpus = [fk.FakeGpu(uuid=fk.uuid(i), total=(80 + i) * GIB, used=20 * GIB, procs=[fk.Proc(5_000_000 + i, 20 * GIB)])
            for i in range(4)]
    gpus[2].used, gpus[2].procs = 6 * GIB, the_tree
    run_dir = Path(sys.argv[1])
    run_dir.mkdir()
    config = {"name": "watch/e2e", "description": "", "runtime": {"sample_hz": 50}}
    write_config(run_dir, config)
    cmd = [sys.executable, "-c", "import time; time.sleep(0.5)"]
    sys.exit(Watch(cmd, run_dir, 50, config, gpu_module=fk.make(gpus), own_pid_namespace=False).run())
    """
)


def test_show_presents_the_commands_gpu_against_its_capacity(tmp_path: Path, blipmon_cache: Path) -> None:
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(run_dir), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=PATIENCE_S, env=subprocess_env(blipmon_cache),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "peak GPU 3.00 GiB" in done.stderr and "device used peaked at 6.00 GiB of 82.00 GiB on GPU 2" in done.stderr
    summary = load_run(run_dir).summary()
    assert summary["peaks"]["device_used"] == 6 * GIB  # GPU 2's, not the host's 66 GiB
    assert summary["environment"]["gpu_total_bytes"] == 82 * GIB
    assert summary["environment"]["device"] == "cuda"
    shown = subprocess.run(
        [sys.executable, "-m", "blipmon", "show", str(run_dir)],
        capture_output=True, text=True, timeout=PATIENCE_S, env=subprocess_env(blipmon_cache),
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "82.00 GiB" in shown.stdout and "device used 6.00 GiB" in shown.stdout
    js = json.loads(
        subprocess.run(
            [sys.executable, "-m", "blipmon", "show", "--json", str(run_dir)],
            capture_output=True, text=True, timeout=PATIENCE_S, env=subprocess_env(blipmon_cache),
        ).stdout
    )  # fmt: skip
    assert set(js) >= {"format_version", "name", "status", "config", "environment", "load", "phases", "steps",
                       "peaks", "oom", "exit"}  # fmt: skip
