"""The dashboard's CPU use while following a live run (goal, BENCHMARKS.md: <= 10% of one core).

A writer process appends a CUDA-shaped run at the real rates (samples at 10 Hz, a phase record
every 0.5 s, a step every 2 s, a log line per step); ``blipmon attach`` follows it in a real
pseudo-terminal of the given size at the default refresh, exactly as a user would run it. After a
warm-up, the dashboard process's CPU time (user + system, all threads) is measured over a window
and reported as a percentage of one core. The writer's own CPU is not counted.

    python benchmarks/dashboard_cpu.py [--seconds 30] [--size 120x40] [--warmup 5]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

import psutil

WRITER = r"""
import json, sys, time
run = sys.argv[1]
gib = 1024**3
def w(fh, rec):
    fh.write(json.dumps(rec, separators=(",", ":")) + "\n"); fh.flush()
with open(run + "/events.jsonl", "a") as fh, open(run + "/child.log", "a") as log:
    w(fh, {"type": "header", "t": 0.0, "format_version": 1, "name": "bench/live", "pid": 0,
           "hostname": "bench", "started": time.time()})
    w(fh, {"type": "environment", "t": 0.1, "device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3",
           "gpu_total_bytes": 80 * gib, "host_total_bytes": 128 * gib})
    w(fh, {"type": "plan", "t": 0.2, "total_steps": 100000})
    t0 = time.monotonic(); i = 0
    phases = ("before_fwd", "after_fwd", "after_bwd", "after_opt_step")
    while True:
        t = round(time.monotonic() - t0, 6)
        alloc = 40 * gib + (i % 20) * 100_000_000
        w(fh, {"type": "sample", "t": t, "rss": 3 * gib, "alloc": alloc, "res": alloc + 2 * gib,
               "dev": alloc + 3 * gib, "proc_gpu": alloc + 3 * gib})
        if i % 5 == 4:
            step, k = divmod(i // 5, 4)
            w(fh, {"type": "phase", "t": t, "step": step, "micro_step": 0, "rank": 0, "phase": phases[k],
                   "params": 15 * gib, "grads": 15 * gib, "optim": 30 * gib, "acts": 8 * gib, "other": 0,
                   "allocated": alloc, "peak": alloc + gib, "reserved": alloc + 2 * gib, "host_rss": 3 * gib})
            if k == 3:
                w(fh, {"type": "step", "t": t, "step": step, "seconds": 2.0, "loss": 1.0 / (step + 1),
                       "samples_per_s": 8.0})
                log.write(f"step {step} done\n"); log.flush()
        i += 1
        time.sleep(max(0.0, t0 + i * 0.1 - time.monotonic()))
"""


def drain(fd: int, stop: threading.Event) -> None:
    """Read the terminal's output so the dashboard never blocks on a full pty buffer."""
    while not stop.is_set():
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                if not os.read(fd, 65536):
                    return
            except OSError:
                return


def attach_in_pty(run: Path, cols: int, rows: int) -> tuple[int, int, threading.Event]:
    """``blipmon attach RUN`` in a real pseudo-terminal of the given size, its output drained."""
    pid, fd = pty.fork()
    if pid == 0:  # the dashboard, in a real terminal
        os.environ["TERM"] = "xterm-256color"
        os.execvp(sys.executable, [sys.executable, "-m", "blipmon", "attach", str(run)])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    stop = threading.Event()
    threading.Thread(target=drain, args=(fd, stop), daemon=True).start()
    return pid, fd, stop


def close_pty(pid: int, fd: int, stop: threading.Event, writer: subprocess.Popen[bytes]) -> None:
    """Leave the dashboard with ``q`` (kill it if it lingers) and end the writer."""
    os.write(fd, b"q")
    time.sleep(1.0)
    stop.set()
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
    writer.kill()
    writer.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--size", default="120x40")
    args = ap.parse_args()
    cols, rows = (int(x) for x in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"name": "bench/live"}))
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run)])
        time.sleep(1.0)
        pid, fd, stop = attach_in_pty(run, cols, rows)
        proc = psutil.Process(pid)
        try:
            time.sleep(args.warmup)
            c0, w0 = proc.cpu_times(), time.monotonic()
            time.sleep(args.seconds)
            c1, w1 = proc.cpu_times(), time.monotonic()
        finally:
            close_pty(pid, fd, stop, writer)
        used = (c1.user - c0.user) + (c1.system - c0.system)
        print(f"dashboard following a live run, {cols}x{rows}, default refresh, {args.seconds:.0f} s window:")
        print(f"  CPU {used:.2f} s over {w1 - w0:.1f} s wall = {100 * used / (w1 - w0):.1f}% of one core (goal <= 10%)")
        print(f"  load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
