"""A followed run that stops writing says so (issue 16, item 5).

With its child stopped (SIGSTOP), ``attach`` used to say ``running`` with a frozen ETA for ever. A
``FileFollowSource`` now gives a ``Stall`` once no record has arrived for ``stall_after`` seconds
(``STALL_SECONDS``, 10), with what psutil says of the header's pid, and drops it when records come
again; the header shows it in place of the ETA. Time is a ``FrozenClock``: nothing here sleeps ten
seconds, and the real processes below are stopped and resumed by signals, never timed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from recorded import FrozenClock, gpu_events, write_run
from ui_helpers import PATIENCE_S, drive, screen_text, wait_until

from blipmon.core.snapshot import Stall
from blipmon.runner.follow import STALL_SECONDS, FileFollowSource
from blipmon.ui.app import BlipmonApp
from blipmon.ui.live import RunScreen


def _running_run(path: Path, pid: int, host: str, started: float) -> Path:
    events = gpu_events(finished=False)[:60]  # two steps done of six: an ETA is shown
    events[0].update(pid=pid, hostname=host, started=started)
    d = write_run(path, events)
    future = time.time() + 3600  # the file "changed" after now: the quiet time starts at 0 exactly
    os.utime(d / "events.jsonl", (future, future))
    return d


def _append(d: Path, *events: dict[str, Any]) -> None:
    with open(d / "events.jsonl", "a", encoding="utf-8") as fh:
        for ev in events:
            fh.write(json.dumps(ev) + "\n")


SAMPLE = {"type": "sample", "t": 50.0, "rss": 3 << 30, "alloc": 1 << 30, "res": 2 << 30, "dev": 3 << 30}


def test_stall_after_ten_quiet_seconds_then_recovery(tmp_path: Path) -> None:
    assert STALL_SECONDS == 10.0
    me = os.getpid()
    d = _running_run(tmp_path / "run", me, socket.gethostname(), time.time())
    clock = FrozenClock()
    src = FileFollowSource(d, mode="attach", clock=clock)
    assert src.poll().stall is None
    clock.advance(9.9)
    snap = src.poll()
    assert snap.stall is None and snap.status == "running"
    clock.advance(0.1)
    snap = src.poll()
    assert snap.stall == Stall(10, "alive", me, socket.gethostname())
    assert snap.stall.text() == f"no data for 10 s · pid {me} alive (busy or hung?)"
    clock.advance(5)
    assert src.poll().stall == Stall(15, "alive", me, socket.gethostname())
    _append(d, SAMPLE)  # data again
    snap = src.poll()
    assert snap.stall is None and snap.status == "running"
    clock.advance(9)
    assert src.poll().stall is None  # the quiet time starts again from the new record


def test_stall_is_configurable_and_never_for_a_finished_run(tmp_path: Path) -> None:
    d = _running_run(tmp_path / "run", os.getpid(), socket.gethostname(), time.time())
    clock = FrozenClock()
    src = FileFollowSource(d, mode="attach", clock=clock, stall_after=3)
    src.poll()
    clock.advance(3)
    assert src.poll().stall is not None
    _append(d, {"type": "end", "t": 60.0, "status": "ok", "code": 0})
    clock.advance(100)
    snap = src.poll()
    assert snap.status == "ok" and snap.stall is None


def test_a_run_sampling_slowly_is_given_three_of_its_periods(tmp_path: Path) -> None:
    d = tmp_path / "slow"
    events = gpu_events(finished=False)[:60]
    events[0].update(pid=os.getpid(), hostname=socket.gethostname(), started=time.time())
    events[1]["config"]["runtime"]["sample_hz"] = 0.1  # the lowest rate allowed: a sample every 10 s
    write_run(d, events)
    future = time.time() + 3600
    os.utime(d / "events.jsonl", (future, future))
    clock = FrozenClock()
    src = FileFollowSource(d, mode="attach", clock=clock)
    src.poll()
    clock.advance(29)
    assert src.poll().stall is None  # two periods without a sample: nothing unusual at 0.1 Hz
    clock.advance(1)
    assert src.poll().stall == Stall(30, "alive", os.getpid(), socket.gethostname())


def test_attaching_to_a_run_quiet_for_an_hour_says_so_at_once(tmp_path: Path) -> None:
    d = _running_run(tmp_path / "run", os.getpid(), socket.gethostname(), time.time())
    hour_ago = time.time() - 3600
    os.utime(d / "events.jsonl", (hour_ago, hour_ago))
    snap = FileFollowSource(d, mode="attach", clock=FrozenClock()).poll()
    assert snap.stall is not None and 3600 <= snap.stall.seconds < 3600 + PATIENCE_S


def test_stall_names_a_reused_pid_as_ended_and_another_host_as_unchecked(tmp_path: Path) -> None:
    # Our own pid, but the header says the run started long before this process existed: pid reused.
    d = _running_run(tmp_path / "old", os.getpid(), socket.gethostname(), psutil.Process().create_time() - 600)
    clock = FrozenClock()
    src = FileFollowSource(d, mode="attach", clock=clock)
    src.poll()
    clock.advance(10)
    stall = src.poll().stall
    assert stall is not None and stall.process == "gone"
    assert stall.text() == f"no data for 10 s · pid {os.getpid()} has ended"

    d = _running_run(tmp_path / "far", 4242, "gpu-node-7", time.time())
    src = FileFollowSource(d, mode="attach", clock=clock)
    src.poll()
    clock.advance(10)
    stall = src.poll().stall
    assert stall == Stall(10, "elsewhere", 4242, "gpu-node-7")
    assert stall.text() == "no data for 10 s · its process runs on gpu-node-7: not checked from here"


def _wait_state(pid: int, state: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while psutil.Process(pid).status() != state:
        if time.monotonic() > deadline:
            pytest.fail(f"pid {pid} never became {state}")
        time.sleep(0.01)


def test_a_stopped_process_is_said_stopped_then_alive_then_the_run_killed(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        d = _running_run(tmp_path / "run", proc.pid, socket.gethostname(), time.time())
        clock = FrozenClock()
        src = FileFollowSource(d, mode="attach", clock=clock)
        src.poll()
        os.kill(proc.pid, signal.SIGSTOP)
        _wait_state(proc.pid, psutil.STATUS_STOPPED)
        clock.advance(20)
        stall = src.poll().stall
        assert stall == Stall(20, "stopped", proc.pid, socket.gethostname())
        assert f"pid {proc.pid} stopped (SIGSTOP? `kill -CONT {proc.pid}` resumes it)" in stall.text()
        os.kill(proc.pid, signal.SIGCONT)
        _wait_state(proc.pid, psutil.STATUS_SLEEPING)
        clock.advance(1)
        assert src.poll().stall == Stall(21, "alive", proc.pid, socket.gethostname())
    finally:
        proc.kill()
        proc.wait()
    clock.advance(1)
    snap = src.poll()  # its writer is gone without an end record: killed, no longer "no data"
    assert snap.status == "killed" and snap.stall is None


WRITER = r"""
import json, os, socket, sys, time
path = sys.argv[1]
with open(path, "a", encoding="utf-8") as fh:
    fh.write(json.dumps({"type": "header", "t": 0.0, "format_version": 1, "name": "writer", "pid": os.getpid(),
                         "hostname": socket.gethostname(), "started": time.time(), "source": "test"}) + "\n")
    t = 0.0
    while True:
        t += 0.05
        fh.write(json.dumps({"type": "sample", "t": round(t, 3), "rss": 1 << 30}) + "\n")
        fh.flush()
        time.sleep(0.05)
