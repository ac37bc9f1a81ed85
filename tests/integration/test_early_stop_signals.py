"""Ctrl-C in the first second of ``blipmon run``: exit 4, a readable run with status ``stopped``, no traceback.

Ctrl-C in a terminal sends SIGINT to the whole process group: ``blipmon run`` and its child get it at
the same moment, wherever each is (the child still starting its interpreter, importing torch, writing
its header). The delays count from the moment the parent has started its child (child.log exists):
before that there is no run yet, and nothing is left behind (see ``test_before_the_child_exists``).
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
from support import PATIENCE_S

from blipmon.core.config import resolve
from blipmon.core.profile import RESERVE
from blipmon.core.run import load_run
from blipmon.runner.launch import Launch

RUN = ("train.num_train_samples=1000000", "train.batch_size=2")  # runs until it is stopped


def _child_started(rp: Any) -> Path:
    deadline = time.monotonic() + PATIENCE_S
    while True:
        d = rp.find_run_dir()
        if d is not None and (d / "child.log").exists():
            return d
        assert rp.proc.poll() is None, rp.describe()
        assert time.monotonic() < deadline, rp.describe()
        time.sleep(0.001)


def _check_stopped(rp: Any, run_cli: Any) -> None:
    done = rp.finish()
    assert done.returncode == 4, f"{done.stderr}\n{rp.describe()}"
    assert "Traceback" not in done.stderr
    log = (done.run_dir / "child.log").read_text(errors="replace")
    assert "Traceback" not in log and "StopRequested" not in log and "KeyboardInterrupt" not in log, log
    first = json.loads((done.run_dir / "events.jsonl").read_text().splitlines()[0])
    assert first["type"] == "header"
    shown = run_cli("show", done.run_dir, "--json")
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["status"] == "stopped"
    assert summary["exit"] == {"code": 4, "signal": None}
    left = sorted(p.name for p in done.run_dir.iterdir())
    assert left == ["child.log", "config.json", "events.jsonl"], left  # no reserve, no temporary file


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.1, 0.3, 1.0])
def test_ctrl_c_to_the_process_group_early_is_a_stopped_run(start_run: Any, run_cli: Any, delay: float) -> None:
    rp = start_run("tiny/blip2-opt", *RUN)
    _child_started(rp)
    time.sleep(delay)
    os.killpg(rp.proc.pid, signal.SIGINT)  # the group: the parent and its child, as a terminal's Ctrl-C
    _check_stopped(rp, run_cli)


@pytest.mark.slow
def test_two_ctrl_c_in_a_row_still_record_one_stop(start_run: Any, run_cli: Any) -> None:
    rp = start_run("tiny/blip2-opt", *RUN)
    rp.wait_for_record("header")
    os.killpg(rp.proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(rp.proc.pid, signal.SIGINT)  # the second one must not break the recording of the first
    _check_stopped(rp, run_cli)


@pytest.mark.slow
def test_before_the_child_exists_nothing_is_left(tmp_path: Path, blipmon_cache: Path) -> None:
    """An interrupt while the run directory is being made removes it: no half run, no temporary file."""
    from support import subprocess_env

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "blipmon", "run", "tiny/blip2-opt", "--out", str(out)]
    for s in RUN:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(blipmon_cache), start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + PATIENCE_S
    while not out.exists():  # the parent is about to make the run directory
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.0005)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=PATIENCE_S)
    runs = list(out.iterdir())
    if not runs:  # interrupted before the child started: nothing recorded, nothing left
        assert proc.returncode != 0 and "Traceback" not in err, err
        return
    # Or it had already started its child: then it is a stopped run like any other.
    assert proc.returncode == 4, err
    assert load_run(runs[0]).status == "stopped"


class _NoHeaderChild(Launch):
    """A child that dies before it writes anything (broken, or killed while starting)."""

    script = "raise SystemExit(1)"

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.script]


def test_the_parent_writes_the_header_a_child_never_wrote(tmp_path: Path) -> None:
    launch = _NoHeaderChild(resolve("tiny/blip2-opt"), tmp_path)
    launch.start()
    assert launch.wait() == 1
    assert launch.proc is not None
    run = load_run(launch.run_dir)  # readable: the header is first
    assert run.header["written_by"] == "launcher" and run.header["pid"] == launch.proc.pid
    assert run.header["name"] == "tiny/blip2-opt"
    assert run.status == "error" and run.exit == {**run.exit, "code": 1, "signal": None}
    assert not (launch.run_dir / RESERVE).exists() and not (launch.run_dir / "events.jsonl.tmp").exists()


def test_a_child_killed_before_its_header_is_a_killed_run(tmp_path: Path) -> None:
    class Killed(_NoHeaderChild):
        script = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"

    launch = Killed(resolve("tiny/blip2-opt"), tmp_path)
    launch.start()
    assert launch.wait() == 4
    run = load_run(launch.run_dir)
    assert run.status == "killed" and run.exit == {**run.exit, "code": None, "signal": "SIGKILL"}


def test_the_child_starts_with_stop_signals_blocked_until_it_can_record_them(tmp_path: Path) -> None:
    """A signal sent while the child's interpreter starts is held, not fatal: the child unblocks it itself."""

    class ShowMask(_NoHeaderChild):
        script = (
            "import signal, sys; sys.exit(3 if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []) else 0)"
        )

    launch = ShowMask(resolve("tiny/blip2-opt"), tmp_path)
    launch.start()
    assert launch.wait() == 3  # SIGINT was blocked in the new process
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # and no longer in ours
