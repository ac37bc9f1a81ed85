"""The sweep view: its queue, the current run's live view, stopping, and the comparison at the end.

Two kinds of test. A sweep folder written by hand (every status at once, a frozen clock) checks
what the queue shows, deterministically and fast. Real sweeps (``blipmon sweep --announce`` started
by ``LiveSweep``, tiny models on the CPU, two steps) check the whole path as a user takes it:
started, followed, a run opened, stopped, and compared at the end.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from recorded import gpu_events, write_doc, write_run
from support import BROKEN, NEEDS_GPU
from textual.widgets import DataTable, OptionList
from ui_helpers import compared, screen_text, wait_until
from ui_helpers import drive as _drive

from blipmon.core.config import ConfigError
from blipmon.core.errors import LaunchError
from blipmon.runner.sweep_control import LiveSweep, sweep_command
from blipmon.runner.sweep_follow import SweepFollower
from blipmon.ui.app import BlipmonApp
from blipmon.ui.dialogs import ChoiceScreen
from blipmon.ui.launcher import LauncherScreen
from blipmon.ui.live import RunScreen
from blipmon.ui.sweep import SweepResult, SweepScreen


def drive(app: BlipmonApp, script: Callable[[Any], Awaitable[None]], size: tuple[int, int] = (100, 30)) -> Any:
    return _drive(app, script, size)


def statuses(screen: SweepScreen) -> list[str]:
    return [r.status for r in screen.state.rows] if screen.state else []


# -- a sweep folder written by hand -----------------------------------------------------------------


def _ending(status: str, code: int, message: str | None = None) -> list[dict[str, Any]]:
    ev: list[dict[str, Any]] = []
    if message:
        ev.append({"type": "error", "t": 9.0, "message": message})
    ev += [{"type": "end", "t": 9.1, "status": status, "code": code}, {"type": "exit", "t": None, "code": code}]
    return ev


def _sweep_folder(root: Path) -> Path:
    d = root / "20261123T140000-sweep"
    unfinished = gpu_events(oom_step=None, finished=False)
    write_run(d / "a-ok", gpu_events(oom_step=None))
    write_run(d / "b-oom", gpu_events(oom_step=4))
    write_run(d / "c-error", unfinished[:30] + _ending("error", 1, "ValueError: model_type 'gpt2' is not supported"))
    write_run(d / "d-stopped", unfinished[:40] + _ending("stopped", 4))
    write_run(d / "f-running", unfinished[:70])
    configs = [
        ("ok-run", "ok", "a-ok", 12.0, None),
        ("oom-run", "oom", "b-oom", 10.0, None),
        ("error-run", "error", "c-error", 8.0, None),
        ("stopped-run", "stopped", "d-stopped", 10.0, None),
        ("gpu-only", "refused", None, None, "this configuration needs an NVIDIA GPU"),
        ("current", "running", "f-running", None, None),
        ("next", "pending", None, None, None),
        ("later", "pending", None, None, None),
    ]
    write_doc(d, configs, finished=False)
    return d


def test_the_queue_shows_every_status_progress_peak_elapsed_and_eta(tmp_path: Path) -> None:
    d = _sweep_folder(tmp_path)
    follower = SweepFollower(d, ended=lambda: False, clock=lambda: 1040.0)
    state = follower.poll()
    assert [r.status for r in state.rows] == [
        "ok", "oom", "error", "stopped", "refused", "running", "queued", "queued",
    ]  # fmt: skip
    rows = {r.name: r for r in state.rows}
    assert rows["ok-run"].steps == "6/6" and rows["ok-run"].peak is not None
    assert rows["oom-run"].note.startswith("out of memory at step 4 after_fwd")
    assert "not supported" in rows["error-run"].note
    assert "NVIDIA GPU" in rows["gpu-only"].note
    current = rows["current"]
    assert current.steps.endswith("/6") and current.peak is not None
    assert current.seconds == 40.0  # the run's header says it started at 1000.0; the clock says 1040.0
    assert state.elapsed == 40.0 and state.eta is not None and state.eta > 0  # two queued + the current one's rest
    assert not state.finished

    app = BlipmonApp(SweepScreen(d, follower=follower))

    async def script(pilot: Any) -> None:
        screen = pilot.app.screen
        text = screen_text(pilot.app)
        for word in ("ok", "oom", "error", "stopped", "refused", "running", "queued"):
            assert f" {word} " in text, word
        assert (
            "sweep of 8 configurations" in text
            and "[attached]" in text
            and "elapsed 40.00 s" in text
            and "ETA " in text
        )
        assert "5/8 done" in text  # the refused one is past too
        assert screen.selected().name == "current"  # the cursor starts on the running configuration
        footer = text.splitlines()[-1]
        for label in ("open run", "live view", "compare", "leave", "help"):
            assert label in footer
        assert "stop sweep" not in footer  # only a sweep this dashboard started can be stopped
        await pilot.press("l")  # the current run's live view
        assert isinstance(pilot.app.screen, RunScreen) and pilot.app.screen.mode == "attach"
        await pilot.press("q")
        await pilot.pause()
        assert pilot.app.screen is screen
        await pilot.press("up", "enter")  # a finished one (refused): nothing to open, says why
        assert pilot.app.screen is screen
        await pilot.press("up", "enter")  # stopped: opens as a replay
        await pilot.pause()
        assert isinstance(pilot.app.screen, RunScreen) and pilot.app.screen.mode == "replay"
        await pilot.press("q")
        await pilot.pause()
        # The sweep ends: the comparison opens on its own, on every run and the refused one.
        configs = [
            ("ok-run", "ok", "a-ok", 12.0, None),
            ("oom-run", "oom", "b-oom", 10.0, None),
            ("error-run", "error", "c-error", 8.0, None),
            ("stopped-run", "stopped", "d-stopped", 10.0, None),
            ("gpu-only", "refused", None, None, "this configuration needs an NVIDIA GPU"),
            ("current", "ok", "a-ok", 9.0, None),
            ("next", "not run", None, None, None),
            ("later", "not run", None, None, None),
        ]
        write_doc(d, configs, finished=True)
        screen.tick()
        await wait_until(pilot, lambda: compared(pilot.app), "the comparison")
        compare = pilot.app.screen
        assert len(compare.query_one(DataTable).columns) == 1 + 6  # not-run ones are left out
        await pilot.press("q")
        await pilot.pause()
        assert pilot.app.screen is screen
        text = screen_text(pilot.app)
        assert "done in 100.00 s" in text and "not run" in text
        await pilot.press("q")
        await pilot.pause()

    result = drive(app, script, size=(110, 30))
    assert isinstance(result, SweepResult) and result.code == 4  # a stopped run and configurations not run


def test_the_comparison_waits_while_a_run_is_open(tmp_path: Path) -> None:
    d = _sweep_folder(tmp_path)
    follower = SweepFollower(d, ended=lambda: False, clock=lambda: 1040.0)
    app = BlipmonApp(SweepScreen(d, follower=follower))

    async def script(pilot: Any) -> None:
        screen = pilot.app.screen
        await pilot.press("l")
        assert isinstance(pilot.app.screen, RunScreen)
        follower.ended = lambda: True  # the sweep process has gone
        screen.tick()
        await pilot.pause()
        assert isinstance(pilot.app.screen, RunScreen)  # not pushed over the run the user is watching
        await pilot.press("q")
        await wait_until(pilot, lambda: compared(pilot.app), "the comparison")

    drive(app, script)


# -- real sweeps ------------------------------------------------------------------------------------


@pytest.fixture
def sweep_env(monkeypatch: pytest.MonkeyPatch, tiny_models: Any, tmp_path: Path) -> Path:
    """The sweep's children see no GPU (so a GPU preset is refused on any machine) and use one thread."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


