"""Time to open a 1,000,000-sample profile for replay (goal, BENCHMARKS.md: <= 1 s).

Writes a CUDA-shaped profile (samples with rss/alloc/res/dev/proc_gpu at 10 Hz, four phases and a
step every 2 s: ~28 hours of samples, ~120 MB) unless one is already there, then measures:

- open: ``ReplaySource`` created and its first snapshot taken (what the user waits for: the view
  shows the run's name, device, duration and the start of the timeline);
- first frame: the whole dashboard (Textual, headless, 120x40) up with that first snapshot drawn;
- full read: the loader thread has read the whole profile (the playhead can go anywhere);
- redraw: the memory timeline drawn from all 1,000,000 samples at 200x40 cells (min/max per column);
- load_run: the whole run read (``show --json``, the dashboard's compare view; the same bulk sample parser);
- show: ``blipmon show`` of the run, a fresh process, through the run index the child writes before ``end``
  (issue 17; the profile here gets one the same way: ``index_fields`` of everything before ``end``).

Wall and CPU seconds are both printed: on a shared machine the CPU time is the steadier figure.

    python benchmarks/replay_open.py [--samples N] [--dir DIR] [--repeat R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_profile(run_dir: Path, n: int) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    events = run_dir / "events.jsonl"
    if events.exists() and (run_dir / ".samples").exists() and (run_dir / ".samples").read_text() == f"{n} indexed":
        return run_dir
    gib = 1024**3
    with open(events, "w", encoding="utf-8") as fh:
        w = fh.write
        w(json.dumps({"type": "header", "t": 0.0, "format_version": 1, "name": "bench/1M", "pid": 1,
                      "hostname": "bench", "started": 0.0}) + "\n")  # fmt: skip
        w(json.dumps({"type": "environment", "t": 0.5, "device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3",
                      "gpu_total_bytes": 80 * gib, "host_total_bytes": 128 * gib}) + "\n")  # fmt: skip
        w(json.dumps({"type": "plan", "t": 0.6, "total_steps": n // 20}) + "\n")
        phases = ("before_fwd", "after_fwd", "after_bwd", "after_opt_step")
        for i in range(n):
            t = round(1.0 + i * 0.1, 6)
            alloc = 40 * gib + (i % 20) * 100_000_000
            dev = alloc + 3 * gib
            w(
                f'{{"type":"sample","t":{t},"rss":{3 * gib + i},"alloc":{alloc},"res":{alloc + 2 * gib},"dev":{dev},"proc_gpu":{dev}}}\n'
            )
            if i % 5 == 4:
                step, k = divmod(i // 5, 4)
                w(json.dumps({"type": "phase", "t": t, "step": step, "micro_step": 0, "rank": 0, "phase": phases[k],
                              "params": 15 * gib, "grads": 15 * gib, "optim": 30 * gib, "acts": 8 * gib, "other": 0,
                              "allocated": alloc, "peak": alloc + gib, "reserved": alloc + 2 * gib,
                              "host_rss": 3 * gib}) + "\n")  # fmt: skip
                if k == 3:
                    w(json.dumps({"type": "step", "t": t, "step": step, "seconds": 2.0, "loss": 1.0,
                                  "samples_per_s": 8.0}) + "\n")  # fmt: skip
    from blipmon.core.run import index_fields

    index = {"type": "index", "t": round(1.0 + n * 0.1, 6), **index_fields(run_dir)}  # as runner/child.py does
    with open(events, "a", encoding="utf-8") as fh:
        w = fh.write
        w(json.dumps(index, separators=(",", ":")) + "\n")
        w(json.dumps({"type": "end", "t": round(1.0 + n * 0.1, 6), "status": "ok", "code": 0}) + "\n")
        w(json.dumps({"type": "exit", "t": None, "code": 0, "signal": None}) + "\n")
    (run_dir / "child.log").write_text("[bench] synthetic profile\n", encoding="utf-8")
    (run_dir / ".samples").write_text(f"{n} indexed")
    return run_dir


def timed(fn):  # noqa: ANN001, ANN201 - tiny helper
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def first_frame(run_dir: Path) -> float:
    """Seconds from creating the replay source to the dashboard's first painted frame (headless)."""
    from blipmon.core.replay import ReplaySource
    from blipmon.ui.app import BlipmonApp
    from blipmon.ui.live import RunScreen

    async def main() -> float:
        t0 = time.perf_counter()
        src = ReplaySource(run_dir)
        app = BlipmonApp(RunScreen(src))
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            elapsed = time.perf_counter() - t0
            src.close()
        return elapsed

    return asyncio.run(main())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "blipmon-bench-replay")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from blipmon.core import timeline as tl  # noqa: F401 - warm imports out of the timings
    from blipmon.core.replay import ReplaySource
    from blipmon.core.run import load_run
    from blipmon.runner.follow import FileFollowSource
    from blipmon.ui.widgets.timeline import timeline_lines

    t0 = time.perf_counter()
    run_dir = write_profile(args.dir, args.samples)
    size = (run_dir / "events.jsonl").stat().st_size
    print(
        f"profile: {run_dir} ({args.samples:,} samples, {size / 1e6:.0f} MB; prepared in {time.perf_counter() - t0:.1f} s)"
    )

    rows: dict[str, list[tuple[float, float]]] = {"open": [], "full read": [], "redraw": [], "load_run": [], "show": []}
    frames: list[float] = []
    for _ in range(args.repeat):
        src, w, c = timed(lambda: ReplaySource(run_dir))
        _, w2, c2 = timed(src.poll)
        rows["open"].append((w + w2, c + c2))
        _, w, c = timed(lambda: src.wait_loaded())  # noqa: B023
        rows["full read"].append((w + rows["open"][-1][0], c + rows["open"][-1][1]))
        src.seek_fraction(1.0)
        snap = src.poll()
        assert snap.n_samples == args.samples, snap.n_samples
        _, w, c = timed(lambda: timeline_lines(snap, 200, 40))  # noqa: B023
        rows["redraw"].append((w, c))
        src.close()
        _, w, c = timed(lambda: load_run(run_dir))
        rows["load_run"].append((w, c))
        _, w, c = timed(lambda: subprocess.run([sys.executable, "-m", "blipmon", "show", str(run_dir)],  # noqa: S603
                                               check=True, stdout=subprocess.DEVNULL))  # fmt: skip
        rows["show"].append((w, c))  # (cpu: this process's only; the wall is the figure)
        frames.append(first_frame(run_dir))
    del FileFollowSource
    print(f"{'':<12}{'wall s (median)':>16}{'cpu s (median)':>16}")
    for name, vals in rows.items():
        print(f"{name:<12}{statistics.median(v[0] for v in vals):>16.3f}{statistics.median(v[1] for v in vals):>16.3f}")
    print(f"{'first frame':<12}{statistics.median(frames):>16.3f}{'':>16}   (dashboard up, 120x40, headless)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
