"""Snapshots of whole screens as Textual's own SVG screenshots, at two terminal sizes, from fixed recorded data.

They catch layout regressions a unit test would not (a panel pushed off an 80x24 screen, a label cut short,
a colour lost). Each is ``App.export_screenshot`` (Textual's public API) of a screen fed by a recorded profile
on a frozen clock, so it changes only when the layout, the text or the styles do. To accept an intended
change: look at the pictures (tests/ui/snapshots/*.svg, and the new one the failure names), then rerun with
BLIPMON_SNAPSHOT_UPDATE=1 and commit tests/ui/snapshots/ (docs/testing.md).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from recorded import FrozenClock, gpu_events, write_run
from ui_helpers import check_snapshot, screenshot

from blipmon.core.replay import ReplaySource
from blipmon.runner.follow import FileFollowSource
from blipmon.ui.app import BlipmonApp
from blipmon.ui.compare import CompareScreen
from blipmon.ui.launcher import LauncherScreen
from blipmon.ui.live import RunScreen

SIZES = [(80, 24), (120, 40)]  # the smallest terminal the dashboard is laid out for, and a roomy one


def shot(app: BlipmonApp, size: tuple[int, int], ready: Any = None) -> str:
    async def main() -> str:
        async with app.run_test(size=size) as pilot:
            for _ in range(80):
                await pilot.pause(0.05)
                if ready is None or ready(pilot.app):
                    break
            await pilot.pause()
            return screenshot(pilot.app)

    return asyncio.run(main())


def _name(view: str, size: tuple[int, int]) -> str:
    return f"{view}_{size[0]}x{size[1]}"


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_replay_gpu_oom(gpu_run: Path, clock: FrozenClock, snapshot_update: bool, size: tuple[int, int]) -> None:
    src = ReplaySource(gpu_run, clock=clock, background=False)
    src.seek_fraction(1.0)
    check_snapshot(_name("replay_gpu_oom", size), shot(BlipmonApp(RunScreen(src)), size), size, snapshot_update)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_replay_gpu_midway(gpu_run: Path, clock: FrozenClock, snapshot_update: bool, size: tuple[int, int]) -> None:
    src = ReplaySource(gpu_run, speed=4.0, clock=clock, background=False)
    src.seek_to(8.0)
    src.toggle_pause()
    check_snapshot(_name("replay_gpu_midway", size), shot(BlipmonApp(RunScreen(src)), size), size, snapshot_update)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_attach_cpu_run(cpu_run: Path, snapshot_update: bool, size: tuple[int, int]) -> None:
    app = BlipmonApp(RunScreen(FileFollowSource(cpu_run, mode="attach")))
    check_snapshot(_name("attach_cpu", size), shot(app, size), size, snapshot_update)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_compare(tmp_path: Path, gpu_run: Path, cpu_run: Path, snapshot_update: bool, size: tuple[int, int]) -> None:
    other = write_run(tmp_path / "other", gpu_events(oom_step=None, steps=5))
    app = BlipmonApp(CompareScreen([gpu_run, other, cpu_run], standalone=True))
    svg = shot(app, size, ready=lambda a: bool(getattr(a.screen, "runs", None)))
    check_snapshot(_name("compare", size), svg, size, snapshot_update)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_launcher(
    gpu_run: Path, cpu_run: Path, snapshot_update: bool, size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # From the folder holding profiles/, as a user starts it: the list names "profiles/", the same on every machine.
    monkeypatch.chdir(gpu_run.parent.parent)
    app = BlipmonApp(LauncherScreen(Path(gpu_run.parent.name)))
    svg = shot(app, size, ready=lambda a: len(getattr(a.screen, "runs", [])) == 2)
    check_snapshot(_name("launcher", size), svg, size, snapshot_update)
