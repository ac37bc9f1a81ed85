"""Helpers for the dashboard tests: a frozen clock, a synthetic GPU run, text snapshots.

(A module of its own rather than conftest.py, so test modules can import it by a unique name.)
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from blipmon.core import presets
from blipmon.core.config import validate

DATA = Path(__file__).parent / "data"
SNAPSHOTS = Path(__file__).parent / "snapshots"
GIB = 1024**3
MIB = 1024**2


class FrozenClock:
    """A clock for sources: returns ``now`` until ``advance`` moves it."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def gpu_events(
    steps: int = 6,
    oom_step: int | None = 4,
    samples_per_step: int = 20,
    *,
    finished: bool = True,
    started: float = 1_000.0,
) -> list[dict[str, Any]]:
    """A CUDA run's events: load, steps of four phases with allocator figures, samples, an OOM."""
    cfg = validate(presets.get("h100/reduced-batch"))
    cfg["train"]["max_steps"] = steps
    ev: list[dict[str, Any]] = [
        {"type": "header", "t": 0.0, "format_version": 1, "name": "h100/reduced-batch", "pid": 1,
         "hostname": "fixture-host", "started": started, "source": "blipmon run"},
        {"type": "config", "t": 0.001, "config": cfg},
        {"type": "environment", "t": 1.0, "device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3",
         "gpu_total_bytes": 80 * GIB, "host_total_bytes": 128 * GIB, "torch": "2.13.0", "transformers": "5.23.0",
         "world_size": 1},
        {"type": "load", "t": 3.0, "seconds": 2.0, "params_bytes": 15 * GIB, "placement": {"cuda:0": 15 * GIB},
         "weights": "random", "peak": 15 * GIB + 200 * MIB, "host_rss": 3 * GIB},
        {"type": "plan", "t": 3.1, "total_steps": steps, "steps_per_epoch": steps, "micro_per_step": 1,
         "batch_size": 16, "trainable_params": 3_800_000_000, "total_params": 3_800_000_000},
    ]  # fmt: skip
    t = 3.2
    params, grads, optim = 15 * GIB, 15 * GIB, 30 * GIB
    last_step = steps if oom_step is None else oom_step + 1
    for step in range(last_step):
        acts = (8 + step % 2) * GIB
        has_optim = step > 0
        for k, (phase, cats) in enumerate(
            [
                ("before_fwd", (params, 0, optim if has_optim else 0, 0)),
                ("after_fwd", (params, 0, optim if has_optim else 0, acts)),
                ("after_bwd", (params, grads, optim if has_optim else 0, 0)),
                ("after_opt_step", (params, grads, optim, 0)),
            ]
        ):
            if step == oom_step and k == 1:
                break
            for i in range(samples_per_step // 4):
                frac = i / (samples_per_step // 4)
                alloc = sum(cats) + int(2 * GIB * math.sin(math.pi * frac))
                ev.append({"type": "sample", "t": round(t, 6), "rss": 3 * GIB + step * MIB, "alloc": alloc,
                           "res": alloc + 2 * GIB, "dev": alloc + 3 * GIB, "proc_gpu": alloc + 3 * GIB})  # fmt: skip
                t += 0.1
            total = sum(cats)
            other = 512 * MIB
            ev.append({"type": "phase", "t": round(t, 6), "step": step, "micro_step": 0, "rank": 0, "phase": phase,
                       "params": cats[0], "grads": cats[1], "optim": cats[2], "acts": cats[3], "other": other,
                       "allocated": total + other, "peak": total + other + 2 * GIB, "reserved": total + 4 * GIB,
                       "host_rss": 3 * GIB + step * MIB})  # fmt: skip
        else:
            ev.append({"type": "step", "t": round(t, 6), "step": step, "seconds": 2.0 + 0.1 * (step % 3),
                       "loss": 7.0 - 0.3 * step, "samples_per_s": 8.0, "micro_steps": 1})  # fmt: skip
            continue
        ev.append({"type": "oom", "t": round(t, 6), "step": step, "micro_step": 0, "phase": "after_fwd",
                   "requested_bytes": 20 * GIB, "message": "CUDA out of memory. Tried to allocate 20.00 GiB",
                   "allocated": 78 * GIB, "reserved": 79 * GIB, "peak": 79 * GIB})  # fmt: skip
        break
    if finished:
        status, code = ("oom", 3) if oom_step is not None else ("ok", 0)
        ev.append({"type": "end", "t": round(t + 0.1, 6), "status": status, "code": code})
        ev.append({"type": "exit", "t": None, "code": code, "signal": None})
    return ev


def write_run(path: Path, events: list[dict[str, Any]], log: str = "[blipmon] loading ...\n") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "events.jsonl", "w", encoding="utf-8") as fh:
        for e in events:
            fh.write(json.dumps(e, separators=(",", ":")) + "\n")
    (path / "child.log").write_text(log, encoding="utf-8")
    cfg = next((e["config"] for e in events if e["type"] == "config"), {})
    (path / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return path


def screen_text(app: Any) -> str:
    """The screen as plain text, row by row, dialogs included (what a snapshot test compares)."""
    import io

    from rich.console import Console

    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, record=True,
                      color_system="truecolor", legacy_windows=False, safe_box=False)  # fmt: skip
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


def check_snapshot(name: str, text: str, update: bool) -> None:
    """Compare with tests/ui/snapshots/NAME.txt; only BLIPMON_SNAPSHOT_UPDATE=1 writes it.

    A missing file fails: a snapshot that wrote itself on first run would pass (or skip) whatever the screen
    shows, and a deleted or misnamed one would go unnoticed. Making one is deliberate: run the test with
    BLIPMON_SNAPSHOT_UPDATE=1, look at the file, commit it.
    """
    path = SNAPSHOTS / f"{name}.txt"
    if update:
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(
            f"no snapshot {path}: to create it, run this test with BLIPMON_SNAPSHOT_UPDATE=1, check the file "
            "by eye and commit it (docs/testing.md)",
            pytrace=False,
        )
    expected = path.read_text(encoding="utf-8").rstrip("\n")
    assert text == expected, f"{name} differs from {path} (rerun with BLIPMON_SNAPSHOT_UPDATE=1 after checking)"


def drive(app: Any, script: Callable[[Any], Awaitable[None]], size: tuple[int, int] = (80, 24)) -> Any:
    """Run ``app`` headless at ``size``, let ``script`` drive it through a Pilot, return the app's result."""

    async def main() -> Any:
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await script(pilot)
        return app.return_value

    return asyncio.run(main())


PATIENCE_S = 240.0  # only a guard against hanging; nothing asserts how fast anything happened


async def wait_until(pilot: Any, cond: Callable[[], bool], what: str, timeout: float = PATIENCE_S) -> None:
    """Let the app run until ``cond()`` holds; fail with the screen's text if it never does."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}\n{screen_text(pilot.app)}")
        await pilot.pause(0.1)


def compared(app: Any) -> bool:
    """The compare view is up with its table filled in."""
    from textual.widgets import DataTable

    from blipmon.ui.compare import CompareScreen

    screen = app.screen
    return (
        isinstance(screen, CompareScreen)
        and bool(screen.query(DataTable))
        and screen.query_one(DataTable).row_count > 0
    )


def write_doc(d: Path, configs: list[tuple[Any, ...]], *, finished: bool, **extra: Any) -> None:
    """A sweep folder's sweep.json: (name, status, run_dir, seconds, reason) per configuration."""
    doc = {
        "format_version": 1,
        "started": 1000.0,
        "finished": finished,
        "ended": 1100.0 if finished else None,
        "configs": [
            {"name": n, "source": n, "status": s, "exit_code": None, "run_dir": rd, "seconds": sec, "reason": why}
            for n, s, rd, sec, why in configs
        ],
        **extra,
    }
    (d / "sweep.json").write_text(json.dumps(doc), encoding="utf-8")
