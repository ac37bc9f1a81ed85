"""Coming back to a sweep: ``blipmon attach`` / ``replay`` on a sweep folder, and the launcher's saved sweeps.

A sweep folder written by hand checks the finished cases (replay, attach after the end) and the
launcher quickly and deterministically. Stand-in processes whose command line reads ``... blipmon
sweep`` (a Python sleeping, with those two words as arguments) check the pid rules without running
a sweep: an unrelated process is never signalled, a reused pid is not taken for the sweep, the real
one is stopped with SIGTERM. One real sweep of tiny configurations (``LiveSweep``, CPU, the slow
mark) checks the whole path: attached, left without stopping it, attached again and stopped.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from recorded import gpu_events, write_doc, write_run
from textual.widgets import OptionList
from ui_helpers import compared, screen_text, wait_until
from ui_helpers import drive as _drive

from blipmon import cli
from blipmon.runner.sweep_control import (
    AttachedSweep,
    LiveSweep,
    NotTheSweep,
    is_sweep_cmdline,
    list_sweeps,
    sweep_alive,
    sweep_process,
)
from blipmon.ui.app import BlipmonApp
from blipmon.ui.dialogs import ChoiceScreen
from blipmon.ui.launcher import LauncherScreen
from blipmon.ui.live import RunScreen
from blipmon.ui.sweep import SweepResult, SweepScreen


def drive(app: BlipmonApp, script: Callable[[Any], Awaitable[None]], size: tuple[int, int] = (110, 30)) -> Any:
    return _drive(app, script, size)


def footer(app: Any) -> str:
    return screen_text(app).splitlines()[-1]


# -- folders and processes ----------------------------------------------------------------------------


def _ending(status: str, code: int) -> list[dict[str, Any]]:
    return [{"type": "end", "t": 9.1, "status": status, "code": code}, {"type": "exit", "t": None, "code": code}]


FINISHED = [
    ("ok-run", "ok", "a-ok", 12.0, None),
    ("oom-run", "oom", "b-oom", 10.0, None),
    ("gpu-only", "refused", None, None, "this configuration needs an NVIDIA GPU"),
    ("stopped-run", "stopped", "d-stopped", 10.0, None),
    ("later", "not run", None, None, None),
]
RUNNING = [
    ("ok-run", "ok", "a-ok", 12.0, None),
    ("current", "running", "f-running", None, None),
    ("next", "pending", None, None, None),
]


def sweep_folder(root: Path, configs: list[tuple[Any, ...]] = FINISHED, *, finished: bool = True, **extra: Any) -> Path:
    d = root / "20261123T140000-sweep"
    unfinished = gpu_events(oom_step=None, finished=False)
    write_run(d / "a-ok", gpu_events(oom_step=None))
    write_run(d / "b-oom", gpu_events(oom_step=4))
    write_run(d / "d-stopped", unfinished[:40] + _ending("stopped", 4))
    write_run(d / "f-running", unfinished[:70])
    write_doc(d, configs, finished=finished, **extra)
    return d


def _python_sleeping(*words: str) -> subprocess.Popen[bytes]:
    """A process that sleeps; ``words`` end up on its command line (``blipmon sweep`` makes it look like one)."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", *words],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def processes() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts stand-in processes and ends each of them (by its own handle) after the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*words: str) -> subprocess.Popen[bytes]:
        proc = _python_sleeping(*words)
        started.append(proc)
        time.sleep(0.3)  # its command line is set once the interpreter has started
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# -- the pid rules ----------------------------------------------------------------------------------


def test_a_sweep_command_line_is_blipmon_then_sweep() -> None:
    assert is_sweep_cmdline(["/usr/bin/python3", "-m", "blipmon", "sweep", "--out", "x", "--announce", "--", "tiny/"])
    assert is_sweep_cmdline(["/venv/bin/python", "/venv/bin/blipmon", "sweep", "h100/"])
    assert not is_sweep_cmdline(["vim", "blipmon/commands/sweep.py"])
    assert not is_sweep_cmdline(["python", "-m", "blipmon", "attach", "profiles/2026-sweep"])
    assert not is_sweep_cmdline(["python", "-m", "pytest", "tests/ui/test_sweep_attach.py"])
    assert not is_sweep_cmdline([])


