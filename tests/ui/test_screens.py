"""Every screen driven through Textual's Pilot, pressing every key it shows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from recorded import FrozenClock, gpu_events, write_run
from textual.widgets import DataTable, Input, OptionList
from ui_helpers import drive, screen_text

from blipmon.core.replay import ReplaySource
from blipmon.runner.follow import FileFollowSource
from blipmon.ui.app import BlipmonApp
from blipmon.ui.compare import CompareScreen
from blipmon.ui.dialogs import ChoiceScreen, HelpScreen
from blipmon.ui.launcher import LauncherScreen
from blipmon.ui.live import RunResult, RunScreen


class FakeLive:
    """Stands in for ``LiveRun``: a run directory we write into, a stop that records ``stopped``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.pid = 4242
        self.code: int | None = None
        self.stops = 0

    def running(self) -> bool:
        return self.code is None

    def poll(self) -> int | None:
        return self.code

    def wait(self, timeout: float | None = None) -> int | None:
        return self.code

    def stop(self) -> None:
        self.stops += 1
        with open(self.run_dir / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"type": "end", "t": 30.0, "status": "stopped", "code": 4}) + "\n")
            fh.write(json.dumps({"type": "exit", "t": None, "code": 4, "signal": None}) + "\n")
        self.code = 4


def _live_app(tmp_path: Path, clock: FrozenClock) -> tuple[BlipmonApp, FakeLive]:
    d = write_run(tmp_path / "live", gpu_events(finished=False)[:60])
    live = FakeLive(d)
    return BlipmonApp(RunScreen(FileFollowSource(d, mode="live", clock=clock), live), export_dir=tmp_path), live


# -- live -------------------------------------------------------------------------------------------


def test_live_view_shows_header_timeline_phases_steps_and_log(tmp_path: Path, clock: FrozenClock) -> None:
    app, _ = _live_app(tmp_path, clock)

    async def script(pilot: Any) -> None:
        text = screen_text(pilot.app)
        assert "h100/reduced-batch" in text and "running" in text and "[live]" in text
        assert "GPU NVIDIA H100" in text and "step " in text
        assert "alloc 62.5G" in text and "GPU 80.0G" in text
        assert "before fwd" in text and "step time" in text and "loss" in text
        assert "[blipmon] loading" in text
        footer = text.splitlines()[-1]
        assert "stop run" in footer and "leave" in footer and "help" in footer
        assert "pause" not in footer  # replay keys only in a replay

    drive(app, script)


def test_live_stop_asks_then_records_stopped(tmp_path: Path, clock: FrozenClock) -> None:
    app, live = _live_app(tmp_path, clock)

    async def script(pilot: Any) -> None:
        await pilot.press("s")
        assert isinstance(pilot.app.screen, ChoiceScreen)
        await pilot.press("n")
        assert live.stops == 0
        await pilot.press("s")
        await pilot.press("y")
        assert live.stops == 1
        pilot.app.screen.tick()
        await pilot.pause()
        assert "stopped" in screen_text(pilot.app)
        await pilot.press("q")  # finished: leaves without asking
        await pilot.pause()

    result = drive(app, script)
    assert isinstance(result, RunResult) and result.code == 4 and not result.left_running


def test_live_leave_asks_and_can_leave_it_running(tmp_path: Path, clock: FrozenClock) -> None:
    app, live = _live_app(tmp_path, clock)

    async def script(pilot: Any) -> None:
        await pilot.press("q")
        await pilot.pause()
        assert isinstance(pilot.app.screen, ChoiceScreen)
        assert "still going" in screen_text(pilot.app)
        await pilot.press("escape")
        assert isinstance(pilot.app.screen, RunScreen)
        await pilot.press("q")
        await pilot.press("l")
        await pilot.pause()

    result = drive(app, script)
    assert result.left_running and live.stops == 0


def test_live_leave_can_stop_the_run(tmp_path: Path, clock: FrozenClock) -> None:
    app, live = _live_app(tmp_path, clock)

    async def script(pilot: Any) -> None:
        await pilot.press("ctrl+q")  # ctrl+q asks too: never stops a run behind the user's back
        assert isinstance(pilot.app.screen, ChoiceScreen)
        await pilot.press("s")
        for _ in range(50):
            await pilot.pause(0.05)
            if pilot.app.return_value is not None:
                break

    result = drive(app, script)
    assert live.stops == 1 and result.code == 4


