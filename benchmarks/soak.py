"""Soak: the dashboard's memory while it follows a one-hour run sampled at 100 Hz.

A writer process appends a CUDA-shaped profile as fast as a one-hour, 100 Hz run would accumulate
it, compressed in time (360,000 samples, a phase record every 0.5 s of run time, a step every
2 s, a log line per step). ``blipmon attach`` follows it in a real pseudo-terminal at the default
refresh. The dashboard's resident memory is read every few seconds; the report gives its growth
per 100,000 samples and after the writer stops, so a leak (memory growing with refreshes rather
than with data) shows as growth that keeps going once the data stops.

    python benchmarks/soak.py [--hours 1] [--hz 100] [--rate 6000] [--size 120x40]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from dashboard_cpu import attach_in_pty, close_pty  # noqa: E402 - a sibling benchmark's helpers

WRITER = r"""
import json, sys, time
run, total, hz, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
gib = 1024**3
phases = ("before_fwd", "after_fwd", "after_bwd", "after_opt_step")
def line(rec):
    return json.dumps(rec, separators=(",", ":")) + "\n"
with open(run + "/events.jsonl", "a") as fh, open(run + "/child.log", "a") as log:
    fh.write(line({"type": "header", "t": 0.0, "format_version": 1, "name": "bench/soak", "pid": 0,
                   "hostname": "bench", "started": time.time()}))
    fh.write(line({"type": "environment", "t": 0.0, "device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3",
                   "gpu_total_bytes": 80 * gib, "host_total_bytes": 128 * gib}))
    fh.write(line({"type": "plan", "t": 0.0, "total_steps": int(total / hz / 2)}))
    fh.flush()
    per_phase = int(hz / 2)
    t_start = time.monotonic()
    for i in range(total):
        t = round(i / hz, 4)
        alloc = 40 * gib + (i % 97) * 50_000_000
        buf = [line({"type": "sample", "t": t, "rss": 3 * gib + i, "alloc": alloc, "res": alloc + 2 * gib,
                     "dev": alloc + 3 * gib})]
        if i % per_phase == per_phase - 1:
            step, k = divmod(i // per_phase, 4)
            buf.append(line({"type": "phase", "t": t, "step": step, "micro_step": 0, "rank": 0, "phase": phases[k],
                             "params": 15 * gib, "grads": 15 * gib, "optim": 30 * gib, "acts": 8 * gib,
                             "other": 0, "allocated": alloc, "peak": alloc + gib, "reserved": alloc + 2 * gib,
                             "host_rss": 3 * gib}))
            if k == 3:
                buf.append(line({"type": "step", "t": t, "step": step, "seconds": 2.0, "loss": 1.0 / (step + 1),
                                 "samples_per_s": 8.0}))
                log.write(f"step {step} done\n")
        fh.write("".join(buf))
        if i % 200 == 0:
            fh.flush(); log.flush()
            time.sleep(max(0.0, t_start + i / rate - time.monotonic()))
    fh.write(line({"type": "end", "t": total / hz, "status": "ok", "code": 0}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--hz", type=float, default=100.0)
    ap.add_argument("--rate", type=float, default=6000.0, help="samples written per wall second")
    ap.add_argument("--size", default="120x40")
    ap.add_argument("--settle", type=float, default=15.0, help="seconds to keep watching after the writer ends")
    args = ap.parse_args()
    total = int(args.hours * 3600 * args.hz)
    cols, rows = (int(x) for x in args.size.lower().split("x"))
    readings: list[tuple[float, int, int]] = []  # (wall s, samples written, dashboard RSS)
    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"name": "bench/soak"}))
        events = run / "events.jsonl"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run), str(total), str(args.hz), str(args.rate)])
        time.sleep(0.5)
        pid, fd, stop = attach_in_pty(run, cols, rows)
        proc = psutil.Process(pid)
        t0 = time.monotonic()
        written_done_at: float | None = None
        try:
            while True:
                time.sleep(2.0)
                size = events.stat().st_size
                samples = min(total, int(size / 110))  # ~110 bytes per sample line with its share of the rest
                readings.append((time.monotonic() - t0, samples, proc.memory_info().rss))
                if writer.poll() is not None and written_done_at is None:
                    written_done_at = time.monotonic()
                if written_done_at is not None and time.monotonic() - written_done_at > args.settle:
                    break
        finally:
            close_pty(pid, fd, stop, writer)
        size_mb = events.stat().st_size / 1e6
    first = readings[0]
    at_end = next((r for r in readings if r[1] >= total), readings[-1])
    last = readings[-1]
    mib = 1024**2
    print(f"soak: {total:,} samples ({args.hours:g} h at {args.hz:g} Hz, {size_mb:.0f} MB), dashboard {cols}x{rows}")
    print(f"  dashboard RSS at start      {first[2] / mib:8.1f} MiB")
    print(f"  when all data was written   {at_end[2] / mib:8.1f} MiB")
    print(f"  {args.settle:.0f} s after the writer ended {last[2] / mib:6.1f} MiB")
    growth = (at_end[2] - first[2]) / max(1, at_end[1] - first[1]) * 100_000 / mib
    print(
        f"  growth per 100,000 samples  {growth:8.2f} MiB; after the data stopped: {(last[2] - at_end[2]) / mib:+.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
