"""The launcher lists each saved run and sweep once, whatever symlinks ``profiles/`` holds (issue 16, item 11).

``iter_run_dirs`` looks one folder deep (sweep folders hold runs), so ``profiles/self -> .`` used to
list every run a second time as ``profiles/self/<run>``; a link to a run or to a sweep folder did
the same. Runs are now told apart by their real path, the path without a symlink is the one shown,
and a symlink loop lists nothing and breaks nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from recorded import gpu_events, write_doc, write_run
from textual.widgets import OptionList
from ui_helpers import drive, wait_until

from blipmon.core.listing import list_runs
from blipmon.runner.sweep_control import list_sweeps
from blipmon.ui.app import BlipmonApp
from blipmon.ui.launcher import LauncherScreen


def _profiles(tmp_path: Path) -> tuple[Path, list[Path], Path]:
    root = tmp_path / "profiles"
    runs = [write_run(root / name, gpu_events(steps=2, oom_step=None)) for name in ("run-a", "run-b")]
    sweep = root / "20260101T000000-sweep"
    runs.append(write_run(sweep / "cfg-1", gpu_events(steps=2, oom_step=None)))
    write_doc(sweep, [("tiny/blip2-opt", "ok", "cfg-1", 3.0, None)], finished=True)
    os.symlink(".", root / "self")  # profiles/self -> profiles
    os.symlink("run-a", root / "alias-a")  # a second name for a run
    os.symlink(sweep.name, root / "alias-sweep")  # and for a sweep folder
    os.symlink("loop-2", root / "loop-1")  # a loop
    os.symlink("loop-1", root / "loop-2")
    os.symlink("nowhere", root / "dangling")
    return root, runs, sweep


def test_list_runs_lists_each_run_once_by_its_own_path(tmp_path: Path) -> None:
    root, runs, _ = _profiles(tmp_path)
    listed = [e.path for e in list_runs(root)]
    assert sorted(listed) == sorted(runs)  # each once, and never through a link


def test_list_sweeps_lists_each_sweep_once(tmp_path: Path) -> None:
    root, _, sweep = _profiles(tmp_path)
    assert [s.path for s in list_sweeps(root)] == [sweep]


def test_launcher_shows_each_run_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, runs, sweep = _profiles(tmp_path)
    monkeypatch.chdir(tmp_path)
    app = BlipmonApp(LauncherScreen(root))

    def ids() -> list[str]:
        ol = app.screen.query_one("#configs", OptionList)
        return [ol.get_option_at_index(i).id or "" for i in range(ol.option_count)]

    async def script(pilot: Any) -> None:
        await wait_until(pilot, lambda: any(i.startswith("run:") for i in ids()), "the saved runs")
        assert sorted(i for i in ids() if i.startswith("run:")) == sorted(f"run:{p}" for p in runs)
        assert [i for i in ids() if i.startswith("sweep:")] == [f"sweep:{sweep}"]

    drive(app, script, size=(120, 60))
