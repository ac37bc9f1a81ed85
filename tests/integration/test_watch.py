"""``blipmon watch -- CMD``: a real command's process tree recorded from outside, its exit code passed on.

Every test starts ``python -m blipmon watch`` as a user would (an argument list, its own session,
no terminal on stdin) around a small Python program. The programs hold their memory until the test
says so (a release file), and the test says so only after the profile shows the memory: nothing
depends on how fast anything is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support import PATIENCE_S, read_events, subprocess_env

from blipmon.core.run import load_run
from blipmon.runner.nvml import GpuDevices
from blipmon.runner.watch import run_name

pytestmark = pytest.mark.slow

MIB = 1024 * 1024

# A parent holding 48 MiB that starts a child holding 32 MiB; both wait for the release file, then
# the parent exits 7. ``b"x" * n`` writes every page, so the bytes are resident (bytearray(n) would not be).
TREE = r"""
import os, subprocess, sys, time
release = sys.argv[1]
held = b"x" * (48 << 20)
kid = subprocess.Popen([sys.executable, "-c",
    "import os, sys, time\nheld = b'y' * (32 << 20)\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.02)",
    release])
while not os.path.exists(release):
    time.sleep(0.02)
kid.wait()
sys.exit(7)
"""

# Says it is ready, then waits; a KeyboardInterrupt (SIGINT) makes it exit 42.
INTERRUPTIBLE = r"""
import pathlib, sys, time
pathlib.Path(sys.argv[1]).write_text("ready")
try:
    while True:
        time.sleep(0.02)
except KeyboardInterrupt:
    sys.exit(42)