@pytest.mark.slow
def test_a_real_sweep_shows_its_queue_and_compares_at_the_end(sweep_env: Path) -> None:
    broken = sweep_env / "unsupported-checkpoint"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (sweep_env / "broken.toml").write_text(BROKEN.format(path=broken))
    (sweep_env / "gpu.toml").write_text(NEEDS_GPU)
    configs = ["tiny/blip2-opt", str(sweep_env / "broken.toml"), str(sweep_env / "gpu.toml")]
    live = LiveSweep(configs, ["train.max_steps=2"], sweep_env / "out")
    assert live.sweep_dir.parent == sweep_env / "out"
    app = BlipmonApp(SweepScreen(live.sweep_dir, live, refresh=0.2))
    seen: set[str] = set()

    async def script(pilot: Any) -> None:
        screen = pilot.app.screen

        def watch() -> bool:
            seen.update(statuses(screen))
            return screen.state is not None and screen.state.current is not None

        await wait_until(pilot, watch, "the first run")
        assert "stop sweep" in screen_text(pilot.app).splitlines()[-1]
        await pilot.press("l")  # the running run's live view, the ordinary RunScreen
        assert isinstance(pilot.app.screen, RunScreen) and pilot.app.screen.mode == "live"
        await pilot.press("q")  # leaving it never stops the run: the sweep owns it
        await pilot.pause()
        assert pilot.app.screen is screen

        def at_the_end() -> bool:
            seen.update(statuses(screen))
            return compared(pilot.app)

        await wait_until(pilot, at_the_end, "the comparison at the end")
        names = [r.name for r in pilot.app.screen.runs]
        assert names == ["tiny/blip2-opt", "mini/broken", "mini/gpu-only"]
        assert [r.status for r in pilot.app.screen.runs] == ["ok", "error", "refused"]
        await pilot.press("q")
        await pilot.pause()
        assert statuses(screen) == ["ok", "error", "refused"]
        rows = screen.state.rows
        assert rows[0].steps == "2/2" and rows[0].peak and rows[0].seconds
        assert "not supported" in rows[1].note
        assert "stop sweep" not in screen_text(pilot.app).splitlines()[-1]
        await pilot.press("q")
        await pilot.pause()

    result = drive(app, script)
    assert {"running", "queued", "refused", "ok", "error"} <= seen
    assert isinstance(result, SweepResult) and result.code == 1  # error outranks refused
    doc = json.loads((live.sweep_dir / "sweep.json").read_text())
    assert doc["finished"] and doc["pid"] == live.pid
    assert "sweep done" in (live.sweep_dir / "sweep.log").read_text()


