"""A dashboard command pauses the cyclic collector for its start-up, and the app runs it again after its first
frame (issue 17: ~3 % of the first frame). Only a pause the command line made is undone; tests that run the app
themselves keep their collector as it was."""

from __future__ import annotations

import argparse
import asyncio
import gc
from pathlib import Path

from recorded import gpu_events, write_run

from blipmon.cli import _opens_dashboard
from blipmon.core.replay import ReplaySource
from blipmon.ui.app import BlipmonApp
from blipmon.ui.live import RunScreen


def test_the_commands_that_open_the_dashboard() -> None:
    ns = argparse.Namespace
    assert _opens_dashboard("dashboard", ns()) and _opens_dashboard("replay", ns()) and _opens_dashboard("attach", ns())
    assert _opens_dashboard("run", ns(live=True)) and not _opens_dashboard("run", ns(live=False))
    assert _opens_dashboard("compare", ns(tui=True)) and not _opens_dashboard("compare", ns(tui=False))
    assert _opens_dashboard("sweep", ns(live=True))
    assert not _opens_dashboard("show", ns()) and not _opens_dashboard("estimate", ns())


def _first_frame(run_dir: Path) -> bool:
    """Whether the collector runs once the replay view's first frame is up."""

    async def main() -> bool:
        src = ReplaySource(run_dir)
        app = BlipmonApp(RunScreen(src))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await pilot.pause()
            enabled = gc.isenabled()
        src.close()
        return enabled

    return asyncio.run(main())


def test_the_app_resumes_a_paused_collector_after_its_first_frame(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", gpu_events())
    gc.disable()
    try:
        assert _first_frame(run_dir) is True
    finally:
        gc.enable()
        gc.unfreeze()


def test_a_collector_the_host_runs_is_left_alone(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", gpu_events())
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    assert _first_frame(run_dir) is True
    assert gc.get_freeze_count() == frozen  # nothing of the host's was frozen
