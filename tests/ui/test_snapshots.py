"""Text snapshots of whole screens, from fixed recorded data on a frozen clock.

They catch layout regressions a unit test would not (a panel pushed off an 80x24 screen, a label
cut short). To accept an intended change: look at the diff, then rerun with
BLIPMON_SNAPSHOT_UPDATE=1 and commit tests/ui/snapshots/.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ui_helpers import FrozenClock, check_snapshot, gpu_events, screen_text, write_run

from blipmon.core.source import FileFollowSource, ReplaySource
from blipmon.ui.app import BlipmonApp
from blipmon.ui.compare import CompareScreen
from blipmon.ui.launcher import LauncherScreen
from blipmon.ui.live import RunScreen


def shot(app: BlipmonApp, size: tuple[int, int], ready: Any = None) -> str:
    async def main() -> str:
        async with app.run_test(size=size) as pilot:
            for _ in range(80):
                await pilot.pause(0.05)
                if ready is None or ready(pilot.app):
                    break
            await pilot.pause()
            return screen_text(pilot.app)

    return asyncio.run(main())


def test_replay_gpu_oom_80x24(gpu_run: Path, clock: FrozenClock, snapshot_update: bool) -> None:
    src = ReplaySource(gpu_run, clock=clock, background=False)
    src.seek_fraction(1.0)
    check_snapshot("replay_gpu_oom_80x24", shot(BlipmonApp(RunScreen(src)), (80, 24)), snapshot_update)


def test_replay_gpu_midway_120x40(gpu_run: Path, clock: FrozenClock, snapshot_update: bool) -> None:
    src = ReplaySource(gpu_run, speed=4.0, clock=clock, background=False)
    src.seek_to(8.0)
    src.toggle_pause()
    check_snapshot("replay_gpu_midway_120x40", shot(BlipmonApp(RunScreen(src)), (120, 40)), snapshot_update)


def test_attach_cpu_run_100x30(cpu_run: Path, snapshot_update: bool) -> None:
    app = BlipmonApp(RunScreen(FileFollowSource(cpu_run, mode="attach")))
    check_snapshot("attach_cpu_100x30", shot(app, (100, 30)), snapshot_update)


def test_compare_100x40(tmp_path: Path, gpu_run: Path, cpu_run: Path, snapshot_update: bool) -> None:
    other = write_run(tmp_path / "other", gpu_events(oom_step=None, steps=5))
    app = BlipmonApp(CompareScreen([gpu_run, other, cpu_run], standalone=True))
    text = shot(app, (100, 40), ready=lambda a: bool(getattr(a.screen, "runs", None)))
    check_snapshot("compare_100x40", text, snapshot_update)


def test_launcher_80x24(gpu_run: Path, cpu_run: Path, snapshot_update: bool) -> None:
    app = BlipmonApp(LauncherScreen(gpu_run.parent))
    text = shot(app, (80, 24), ready=lambda a: len(getattr(a.screen, "runs", [])) == 2)
    check_snapshot("launcher_80x24", text.replace(str(gpu_run.parent), "<profiles>"), snapshot_update)