@pytest.mark.slow
def test_stopping_a_real_sweep_asks_then_stops_and_compares_what_ran(sweep_env: Path) -> None:
    live = LiveSweep(["tiny/blip2-opt", "tiny/blip2-opt"], ["train.max_epochs=1000"], sweep_env / "out")
    app = BlipmonApp(SweepScreen(live.sweep_dir, live, refresh=0.2))

    async def script(pilot: Any) -> None:
        screen = pilot.app.screen

        def stepping() -> bool:
            cur = screen.state.current if screen.state else None
            return cur is not None and cur.steps.split("/")[0] not in ("—", "0")

        await wait_until(pilot, stepping, "the first run's first step")
        await pilot.press("s")
        assert isinstance(pilot.app.screen, ChoiceScreen)
        await pilot.press("n")
        assert live.stops == 0 and live.running()
        await pilot.press("s", "y")
        assert live.stops == 1
        await wait_until(pilot, lambda: compared(pilot.app), "the comparison")
        assert [r.status for r in pilot.app.screen.runs] == ["stopped"]
        await pilot.press("q")
        await pilot.pause()
        assert statuses(screen) == ["stopped", "not run"]
        await pilot.press("q")
        await pilot.pause()

    result = drive(app, script)
    assert isinstance(result, SweepResult) and result.code == 4 and not result.left_running


def test_a_sweep_that_cannot_start_says_why(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="no-such/preset"):
        LiveSweep(["no-such/preset"], [], tmp_path / "out")


def test_the_sweep_command_is_an_argument_list() -> None:
    cmd = sweep_command(["tiny/", "-odd.toml"], ["train.max_steps=2"], Path("runs"))
    assert cmd[1:4] == ["-m", "blipmon", "sweep"]
    assert cmd[4:] == ["--out", "runs", "--set", "train.max_steps=2", "--announce", "--", "tiny/", "-odd.toml"]
    assert sweep_command(["tiny/"])[4:6] == ["--out", "profiles"]


# -- the launcher -----------------------------------------------------------------------------------


class FakeSweep:
    """Stands in for ``LiveSweep``: records what it was asked to sweep, and a sweep folder to show."""

    started: list[tuple[list[str], Path | None]] = []
    owned = True  # started by the dashboard, as LiveSweep: leaving asks

    def __init__(self, configs: list[str], overrides: Any = (), out: Path | None = None) -> None:
        FakeSweep.started.append((list(configs), out))
        self.sweep_dir = _sweep_folder(Path(str(out)) / f"sweep-{len(FakeSweep.started)}")
        self.stops = 0

    def poll(self) -> int | None:
        return None

    def running(self) -> bool:
        return True

    def stop(self) -> None:
        self.stops += 1

    def wait(self, timeout: float | None = None) -> int | None:
        return None


def _highlight(pilot: Any, oid: str) -> None:
    ol = pilot.app.screen.query_one(OptionList)
    ids = [ol.get_option_at_index(i).id for i in range(ol.option_count)]
    ol.highlighted = ids.index(oid)