"""


class Watched:
    """``blipmon watch --out ROOT -- python -c PROGRAM ARGS...`` in a session of its own."""

    def __init__(self, root: Path, cache: Path, program: str, *args: str) -> None:
        self.root = root
        self.cmd = [sys.executable, "-m", "blipmon", "watch", "--out", str(root), "--", sys.executable, "-c", program]
        self.cmd += list(args)
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=subprocess_env(cache),
            start_new_session=True,
        )

    def run_dir(self) -> Path | None:
        dirs = [p for p in self.root.iterdir() if (p / "events.jsonl").is_file()] if self.root.is_dir() else []
        return dirs[0] if dirs else None

    def wait_for(self, condition: Any, what: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + PATIENCE_S
        while True:
            d = self.run_dir()
            events = read_events(d / "events.jsonl") if d else []
            if condition(events):
                return events
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out, err = self.proc.communicate()
                pytest.fail(f"gave up waiting for {what}; exit {self.proc.returncode}\n{err}")
            time.sleep(0.02)

    def finish(self) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=PATIENCE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"blipmon watch did not finish\n{err}")
        return self.proc.returncode, out, err


def _holding(tree: dict[str, Any]) -> bool:
    """Both processes seen holding their memory: one at 48 MiB or more, another at 32 MiB or more."""
    sizes = sorted(tree.get("rss", {}).values(), reverse=True)
    return len(sizes) >= 2 and sizes[0] >= 48 * MIB and sizes[1] >= 32 * MIB


def _tree_sample(events: list[dict[str, Any]]) -> bool:
    # Memory only grows until the release file appears, so this becomes true and stays true.
    return any(e.get("type") == "tree" and _holding(e) for e in events)


@pytest.fixture(scope="module")
def tree_run(tmp_path_factory: pytest.TempPathFactory, blipmon_cache: Path) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("watch")
    release = base / "release"
    w = Watched(base / "out", blipmon_cache, TREE, str(release))
    seen = w.wait_for(_tree_sample, "a sample of the whole tree")
    release.write_text("go")
    code, out, err = w.finish()
    run_dir = w.run_dir()
    assert run_dir is not None
    return {"code": code, "stdout": out, "stderr": err, "run_dir": run_dir, "seen": seen}


def test_watch_passes_the_exit_code_on_and_records_it(tree_run: dict[str, Any]) -> None:
    assert tree_run["code"] == 7, tree_run["stderr"]
    run = load_run(tree_run["run_dir"])
    summary = run.summary()
    assert summary["exit"] == {"code": 7, "signal": None}
    assert summary["status"] == "error"  # any non-zero exit of an arbitrary command is an error, never "oom"
    assert "exited with code 7" in tree_run["stderr"]


def test_watch_records_host_rss_per_process_and_in_total(tree_run: dict[str, Any]) -> None:
    events = read_events(tree_run["run_dir"] / "events.jsonl")
    header = events[0]
    procs = [e for e in events if e["type"] == "proc"]
    # The command is blipmon's child; the program it started is the command's child.
    command = next(p for p in procs if p["ppid"] == header["pid"])
    kid = next(p for p in procs if p["ppid"] == command["pid"])
    totals = {e["t"]: e for e in events if e["type"] == "sample"}
    holding = [e for e in events if e["type"] == "tree" and _holding(e)]
    assert holding, "no tick saw both processes holding their memory"
    for tree in holding:
        assert tree["rss"][str(command["pid"])] >= 48 * MIB
        assert tree["rss"][str(kid["pid"])] >= 32 * MIB
        # The tick's sample (same t) carries the total: what show and compare read as host RSS.
        assert totals[tree["t"]]["rss"] == sum(tree["rss"].values())
        assert totals[tree["t"]]["nproc"] == len(tree["rss"])
    run = load_run(tree_run["run_dir"])
    assert run.peaks()["host_rss"] >= 80 * MIB


def test_a_watch_profile_has_a_valid_summary_without_phases(tree_run: dict[str, Any], run_cli: Any) -> None:
    shown = run_cli("show", "--json", tree_run["run_dir"])
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["phases"] == [] and summary["steps"] == [] and summary["load"] is None
    assert summary["name"] == f"watch/{Path(sys.executable).name}"  # python, python3, python3.11...
    assert summary["config"]["runtime"]["sample_hz"] == 10.0
    assert set(summary["environment"]) >= {"device", "gpu_name", "gpu_total_bytes", "host_total_bytes", "world_size"}
    assert summary["peaks"]["allocated"] is None  # no allocator from outside the process
    text = run_cli("show", tree_run["run_dir"])
    assert text.returncode == 0 and "exit 7" in text.stdout
    compared = run_cli("compare", tree_run["run_dir"], tree_run["run_dir"])
    assert compared.returncode == 0, compared.stderr


def test_without_nvml_the_profile_says_so_once(tree_run: dict[str, Any]) -> None:
    run = load_run(tree_run["run_dir"])
    if GpuDevices():
        pytest.skip("this machine has an NVIDIA driver: GPU figures are recorded instead")
    assert sum("NVML" in n or "no NVIDIA" in n for n in run.notes) == 1
    assert run.environment["device"] == "cpu" and run.environment["gpu_reason"]
    assert run.peaks()["device_used"] is None


def test_sigint_to_blipmon_reaches_the_command_and_its_exit_code_comes_back(
    tmp_path: Path, blipmon_cache: Path
) -> None:
    ready = tmp_path / "ready"
    w = Watched(tmp_path / "out", blipmon_cache, INTERRUPTIBLE, str(ready))
    deadline = time.monotonic() + PATIENCE_S
    while not ready.exists():
        assert w.proc.poll() is None and time.monotonic() < deadline, w.proc.communicate()[1]
        time.sleep(0.02)
    os.kill(w.proc.pid, signal.SIGINT)  # blipmon alone: the command is in a process group of its own
    code, _, err = w.finish()
    assert code == 42, err
    run_dir = w.run_dir()
    assert run_dir is not None
    run = load_run(run_dir)
    assert run.summary()["exit"] == {"code": 42, "signal": None}
    assert any("SIGINT forwarded" in n for n in run.notes)


def test_a_command_killed_by_a_signal_exits_128_plus_n_and_is_stopped(tmp_path: Path, blipmon_cache: Path) -> None:
    w = Watched(tmp_path / "out", blipmon_cache, "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    code, _, err = w.finish()
    assert code == 128 + signal.SIGTERM, err
    run_dir = w.run_dir()
    assert run_dir is not None
    run = load_run(run_dir)
    assert run.status == "stopped"
    assert run.summary()["exit"] == {"code": None, "signal": "SIGTERM"}


def test_usage_errors(run_cli: Any, tmp_path: Path) -> None:
    no_cmd = run_cli("watch", "--out", tmp_path)
    assert no_cmd.returncode == 2 and "needs a command" in no_cmd.stderr
    missing = run_cli("watch", "--out", tmp_path, "--", "blipmon-no-such-command-xyz")
    assert missing.returncode == 127 and "command not found" in missing.stderr
    assert not any(tmp_path.iterdir()), "nothing is recorded for a command that cannot start"


@pytest.mark.parametrize(
    ("cmd", "name"),
    [
        (["python", "train.py", "--lr", "1"], "watch/train.py"),
        (["/usr/bin/python3", "-m", "torch.distributed.run"], "watch/torch.distributed.run"),
        (["torchrun", "--nproc_per_node=2", "x.py"], "watch/torchrun"),
        (["./my job!"], "watch/my-job"),
    ],
)
def test_run_names(cmd: list[str], name: str) -> None:
    assert run_name(cmd) == name


def test_a_command_sigkilled_is_killed_not_an_error(tmp_path: Path, blipmon_cache: Path) -> None:
    """`kill -9` (or the kernel's OOM killer) cannot be caught: the run says killed, as `blipmon run` does."""
    w = Watched(tmp_path / "out", blipmon_cache, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    code, _, err = w.finish()
    assert code == 128 + signal.SIGKILL, err
    run_dir = w.run_dir()
    assert run_dir is not None
    run = load_run(run_dir)
    assert run.status == "killed"
    assert run.summary()["exit"] == {"code": None, "signal": "SIGKILL"}