def test_an_unrelated_process_on_the_pid_is_never_signalled(tmp_path: Path, processes: Any) -> None:
    other = processes()  # a process that is not a sweep holds the pid sweep.json names
    d = sweep_folder(tmp_path, RUNNING, finished=False, pid=other.pid, started=time.time())
    control = AttachedSweep(d)
    with pytest.raises(NotTheSweep, match="no longer this sweep") as err:
        control.stop()
    assert err.value.gone
    assert control.stops == 0
    time.sleep(0.2)
    assert other.poll() is None  # still sleeping: nothing was sent to it
    assert not control.running()  # and the sweep is taken as ended
    assert control.poll() == 4  # what sweep.json recorded: a configuration never ran


def test_a_reused_pid_is_not_the_sweep_even_with_a_sweep_command_line(tmp_path: Path, processes: Any) -> None:
    later = processes("blipmon", "sweep")  # started long after the sweep's recorded start
    d = sweep_folder(tmp_path, RUNNING, finished=False, pid=later.pid, started=time.time() - 3600)
    with pytest.raises(NotTheSweep, match="reused"):
        AttachedSweep(d).stop()
    assert later.poll() is None


def test_a_sweep_on_another_host_or_with_no_pid_is_followed_but_never_signalled(tmp_path: Path) -> None:
    d = sweep_folder(tmp_path, RUNNING, finished=False, pid=1, hostname="some-other-host")
    with pytest.raises(NotTheSweep, match="some-other-host") as err:
        sweep_process(json.loads((d / "sweep.json").read_text()))
    assert not err.value.gone
    assert AttachedSweep(d).running()  # cannot tell: keep following sweep.json
    write_doc(d, RUNNING, finished=False)
    assert sweep_alive(json.loads((d / "sweep.json").read_text()))
    with pytest.raises(NotTheSweep, match="names no process"):
        AttachedSweep(d).stop()


def test_the_sweep_itself_is_stopped_with_sigterm(tmp_path: Path, processes: Any) -> None:
    sweep = processes("blipmon", "sweep")
    d = sweep_folder(tmp_path, RUNNING, finished=False, pid=sweep.pid, started=time.time())
    control = AttachedSweep(d)
    assert control.running() and control.poll() is None
    control.stop()
    assert control.stops == 1
    assert sweep.wait(timeout=10) == -signal.SIGTERM
    assert not control.running()  # gone (a zombie until reaped counts as gone too)


# -- the sweep view on a sweep folder -----------------------------------------------------------------


def test_replay_of_a_finished_sweep_shows_the_final_queue_and_compares_on_c(tmp_path: Path) -> None:
    d = sweep_folder(tmp_path)
    app = BlipmonApp(SweepScreen(d, replay=True, speed=4.0))

    async def script(pilot: Any) -> None:
        screen = pilot.app.screen
        for _ in range(5):
            await pilot.pause(0.05)
        assert pilot.app.screen is screen  # no comparison pushed over the queue the user asked for
        text = screen_text(pilot.app)
        assert "[replay]" in text and "done in 100.00 s" in text
        assert [r.status for r in screen.state.rows] == ["ok", "oom", "refused", "stopped", "not run"]
        keys = footer(pilot.app)
        assert "compare" in keys and "open run" in keys
        assert "stop sweep" not in keys and "live view" not in keys
        await pilot.press("enter")  # the first row: its replay, at the sweep's replay speed
        await pilot.pause()
        assert isinstance(pilot.app.screen, RunScreen) and pilot.app.screen.mode == "replay"
        await pilot.press("q")
        await pilot.pause()
        await pilot.press("c")
        await wait_until(pilot, lambda: compared(pilot.app), "the comparison")
        assert [r.status for r in pilot.app.screen.runs] == ["ok", "oom", "refused", "stopped"]
        await pilot.press("q")
        await pilot.pause()
        assert pilot.app.screen is screen
        await pilot.press("q")  # leaves at once: nothing to stop
        await pilot.pause()

    result = drive(app, script)
    assert isinstance(result, SweepResult) and result.code == 4 and not result.left_running