def test_launcher_sweeps_marked_presets_or_a_whole_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("blipmon.runner.sweep_control.LiveSweep", FakeSweep)
    FakeSweep.started = []
    root = tmp_path / "profiles"
    app = BlipmonApp(LauncherScreen(root))

    async def wait_sweep_screen(pilot: Any) -> SweepScreen:
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, SweepScreen), "the sweep view", timeout=30)
        return pilot.app.screen

    async def script(pilot: Any) -> None:
        launcher = pilot.app.screen
        footer = screen_text(pilot.app).splitlines()[-1]
        assert "sweep" in footer and "mark" in footer
        _highlight(pilot, "preset:tiny/blip2-t5")
        await pilot.pause()
        await pilot.press("space")
        _highlight(pilot, "preset:tiny/blip2-opt")
        await pilot.pause()
        await pilot.press("space")
        assert launcher.marked_presets == ["tiny/blip2-t5", "tiny/blip2-opt"]
        assert "✓ tiny/blip2-opt" in screen_text(pilot.app)
        await pilot.press("w")
        assert isinstance(pilot.app.screen, ChoiceScreen)
        text = screen_text(pilot.app)
        assert "the 2 marked presets" in text and "the whole group tiny/" in text
        await pilot.press("m")
        sweep = await wait_sweep_screen(pilot)
        assert FakeSweep.started[-1] == (["tiny/blip2-t5", "tiny/blip2-opt"], root)
        await pilot.press("q")  # still going: asks, and can leave it running
        assert isinstance(pilot.app.screen, ChoiceScreen)
        await pilot.press("l")
        await pilot.pause()
        assert pilot.app.screen is launcher and sweep.live.stops == 0
        assert launcher.marked_presets == []  # the marks went into that sweep
        _highlight(pilot, "preset:tiny/blip2-opt")
        await pilot.pause()
        await pilot.press("w", "g")
        await wait_sweep_screen(pilot)
        assert FakeSweep.started[-1] == (["tiny/"], root)
        await pilot.press("q", "s")  # stop, then leave
        await wait_until(pilot, lambda: pilot.app.screen is launcher, "back in the launcher", timeout=30)

    drive(app, script, size=(110, 40))
    assert len(FakeSweep.started) == 2


def test_launcher_sweep_of_a_preset_that_does_not_validate_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("blipmon.runner.sweep_control.LiveSweep", FakeSweep)

    def bad(configs: list[str], overrides: Any = None) -> Any:
        raise ConfigError("the sweep was not started:\n  tiny/x: broken")

    monkeypatch.setattr("blipmon.core.sweep.expand", bad)
    FakeSweep.started = []
    app = BlipmonApp(LauncherScreen(tmp_path / "profiles"))

    def errors() -> list[str]:
        # What the user is told (run_test hides toasts, so read the app's notifications, which the toasts show).
        return [str(n.message) for n in app._notifications if n.severity == "error"]

    async def script(pilot: Any) -> None:
        _highlight(pilot, "preset:tiny/blip2-opt")
        await pilot.pause()
        await pilot.press("w", "g")
        await wait_until(pilot, lambda: bool(errors()), "an error notification")
        # One error, and it is the reason validation gave: which preset, and what is wrong with it.
        [why] = errors()
        assert why.startswith("the sweep was not started:") and "tiny/x: broken" in why, why
        assert isinstance(pilot.app.screen, LauncherScreen)

    drive(app, script, size=(110, 40))
    assert FakeSweep.started == []


# -- blipmon sweep --live ---------------------------------------------------------------------------


def test_cli_sweep_live_validates_first_then_hands_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from blipmon import cli

    args = cli._parser().parse_args(["sweep", "tiny/", "--live", "--set", "train.max_steps=2", "--out", "runs"])
    assert args.live and args.configs == ["tiny/"] and not args.announce
    calls: list[tuple[Any, ...]] = []

    def fake(configs: list[str], overrides: list[str], out: Path | None, fmt: str = "table") -> int:
        calls.append((configs, overrides, out, fmt))
        return 3

    monkeypatch.setattr("blipmon.ui.app.run_sweep_live", fake)
    code = cli.main(["sweep", "tiny/blip2-opt", "--live", "--set", "train.max_steps=2", "--format", "markdown"])
    assert code == 3  # the sweep's own exit code
    assert calls == [(["tiny/blip2-opt"], ["train.max_steps=2"], None, "markdown")]
    # A typo is refused before anything starts or the dashboard opens (exit 2).
    assert cli.main(["sweep", "tiny/blip2-opt", "no-such/preset", "--live"]) == 2
    assert len(calls) == 1


def test_cli_sweep_live_refuses_a_bad_configuration_as_a_subprocess(run_cli: Any, tmp_path: Path) -> None:
    done = run_cli("sweep", "no-such/preset", "--live", "--out", tmp_path / "out")
    assert done.returncode == 2 and "no-such/preset" in done.stderr
    assert not (tmp_path / "out").exists()