def test_help_lists_every_key_of_the_view(tmp_path: Path, clock: FrozenClock) -> None:
    app, _ = _live_app(tmp_path, clock)

    async def script(pilot: Any) -> None:
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(pilot.app.screen, HelpScreen)
        text = screen_text(pilot.app)
        for key in ("s", "q/esc", "?", "ctrl+s"):
            assert f" {key} " in text
        await pilot.press("escape")
        assert isinstance(pilot.app.screen, RunScreen)

    drive(app, script)


def test_oom_banner(gpu_run: Path) -> None:
    app = BlipmonApp(RunScreen(FileFollowSource(gpu_run, mode="attach")))

    async def script(pilot: Any) -> None:
        text = screen_text(pilot.app)
        assert "OUT OF MEMORY at step 4, phase after_fwd, trying to allocate 20.00 GiB" in text
        assert "OOM" in text and "[attached]" in text
        assert "stop run" not in text.splitlines()[-1]  # attach never stops a run
        await pilot.press("q")
        await pilot.pause()

    result = drive(app, script)
    assert isinstance(result, RunResult)


def test_cpu_run_says_there_is_no_gpu_and_why(cpu_run: Path) -> None:
    app = BlipmonApp(RunScreen(FileFollowSource(cpu_run)))

    async def script(pilot: Any) -> None:
        text = screen_text(pilot.app)
        assert "CPU · no NVIDIA GPU" in text
        assert "no NVIDIA GPU: no NVIDIA GPU visible to torch" in text
        assert "host RSS" in text and "allocated" not in text.splitlines()[2]

    drive(app, script, size=(120, 40))


def test_ctrl_s_saves_an_svg(tmp_path: Path, gpu_run: Path) -> None:
    app = BlipmonApp(RunScreen(FileFollowSource(gpu_run)), export_dir=tmp_path)

    async def script(pilot: Any) -> None:
        await pilot.press("ctrl+s")
        await pilot.pause()

    drive(app, script)
    svgs = list(tmp_path.glob("blipmon-run-*.svg"))
    assert len(svgs) == 1 and svgs[0].read_text(encoding="utf-8").startswith("<svg")


# -- replay -----------------------------------------------------------------------------------------


def test_replay_keys(tmp_path: Path, clock: FrozenClock) -> None:
    run = write_run(tmp_path / "long", gpu_events(steps=30, oom_step=25))
    src = ReplaySource(run, clock=clock, background=False)
    app = BlipmonApp(RunScreen(src))

    async def script(pilot: Any) -> None:
        footer = screen_text(pilot.app).splitlines()[-1]
        for label in ("pause/play", "faster", "slower", "−10s", "+10s", "leave", "help"):
            assert label in footer
        start = src.position
        await pilot.press("space")
        assert src.paused
        await pilot.press("plus")
        assert src.speed == 2.0
        await pilot.press("minus", "minus")
        assert src.speed == 0.5
        await pilot.press("right")
        assert src.position == start + 10
        await pilot.press("left")
        assert src.position == start
        await pilot.press("end")
        assert src.position == src.duration
        await pilot.pause()
        assert "OUT OF MEMORY at step 25" in screen_text(pilot.app)
        await pilot.press("home")
        assert src.position == 0.0
        await pilot.press("pagedown")
        assert src.position == src.duration  # +1 min, clamped to the end
        await pilot.press("pageup")
        assert src.position == 0.0
        await pilot.press("question_mark")
        await pilot.pause()
        help_text = screen_text(pilot.app)
        assert "space" in help_text and "→" in help_text and "pageup" in help_text
        await pilot.press("q")
        await pilot.press("q")
        await pilot.pause()

    assert isinstance(drive(app, script), RunResult)


# -- compare ----------------------------------------------------------------------------------------