"""


def test_a_real_attached_writer_stopped_and_resumed(tmp_path: Path) -> None:
    """A process writing a profile as a run does, SIGSTOPped and SIGCONTed under a followed source."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "events.jsonl").write_bytes(b"")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(d / "events.jsonl")])
    try:
        clock = FrozenClock()
        src = FileFollowSource(d, mode="attach", clock=clock)
        deadline = time.monotonic() + PATIENCE_S
        while src.poll().n_samples < 3:
            assert time.monotonic() < deadline, "the writer wrote nothing"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGSTOP)
        _wait_state(proc.pid, psutil.STATUS_STOPPED)
        src.poll()  # what it wrote before it stopped
        n = src.poll().n_samples
        clock.advance(12)
        snap = src.poll()
        assert snap.n_samples == n and snap.name == "writer"
        assert snap.stall == Stall(12, "stopped", proc.pid, socket.gethostname())
        os.kill(proc.pid, signal.SIGCONT)
        while src.poll().stall is not None:  # recovers as soon as a record arrives
            assert time.monotonic() < deadline, "no record after SIGCONT"
            time.sleep(0.05)
        assert src.poll().n_samples > n
    finally:
        proc.kill()
        proc.wait()


def test_header_says_no_data_instead_of_an_eta_and_recovers(tmp_path: Path) -> None:
    me = os.getpid()
    d = _running_run(tmp_path / "run", me, socket.gethostname(), time.time())
    clock = FrozenClock()
    app = BlipmonApp(RunScreen(FileFollowSource(d, mode="attach", clock=clock), refresh=0.05))

    def header() -> str:
        return "\n".join(screen_text(app).splitlines()[:2])

    async def script(pilot: Any) -> None:
        await wait_until(pilot, lambda: "ETA" in header(), "the ETA")
        clock.advance(12)
        await wait_until(pilot, lambda: "no data" in header(), "the stall")
        assert f"⚠ no data for 12 s · pid {me} alive" in header()
        assert "ETA" not in header() and "running" in header()
        _append(d, SAMPLE)
        await wait_until(pilot, lambda: "no data" not in header(), "the recovery")
        assert "ETA" in header()

    drive(app, script, size=(120, 30))