def test_attach_on_a_sweep_that_has_ended_shows_it_finished(tmp_path: Path) -> None:
    # sweep.json was left unfinished with a row running (the sweep was SIGKILLed), and its pid is gone.
    gone = _python_sleeping()
    gone.kill()
    gone.wait()
    d = sweep_folder(tmp_path, [("ok-run", "ok", "a-ok", 12.0, None), ("current", "running", "d-stopped", None, None),
                                ("next", "pending", None, None, None)], finished=False, pid=gone.pid)  # fmt: skip
    control = AttachedSweep(d)
    app = BlipmonApp(SweepScreen(d, control))

    async def script(pilot: Any) -> None:
        screen = pilot.app.screen
        await pilot.pause(0.1)
        assert pilot.app.screen is screen
        text = screen_text(pilot.app)
        assert "[attached]" in text and "done" in text and "ETA" not in text
        assert "running" not in [r.status for r in screen.state.rows]  # what its run recorded instead
        assert screen.state.rows[1].status == "stopped"
        assert "stop sweep" not in footer(pilot.app) and "live view" not in footer(pilot.app)
        await pilot.press("q")
        await pilot.pause()

    result = drive(app, script)
    assert isinstance(result, SweepResult) and not result.left_running


def test_stop_from_an_attached_view_asks_then_signals_only_the_sweep(tmp_path: Path, processes: Any) -> None:
    sweep = processes("blipmon", "sweep")
    d = sweep_folder(tmp_path, RUNNING, finished=False, pid=sweep.pid, started=time.time())
    control = AttachedSweep(d)
    app = BlipmonApp(SweepScreen(d, control, refresh=0.2))

    async def script(pilot: Any) -> None:
        screen = pilot.app.screen
        assert "[attached]" in screen_text(pilot.app) and "stop sweep" in footer(pilot.app)
        await pilot.press("s")
        assert isinstance(pilot.app.screen, ChoiceScreen)
        await pilot.press("n")
        await pilot.pause(0.3)
        assert control.stops == 0 and sweep.poll() is None
        await pilot.press("s", "y")
        assert control.stops == 1
        assert sweep.wait(timeout=10) == -signal.SIGTERM
        # Its process gone, the sweep is over; it was seen going, so the comparison opens by itself.
        await wait_until(pilot, lambda: compared(pilot.app), "the comparison", timeout=30)
        await pilot.press("q")
        await pilot.pause()
        assert pilot.app.screen is screen and "stop sweep" not in footer(pilot.app)
        await pilot.press("q")
        await pilot.pause()

    drive(app, script)


def test_stop_from_an_attached_view_says_why_when_the_pid_cannot_be_checked(tmp_path: Path) -> None:
    d = sweep_folder(tmp_path, RUNNING, finished=False, pid=1, hostname="some-other-host")
    control = AttachedSweep(d)
    app = BlipmonApp(SweepScreen(d, control))

    async def script(pilot: Any) -> None:
        screen = pilot.app.screen
        said: list[str] = []
        screen.notify = lambda message, **_: said.append(str(message))
        await pilot.press("s", "y")
        await pilot.pause()
        assert control.stops == 0
        assert any("not stopped" in m and "some-other-host" in m for m in said), said
        await pilot.press("q")  # attached: leaving never asks, the sweep goes on
        await pilot.pause()
        assert pilot.app.screen is not screen

    result = drive(app, script)
    assert isinstance(result, SweepResult) and result.left_running and result.code is None


# -- the command line ---------------------------------------------------------------------------------