def test_compare_keys_and_exports(tmp_path: Path, gpu_run: Path, cpu_run: Path) -> None:
    other = write_run(tmp_path / "other", gpu_events(oom_step=None, steps=5))
    app = BlipmonApp(CompareScreen([gpu_run, other, cpu_run], standalone=True), export_dir=tmp_path)

    async def script(pilot: Any) -> None:
        for _ in range(40):
            await pilot.pause(0.05)
            if pilot.app.screen.runs:
                break
        screen = pilot.app.screen
        table = screen.query_one(DataTable)
        assert table.row_count >= 15 and len(table.columns) == 4
        text = screen_text(pilot.app)
        assert "★" in text and "%" in text
        assert screen.metric == "rss"  # one run has no allocator figures
        await pilot.press("v")
        assert screen.metric == "alloc"
        await pilot.press("t")
        assert screen.by_step
        await pilot.press("m")
        await pilot.press("x")
        await pilot.press("question_mark")
        assert isinstance(pilot.app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.press("q")
        await pilot.pause()

    assert drive(app, script, size=(120, 50)) == 0
    md = next(tmp_path.glob("blipmon-compare-*.md")).read_text(encoding="utf-8")
    csv = next(tmp_path.glob("blipmon-compare-*.csv")).read_text(encoding="utf-8")
    assert md.startswith("| ") and "peak allocated" in md
    assert csv.startswith("metric,") and "out of memory at" in csv


def test_compare_of_an_unreadable_run_says_why(tmp_path: Path, gpu_run: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    app = BlipmonApp(CompareScreen([gpu_run, bad], standalone=True))

    async def script(pilot: Any) -> None:
        for _ in range(40):
            await pilot.pause(0.05)
            if "cannot compare" in screen_text(pilot.app):
                break
        assert "cannot compare" in screen_text(pilot.app)

    drive(app, script)


# -- launcher ---------------------------------------------------------------------------------------


def _highlight(pilot: Any, prefix: str) -> None:
    ol = pilot.app.screen.query_one(OptionList)
    ids = [ol.get_option_at_index(i).id for i in range(ol.option_count)]
    ol.highlighted = next(i for i, x in enumerate(ids) if x and x.startswith(prefix))


@pytest.fixture
def launcher_app(tmp_path: Path, gpu_run: Path, cpu_run: Path, monkeypatch: pytest.MonkeyPatch) -> BlipmonApp:
    monkeypatch.chdir(tmp_path)
    return BlipmonApp(LauncherScreen(gpu_run.parent), export_dir=tmp_path)


async def _wait_runs(pilot: Any, n: int) -> None:
    for _ in range(60):
        await pilot.pause(0.05)
        if len(pilot.app.screen.runs) >= n:
            return
    raise AssertionError("saved runs did not load")


def test_launcher_lists_groups_presets_and_saved_runs(launcher_app: BlipmonApp) -> None:
    async def script(pilot: Any) -> None:
        await _wait_runs(pilot, 2)
        ol = pilot.app.screen.query_one(OptionList)
        ids = [ol.get_option_at_index(i).id for i in range(ol.option_count)]
        groups = [i for i in ids if i.startswith("group:")]
        assert groups[:5] == ["group:tiny", "group:h100", "group:a100", "group:load", "group:train"]
        runs = [i for i in ids if i.startswith("run:")]
        assert runs[0].endswith("h100-reduced-batch")  # newest first
        text = screen_text(pilot.app)
        assert "tiny/blip2-opt" in text and "✓ valid" in text and "estimate:" in text
        footer = text.splitlines()[-1]
        for label in ("run", "mark", "compare", "delete", "edit", "help", "quit"):
            assert label in footer

    drive(launcher_app, script, size=(100, 40))


def test_launcher_settings_validate_inline(launcher_app: BlipmonApp) -> None:
    async def script(pilot: Any) -> None:
        await pilot.press("e")
        inp = pilot.app.screen.query_one("#set-train--batch_size", Input)
        inp.value = "0"
        await pilot.pause()
        text = screen_text(pilot.app)
        assert "train.batch_size = 0: expected an integer >= 1" in text
        assert "✗ 1 problem" in text
        pilot.app.screen.action_run()  # refused while invalid (typing r here would go into the input)
        await pilot.pause()
        inp.value = "4"
        await pilot.pause()
        assert "✓ valid (1 changed)" in screen_text(pilot.app)
        assert pilot.app.screen.valid_cfg["train"]["batch_size"] == 4
        await pilot.press("escape")
        assert isinstance(pilot.app.focused, OptionList)

    drive(launcher_app, script, size=(100, 40))


def test_launcher_mark_compare_delete_open_help_quit(launcher_app: BlipmonApp, gpu_run: Path, cpu_run: Path) -> None:
    async def script(pilot: Any) -> None:
        await _wait_runs(pilot, 2)
        screen = pilot.app.screen
        await pilot.press("c")
        assert not isinstance(pilot.app.screen, CompareScreen)  # nothing marked yet
        _highlight(pilot, "preset:")
        await pilot.press("space")
        assert screen.marked == []
        _highlight(pilot, f"run:{gpu_run}")
        await pilot.pause()
        await pilot.press("space")
        _highlight(pilot, f"run:{cpu_run}")
        await pilot.pause()
        await pilot.press("space")
        assert screen.marked == [gpu_run, cpu_run]
        await pilot.press("c")
        assert isinstance(pilot.app.screen, CompareScreen)
        await pilot.press("q")
        await pilot.pause()
        _highlight(pilot, f"run:{cpu_run}")
        await pilot.pause()
        await pilot.press("enter")  # a saved run opens as a replay
        await pilot.pause()
        assert isinstance(pilot.app.screen, RunScreen) and pilot.app.screen.mode == "replay"
        await pilot.press("q")
        await pilot.pause()
        _highlight(pilot, f"run:{cpu_run}")
        await pilot.pause()
        await pilot.press("d")
        await pilot.press("n")
        assert cpu_run.exists()
        await pilot.press("d")
        await pilot.press("y")
        await pilot.pause()
        assert not cpu_run.exists()
        await pilot.press("question_mark")
        await pilot.pause()
        assert "mark" in screen_text(pilot.app)
        await pilot.press("escape")
        await pilot.press("q")
        await pilot.pause()

    drive(launcher_app, script, size=(100, 40))


def test_launcher_run_key_launches_and_shows_the_live_view(
    launcher_app: BlipmonApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[dict[str, Any]] = []

    class Live(FakeLive):
        def __init__(self, cfg: dict[str, Any], out: Path | None = None) -> None:
            started.append(cfg)
            super().__init__(write_run(tmp_path / "launched", gpu_events(finished=False)[:40]))

    monkeypatch.setattr("blipmon.runner.detached.LiveRun", Live)
    monkeypatch.setattr("blipmon.runner.preflight.preflight", lambda cfg: None)

    async def script(pilot: Any) -> None:
        _highlight(pilot, "preset:tiny/blip2-opt")
        await pilot.pause()
        await pilot.press("r")
        for _ in range(60):
            await pilot.pause(0.05)
            if isinstance(pilot.app.screen, RunScreen):
                break
        assert isinstance(pilot.app.screen, RunScreen) and pilot.app.screen.mode == "live"
        assert started[0]["name"] == "tiny/blip2-opt"
        await pilot.press("q")
        await pilot.press("l")
        await pilot.pause()
        assert isinstance(pilot.app.screen, LauncherScreen)

    drive(launcher_app, script, size=(100, 40))


def test_launcher_shows_the_estimate_of_the_selected_configuration(
    launcher_app: BlipmonApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLIPMON_PREDICT", "1")

    async def script(pilot: Any) -> None:
        await pilot.press("e")
        inp = pilot.app.screen.query_one("#set-train--batch_size", Input)
        inp.value = "2"  # a fresh valid configuration: the panel estimates it in a worker thread
        for _ in range(600):
            await pilot.pause(0.1)
            text = screen_text(pilot.app)
            if "FITS" in text or "OUT OF MEMORY" in text or "not available" in text:
                break
        # Batch 2 of the tiny model fits any card (without a GPU the launcher judges against the lab's).
        assert "estimate: FITS" in text, text

    drive(launcher_app, script, size=(120, 40))
