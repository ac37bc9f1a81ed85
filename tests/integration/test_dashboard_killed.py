"""The dashboard killed mid-run: the run goes on, finishes, and is saved with its exit record.

``blipmon run --live`` runs in a real pseudo-terminal; once the child has recorded a phase, the
dashboard process is SIGKILLed. The child (started through the supervisor in a session of its
own) must keep training, and the supervisor must append the exit record.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import sys
import termios
import time
from pathlib import Path

from support import PATIENCE_S, read_events, subprocess_env

from blipmon.core.run import load_run


def test_killing_the_dashboard_never_loses_the_run(tmp_path: Path, tiny_models: dict, blipmon_cache: Path) -> None:
    out = tmp_path / "out"
    sets = ["train.num_train_samples=64", "train.max_epochs=1", "train.batch_size=4", "runtime.predict=false"]
    argv = [sys.executable, "-m", "blipmon", "run", "tiny/blip2-opt", "--live", "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    env = subprocess_env(blipmon_cache, TERM="xterm-256color")
    pid, fd = pty.fork()
    if pid == 0:  # the dashboard, in a real terminal
        os.execvpe(sys.executable, argv, env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    deadline = time.monotonic() + PATIENCE_S
    run_dir = None
    try:
        while time.monotonic() < deadline:  # drain the terminal until the child records a phase
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    os.read(fd, 65536)
                except OSError:
                    break
            dirs = [d for d in out.glob("*") if (d / "events.jsonl").is_file()] if out.is_dir() else []
            if dirs and any(e.get("type") == "phase" for e in read_events(dirs[0] / "events.jsonl")):
                run_dir = dirs[0]
                break
        assert run_dir is not None, "the live run never recorded a phase"
        os.kill(pid, signal.SIGKILL)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        os.close(fd)
    while time.monotonic() < deadline:
        if any(e.get("type") == "exit" for e in read_events(run_dir / "events.jsonl")):
            break
        time.sleep(0.2)
    run = load_run(run_dir)
    assert run.exit is not None, "the supervisor did not append the exit record"
    assert run.status == "ok"
    assert len(run.steps) == run.plan["total_steps"]  # it trained to the end with nobody watching
