"""The launcher's fit view (``f``): progress while the search runs, the result, a suggestion applied to the settings.

The search is the one thing replaced here: a scripted ``Search`` that yields the fit worker's events (the real
worker process is tested in tests/unit/test_fit_process.py), held between its progress and its result so the test
can see the view answer keys while a search is still running.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input, OptionList
from ui_helpers import drive, screen_text, wait_until

from blipmon.ui import fit as fit_view
from blipmon.ui.app import BlipmonApp
from blipmon.ui.dialogs import HelpScreen
from blipmon.ui.fit import FitScreen
from blipmon.ui.launcher import LauncherScreen

RESULT = {
    "verdict": "oom",
    "peak_bytes": 3 * 1024**3,
    "gpu_memory_bytes": 2 * 1024**3,
    "max_batch_size": 3,
    "seconds": 4.2,
    "headroom_bytes": -(1024**3),
    "margin_bytes": 40 * 1024**2,
    "capacity_source": "given [red]x[/]",
    "device": "cuda",
    "batch_size": 8,
    "effective_batch": 8,
    "max_batch_note": "",
    "runs_out": "step 0 after_fwd (forward), short by 1.00 GiB there",
    "skipped": [{"changes": {"train.qlora": True}, "reason": "model.quantization = '8bit' [bold]no[/]"}],
    "estimates": 9,
    "notes": [],
    "name": "tiny/blip2-opt",
    "suggestions": [
        {
            "changes": {"train.batch_size": 2, "train.accumulate_grad_batches": 4},
            "peak_bytes": 1024**3,
            "verdict": "fits",
            "effective_batch": 8,
            "notes": ["micro-batch 2 with 4 accumulation steps keeps the effective batch of 8"],
            "headroom_bytes": 512 * 1024**2,
        },
        {
            "changes": {"train.act_ckpt": True},
            "peak_bytes": 1536 * 1024**2,
            "verdict": "tight",
            "effective_batch": 8,
            "notes": ["activation checkpointing [/] recomputes the forward"],
            "headroom_bytes": 20 * 1024**2,
        },
    ],
}


class ScriptedSearch:
    """Yields progress, waits for ``release``, then yields the last event; records ``stop``."""

    def __init__(self, last: dict[str, Any]) -> None:
        self.last = last
        self.release = threading.Event()
        self.stopped = threading.Event()
        self.cfg: dict[str, Any] | None = None

    def events(self) -> Iterator[dict[str, Any]]:
        yield {"progress": 1, "label": "as configured"}
        yield {"progress": 2, "label": "batch 3 [bold](as configured)"}
        while not self.release.wait(0.05):
            if self.stopped.is_set():
                return
        yield self.last

    def stop(self) -> None:
        self.stopped.set()
        self.release.set()


@pytest.fixture
def search(monkeypatch: pytest.MonkeyPatch) -> ScriptedSearch:
    s = ScriptedSearch({"result": RESULT, "assumed_card": False})

    def start(cfg: dict[str, Any]) -> ScriptedSearch:
        s.cfg = cfg
        return s

    monkeypatch.setattr(fit_view, "start_fit", start)
    return s


def _launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BlipmonApp:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BLIPMON_PREDICT", "0")
    return BlipmonApp(LauncherScreen(tmp_path / "profiles"), export_dir=tmp_path)


def _select(pilot: Any, oid: str) -> None:
    ol = pilot.app.screen.query_one("#configs", OptionList)
    ids = [ol.get_option_at_index(i).id for i in range(ol.option_count)]
    ol.highlighted = ids.index(oid)


def test_f_shows_progress_then_the_fit_and_enter_applies_a_suggestion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, search: ScriptedSearch
) -> None:
    async def script(pilot: Any) -> None:
        _select(pilot, "preset:tiny/blip2-opt")
        await pilot.pause()
        await pilot.press("f")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, FitScreen), "the fit view")
        await wait_until(pilot, lambda: "estimate 2" in screen_text(pilot.app), "progress")
        text = screen_text(pilot.app)
        assert "searching… estimate 2: batch 3 [bold](as configured)" in text  # shown as typed, never markup
        assert search.cfg is not None and search.cfg["name"] == "tiny/blip2-opt"
        await pilot.press("down")  # the interface answers while the search runs
        search.release.set()
        await wait_until(pilot, lambda: "largest" in screen_text(pilot.app), "the result")
        text = screen_text(pilot.app)
        assert "OUT OF MEMORY: runs out at step 0 after_fwd (forward)" in text
        assert "train.batch_size = 3 (4 does not fit)" in text
        assert "given [red]x[/]" in text
        assert "1. train.batch_size = 2, train.accumulate_grad_batches = 4" in text
        assert "FITS: peak 1.00 GiB, 512.00 MiB to spare, effective batch 8" in text
        assert "2. train.act_ckpt = true" in text and "TIGHT: peak 1.50 GiB" in text
        assert "activation checkpointing [/] recomputes the forward" in text
        assert "skipped   train.qlora=True: model.quantization = '8bit' [bold]no[/]" in text
        assert "9 estimates, 4.2 s" in text
        await pilot.press("down", "enter")  # the second suggestion
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, LauncherScreen), "back to the launcher")
        screen = pilot.app.screen
        assert screen.query_one("#set-train--act_ckpt", Input).value == "true"
        await pilot.pause()
        assert screen.valid_cfg is not None and screen.valid_cfg["train"]["act_ckpt"] is True
        assert "✓ valid (1 changed)" in screen_text(pilot.app)

    drive(_launcher(tmp_path, monkeypatch), script, size=(120, 44))


def test_the_first_suggestion_applies_several_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, search: ScriptedSearch
) -> None:
    search.release.set()

    async def script(pilot: Any) -> None:
        _select(pilot, "preset:tiny/blip2-opt")
        await pilot.pause()
        await pilot.press("f")
        await wait_until(pilot, lambda: "largest" in screen_text(pilot.app), "the result")
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, LauncherScreen), "back to the launcher")
        screen = pilot.app.screen
        await pilot.pause()
        assert screen.valid_cfg["train"]["batch_size"] == 2
        assert screen.valid_cfg["train"]["accumulate_grad_batches"] == 4
        assert "✓ valid (2 changed)" in screen_text(pilot.app)

    drive(_launcher(tmp_path, monkeypatch), script, size=(120, 44))


def test_escape_during_the_search_stops_it_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, search: ScriptedSearch
) -> None:
    async def script(pilot: Any) -> None:
        _select(pilot, "preset:tiny/blip2-opt")
        await pilot.pause()
        await pilot.press("f")
        await wait_until(pilot, lambda: "estimate 2" in screen_text(pilot.app), "progress")
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, LauncherScreen), "back to the launcher")
        assert search.stopped.is_set()
        assert pilot.app.screen.query_one("#set-train--batch_size", Input).value == "8"

    drive(_launcher(tmp_path, monkeypatch), script, size=(120, 44))


def test_an_error_is_shown_as_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = ScriptedSearch({"error": "train.optim = '[/]': expected one of ..."})
    s.release.set()
    monkeypatch.setattr(fit_view, "start_fit", lambda cfg: s)

    async def script(pilot: Any) -> None:
        _select(pilot, "preset:tiny/blip2-opt")
        await pilot.pause()
        await pilot.press("f")
        await wait_until(pilot, lambda: "could not be made" in screen_text(pilot.app), "the error")
        assert "the fit could not be made: train.optim = '[/]': expected one of ..." in screen_text(pilot.app)
        await pilot.press("enter")  # nothing to apply: the view stays
        assert isinstance(pilot.app.screen, FitScreen)
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, LauncherScreen), "back to the launcher")

    drive(_launcher(tmp_path, monkeypatch), script, size=(120, 44))


def test_fit_is_in_the_launchers_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def script(pilot: Any) -> None:
        assert "fit" in screen_text(pilot.app).splitlines()[-1]  # the footer
        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, HelpScreen), "the help")
        assert re.search(r"\sf\s+fit\s", screen_text(pilot.app))

    drive(_launcher(tmp_path, monkeypatch), script, size=(120, 44))