@pytest.fixture
def dispatched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []
    for name in ("run_attach", "run_sweep_attach"):
        monkeypatch.setattr(f"blipmon.ui.app.{name}", lambda p, _n=name: calls.append((_n, Path(p))) or 0)
    for name in ("run_replay", "run_sweep_replay"):
        monkeypatch.setattr(f"blipmon.ui.app.{name}", lambda p, s, _n=name: calls.append((_n, Path(p), s)) or 0)
    return calls


def test_attach_and_replay_dispatch_on_what_the_folder_is(
    tmp_path: Path, dispatched: list[tuple[Any, ...]], capsys: pytest.CaptureFixture[str]
) -> None:
    d = sweep_folder(tmp_path)
    run = d / "a-ok"
    assert cli.main(["attach", str(d)]) == 0
    assert cli.main(["replay", str(d), "--speed", "4"]) == 0
    assert cli.main(["attach", str(run)]) == 0
    assert cli.main(["replay", str(run)]) == 0
    assert dispatched == [
        ("run_sweep_attach", d),
        ("run_sweep_replay", d, 4.0),
        ("run_attach", run),
        ("run_replay", run, 1.0),
    ]
    neither = tmp_path / "notes"
    neither.mkdir()
    (neither / "notes.md").write_text("hi")
    broken = tmp_path / "broken-sweep"
    broken.mkdir()
    (broken / "sweep.json").write_text("{not json")
    for cmd in ("attach", "replay"):
        capsys.readouterr()
        assert cli.main([cmd, str(neither)]) == 2
        assert "not a blipmon run or sweep (no events.jsonl or sweep.json in it)" in capsys.readouterr().err
        assert cli.main([cmd, str(tmp_path / "nope")]) == 2
        assert "no such run directory" in capsys.readouterr().err
        assert cli.main([cmd, str(broken)]) == 2
        assert "sweep.json cannot be read" in capsys.readouterr().err
    assert len(dispatched) == 4  # none of those opened anything


def test_replay_of_a_sweep_still_running_follows_it(
    tmp_path: Path, processes: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from blipmon.ui import app as app_module

    opened: list[Any] = []
    monkeypatch.setattr(app_module.BlipmonApp, "run", lambda self: opened.append(self.first))
    sweep = processes("blipmon", "sweep")
    d = sweep_folder(tmp_path, RUNNING, finished=False, pid=sweep.pid, started=time.time())
    assert app_module.run_sweep_replay(d, 2.0) == 0
    assert isinstance(opened[-1], SweepScreen) and opened[-1].mode == "attached"
    assert "still running" in capsys.readouterr().err
    finished = sweep_folder(tmp_path / "done")
    assert app_module.run_sweep_replay(finished, 2.0) == 0
    assert opened[-1].mode == "replay" and opened[-1].speed == 2.0
    assert app_module.run_sweep_attach(finished) == 0
    assert opened[-1].mode == "attached"


def test_leaving_a_live_sweep_running_says_how_to_come_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from blipmon.ui import app as app_module

    d = sweep_folder(tmp_path, RUNNING, finished=False)

    class StillGoing:
        pid = 4242
        sweep_dir = d

        def __init__(self, *_: Any) -> None:
            pass

        def poll(self) -> int | None:
            return None

    monkeypatch.setattr("blipmon.runner.sweep_control.LiveSweep", StillGoing)
    monkeypatch.setattr(app_module.BlipmonApp, "run", lambda self: SweepResult(None, left_running=True, sweep_dir=d))
    assert app_module.run_sweep_live(["tiny/"], [], tmp_path) == 0
    out = capsys.readouterr()
    assert f"`blipmon attach {d}`" in out.err and out.out.strip() == str(d)


# -- the launcher -----------------------------------------------------------------------------------


def _highlight(pilot: Any, oid: str) -> None:
    ol = pilot.app.screen.query_one(OptionList)
    ids = [ol.get_option_at_index(i).id for i in range(ol.option_count)]
    ol.highlighted = ids.index(oid)


def test_the_launcher_lists_sweeps_and_opens_one_in_the_sweep_view(tmp_path: Path) -> None:
    root = tmp_path / "profiles"
    d = sweep_folder(root)
    sweeps = list_sweeps(root)
    assert [s.path for s in sweeps] == [d] and not sweeps[0].running
    assert sweeps[0].summary == "1 ok · 1 oom · 1 refused · 1 stopped · 1 not run"
    app = BlipmonApp(LauncherScreen(root))

    async def script(pilot: Any) -> None:
        launcher = pilot.app.screen
        await wait_until(pilot, lambda: bool(launcher.sweeps) and bool(launcher.runs), "the saved sweeps", 30)
        await pilot.pause()
        ol = launcher.query_one(OptionList)
        ids = [ol.get_option_at_index(i).id for i in range(ol.option_count)]
        assert ids.index("group:sweeps") + 1 == ids.index(f"sweep:{d}") < ids.index("group:runs")
        _highlight(pilot, f"sweep:{d}")
        await pilot.pause()
        assert "enter opens its queue" in screen_text(pilot.app)
        await pilot.press("r")  # a sweep is not a configuration to run
        await pilot.pause()
        assert pilot.app.screen is launcher
        await pilot.press("enter")
        await pilot.pause()
        screen = pilot.app.screen
        assert isinstance(screen, SweepScreen) and screen.mode == "replay"
        await pilot.press("q")
        await pilot.pause()
        assert pilot.app.screen is launcher

    drive(app, script, size=(110, 40))


# -- a real sweep -----------------------------------------------------------------------------------


@pytest.fixture
def sweep_env(monkeypatch: pytest.MonkeyPatch, tiny_models: Any, tmp_path: Path) -> Path:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


@pytest.mark.slow
def test_a_real_sweep_attached_left_running_then_attached_again_and_stopped(sweep_env: Path) -> None:
    live = LiveSweep(["tiny/blip2-opt", "tiny/blip2-opt"], ["train.max_epochs=1000"], sweep_env / "out")
    try:
        doc = json.loads((live.sweep_dir / "sweep.json").read_text())
        assert doc["pid"] == live.pid and isinstance(doc["hostname"], str)

        def stepping(screen: SweepScreen) -> bool:
            cur = screen.state.current if screen.state else None
            return cur is not None and cur.steps.split("/")[0] not in ("—", "0")

        async def leave_it(pilot: Any) -> None:
            screen = pilot.app.screen
            await wait_until(pilot, lambda: stepping(screen), "the first run's first step")
            text = screen_text(pilot.app)
            assert "[attached]" in text and "stop sweep" in footer(pilot.app)
            await pilot.press("q")  # attached: leaves at once, never asks, never stops it
            await pilot.pause()

        first = drive(BlipmonApp(SweepScreen(live.sweep_dir, AttachedSweep(live.sweep_dir), refresh=0.2)), leave_it)
        assert isinstance(first, SweepResult) and first.left_running
        assert live.running() and live.stops == 0

        control = AttachedSweep(live.sweep_dir)

        async def stop_it(pilot: Any) -> None:
            screen = pilot.app.screen
            await wait_until(pilot, lambda: stepping(screen), "the run going on")
            await pilot.press("s")
            assert isinstance(pilot.app.screen, ChoiceScreen)
            await pilot.press("y")
            assert control.stops == 1
            await wait_until(pilot, lambda: compared(pilot.app), "the comparison")
            assert [r.status for r in pilot.app.screen.runs] == ["stopped"]
            await pilot.press("q")
            await pilot.pause()
            assert [r.status for r in screen.state.rows] == ["stopped", "not run"]
            await pilot.press("q")
            await pilot.pause()

        drive(BlipmonApp(SweepScreen(live.sweep_dir, control, refresh=0.2)), stop_it)
        assert live.wait(timeout=60) == 4  # stopped by its pid, exactly as Ctrl-C would
    finally:
        if live.running():
            live.stop()
            live.stop()
            live.wait(timeout=60)
