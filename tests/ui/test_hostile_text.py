"""Hostile text in every field the dashboard and ``show`` display (issue 16, items 2 and 3, and its bar).

A profile, a run folder, a ``sweep.json`` and a child's log are anyone's files. What they hold is shown
as text: Textual markup (``[/INST]``, ``[/]``, ``[b]``) is shown as typed, never interpreted (it used
to raise ``MarkupError`` and take the dashboard down, or eat ``[v2]`` out of a name); escape
sequences (``ESC ]0;…`` retitles the terminal, ``ESC [2J`` clears it) and other control characters
never reach the terminal; invalid UTF-8 never crashes anything.

The checks read what would be written to the terminal: the screen rendered by Textual's compositor
into ANSI, in which the only escape sequences allowed are the SGR colours and cursor moves the
renderer itself writes (``assert_clean``), and the screen's text (``screen_text``).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from recorded import FrozenClock, gpu_events, write_doc, write_run
from rich.console import Console
from textual.widgets import Input, OptionList
from ui_helpers import drive, screen_text, wait_until

from blipmon.core.replay import ReplaySource
from blipmon.core.report import render_compare, render_show
from blipmon.core.run import load_run
from blipmon.runner.follow import FileFollowSource
from blipmon.ui.app import BlipmonApp
from blipmon.ui.compare import CompareScreen
from blipmon.ui.dialogs import ChoiceScreen
from blipmon.ui.launcher import LauncherScreen
from blipmon.ui.live import RunScreen
from blipmon.ui.sweep import SweepScreen

# -- the hostile texts ---------------------------------------------------------------------------------
MARKUP = "[/INST] [b]bold[/b] [/] [red]x[/red] [@click=app.quit]q[/]"
OSC_TITLE = "\x1b]0;PWNED\x07"  # sets the terminal's title
OSC_TITLE_ST = "\x1b]0;PWNED2\x1b\\"  # the same, ended by ST
CLEAR = "\x1b[2J\x1b[H"  # clears the screen, cursor home
LINK = "\x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\"
C1 = "\x9b31m\x9d0;C1\x9c"  # 8-bit CSI / OSC / ST
BELL = "\x07\x08\x7f\x00"
ESCAPES = f"{OSC_TITLE}{OSC_TITLE_ST}{CLEAR}{LINK}{C1}{BELL}"
LONE = "\udcff\udc80"  # invalid UTF-8 as Python carries it (surrogateescape), or \udcff in a JSON string
HOSTILE = f"{MARKUP} {ESCAPES} {LONE}"
# ESCAPES as it must be shown, worked out by hand: whole sequences removed (the hyperlink's text stays),
# the 8-bit introducers and lone controls made visible (``\x9b``, caret notation as ``cat -v``).
ESCAPES_SHOWN = "click\\x9b31m\\x9d0;C1\\x9c^G^H\\x7f^@"
BAD_UTF8 = b"\xff\xfe\xc3\x28\xed\xa0\x80\xf0\x28\x8c"  # not UTF-8 at all

ERROR_MESSAGE = 'ValueError("prompt must end with [/INST] after the image")'

# What may appear in the ANSI the renderer writes: SGR colours/styles and cursor moves, nothing else.
_RENDERER_SEQ = re.compile(r"\x1b\[[0-9;:]*m|\x1b\[\d+;\d+H|\x1b\[\d*[ABCDGK]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_ansi(app: Any) -> str:
    """What the screen (dialogs and notifications included) writes to a terminal, as ANSI."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", legacy_windows=False, safe_box=False)  # fmt: skip
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.file.getvalue()  # type: ignore[attr-defined]


def assert_clean(text: str, where: str = "output", *, payload: bool = True) -> None:
    """No control character but newline, no escape sequence but the renderer's own, valid UTF-8.

    ``payload``: also no trace of the title and hyperlink sequences' contents (they are removed whole,
    not just defused; JSON keeps them, as ``\\u001b`` escapes that no terminal acts on).
    """
    rest = _RENDERER_SEQ.sub("", text)
    bad = _CONTROL.search(rest)
    assert bad is None, (
        f"control character {bad.group()!r} in the {where}: …{rest[max(bad.start() - 40, 0) : bad.end() + 40]!r}…"
    )
    if payload:
        assert "PWNED" not in text and "evil.example" not in text, f"an escape sequence's payload reached the {where}"
    text.encode("utf-8")  # raises on a lone surrogate


def assert_screen_clean(app: Any, *, payload: bool = True) -> str:
    assert_clean(terminal_ansi(app), "terminal output", payload=payload)
    text = screen_text(app)
    assert_clean(text, "screen text", payload=payload)
    return text


def drive_with_toasts(app: Any, script: Any, size: tuple[int, int]) -> Any:
    """``ui_helpers.drive`` with notifications shown (``run_test`` hides them unless asked)."""

    async def main() -> Any:
        async with app.run_test(size=size, notifications=True) as pilot:
            await pilot.pause()
            await script(pilot)
        return app.return_value

    return asyncio.run(main())


async def _toasts_shown(pilot: Any, n: int) -> None:
    from textual.widgets._toast import Toast

    await wait_until(pilot, lambda: len(pilot.app.screen.query(Toast)) >= n, f"{n} notifications")
    await pilot.pause()


def hostile_run(path: Path, *, finished: bool = True, name: str = f"run {HOSTILE}") -> Path:
    """A GPU run whose every text field is hostile: name, GPU name, note, error, config values, child.log."""
    events = gpu_events(steps=3, oom_step=None, finished=False)
    events[0]["name"] = name
    events[1]["config"]["name"] = name
    events[1]["config"]["model"]["id"] = f"org/model{MARKUP}{ESCAPES}"
    events[1]["config"]["data"]["source"] = f"imgs/[/]{OSC_TITLE}"
    events[2]["gpu_name"] = f"NVIDIA {MARKUP}{OSC_TITLE}"
    t = events[-1]["t"]
    events.append({"type": "note", "t": t, "message": f"note {MARKUP}\n{ESCAPES}{LONE}"})
    if finished:
        events += [
            {"type": "error", "t": t + 0.1, "message": f"{ERROR_MESSAGE} {ESCAPES}{LONE}", "traceback": MARKUP},
            {"type": "end", "t": t + 0.2, "status": "error", "code": 1},
            {"type": "exit", "t": None, "code": 1, "signal": None},
        ]
    write_run(path, events)
    log = (
        f"warning {MARKUP}\n".encode()
        + f"title {OSC_TITLE} clear {CLEAR} link {LINK} bell {BELL}\n".encode()
        + b"bytes "
        + BAD_UTF8
        + b" end\n"
        + "c1 \x9b31m\n".encode()
        + b"progress 10%\rprogress 50%\n"
        + b"\x1b[31mred\x1b[0m\n"
        + f"Traceback: {ERROR_MESSAGE}\n".encode()
    )
    (path / "child.log").write_bytes(log)
    return path


# -- the run view: replay and attach ---------------------------------------------------------------------


def test_replay_of_a_hostile_run_shows_the_error_with_its_brackets_and_no_escape(tmp_path: Path) -> None:
    """``ValueError("… must end with [/INST] …")`` recorded by a run: the replay shows it, it does not crash."""
    d = hostile_run(tmp_path / "profiles" / "exp[lr=3e-4:final]")
    src = ReplaySource(d, clock=FrozenClock(), background=False)
    app = BlipmonApp(RunScreen(src))

    async def script(pilot: Any) -> None:
        await pilot.press("end")
        await pilot.pause()
        text = assert_screen_clean(pilot.app)
        assert "FAILED: " + ERROR_MESSAGE in text  # the banner, brackets and all
        assert "run [/INST] [b]bold[/b]" in text  # the header's run name, markup shown as typed
        assert "warning [/INST] [b]bold[/b] [/] [red]x[/red] [@click=app.quit]q[/]" in text
        assert "title  clear  link click bell ^G^H\\x7f^@" in text  # sequences removed, lone controls visible
        assert f"bytes {BAD_UTF8.decode('utf-8', 'replace')} end" in text  # invalid UTF-8: replacement characters
        assert "c1 \\x9b31m" in text
        assert "progress 50%" in text and "progress 10%" not in text
        assert "\nred" in text or " red" in text
        assert f"Traceback: {ERROR_MESSAGE}" in text
        pilot.app.screen.query_one("#log").scroll_home(animate=False)  # the run's note, above the log
        await pilot.pause()
        text = assert_screen_clean(pilot.app)
        assert "blipmon note: note [/INST] [b]bold[/b] [/] [red]x[/red]" in text

    drive(app, script, size=(160, 40))


def test_attach_to_a_hostile_running_run(tmp_path: Path) -> None:
    d = hostile_run(tmp_path / "profiles" / f"exp [a100]{OSC_TITLE}", finished=False)
    app = BlipmonApp(RunScreen(FileFollowSource(d, mode="attach", clock=FrozenClock())))

    async def script(pilot: Any) -> None:
        text = assert_screen_clean(pilot.app)
        assert "run [/INST] [b]bold[/b]" in text and "[attached]" in text
        assert "NVIDIA [/INST]" in text  # the GPU's name from the profile, in the header
        await pilot.press("question_mark")  # a dialog over it
        assert_screen_clean(pilot.app)

    drive(app, script, size=(160, 40))


def test_live_failure_banner_does_not_crash_on_markup(tmp_path: Path) -> None:
    """The same error arriving while a run is followed (``run --live``, ``attach``): the banner appears, no crash."""
    d = hostile_run(tmp_path / "live", finished=False)
    clock = FrozenClock()
    app = BlipmonApp(RunScreen(FileFollowSource(d, mode="live", clock=clock), refresh=0.05))

    async def script(pilot: Any) -> None:
        with open(d / "events.jsonl", "a", encoding="utf-8") as fh:
            for ev in (
                {"type": "error", "t": 99.0, "message": f"image 'cat[/].png': {ERROR_MESSAGE}{CLEAR}"},
                {"type": "end", "t": 99.1, "status": "error", "code": 1},
            ):
                fh.write(json.dumps(ev) + "\n")
        await wait_until(pilot, lambda: "FAILED" in screen_text(pilot.app), "the failure banner")
        text = assert_screen_clean(pilot.app)
        assert f"FAILED: image 'cat[/].png': {ERROR_MESSAGE}" in text

    drive(app, script, size=(160, 40))


# -- the launcher ------------------------------------------------------------------------------------------


def _launcher_root(tmp_path: Path) -> Path:
    root = tmp_path / "profiles"
    for name in ("exp[lr=3e-4:final]", "exp[v2]", "exp [a100]"):
        write_run(root / name, gpu_events(steps=2, oom_step=None))
    hostile_run(root / f"hostile{OSC_TITLE}")
    os.mkdir(os.fsencode(root) + b"/bytes-" + BAD_UTF8[:2])  # a folder named with invalid UTF-8
    write_run(Path(os.fsdecode(os.fsencode(root) + b"/bytes-" + BAD_UTF8[:2])), gpu_events(steps=2, oom_step=None))
    sweep = root / "20260101T000000-sweep[x]"
    (sweep / "r1").mkdir(parents=True)
    write_run(sweep / "r1", gpu_events(steps=2, oom_step=None))
    write_doc(
        sweep,
        [
            (f"cfg {MARKUP}{OSC_TITLE}", "[/]", "r1", 10.0, None),
            (f"tiny[/]{OSC_TITLE}", "pending", None, None, f"refused: {MARKUP}{CLEAR}"),
        ],
        finished=True,
    )
    return root


def _option_texts(app: Any) -> list[str]:
    ol = app.screen.query_one("#configs", OptionList)
    return [str(getattr(ol.get_option_at_index(i).prompt, "plain", "")) for i in range(ol.option_count)]


def test_launcher_lists_runs_and_sweeps_by_their_full_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _launcher_root(tmp_path)
    monkeypatch.chdir(tmp_path)
    app = BlipmonApp(LauncherScreen(root))

    async def script(pilot: Any) -> None:
        await wait_until(pilot, lambda: sum(t.startswith("  exp") for t in _option_texts(pilot.app)) == 3, "the runs")
        names = [t.split("\n")[0].strip() for t in _option_texts(pilot.app)]
        for name in ("exp[lr=3e-4:final]", "exp[v2]", "exp [a100]", "20260101T000000-sweep[x]"):
            assert name in names, names
        assert "hostile" in names  # the OSC sequence in the folder's name is gone, the name stays
        assert any(n.startswith("bytes-") for n in names)
        assert any("1 [/]" in t for t in _option_texts(pilot.app))  # the sweep's summary, with its odd status
        # Walk the whole list: each run and sweep on screen, with its details and its settings (config
        # values from disk); the names above in full.
        ol = pilot.app.screen.query_one("#configs", OptionList)
        shown = set()
        for i in range(ol.option_count):
            option = ol.get_option_at_index(i)
            if option.disabled or not (option.id or "").startswith(("run:", "sweep:")):
                continue
            ol.highlighted = i
            await pilot.pause()
            text = assert_screen_clean(pilot.app, payload=False)  # (the hostile run's: see below)
            full = ("exp[lr=3e-4:final]", "exp[v2]", "exp [a100]", "20260101T000000-sweep[x]")
            shown |= {n for n in full if f" {n}" in text}
        assert shown == set(full)
        # The hostile run's details and its settings.
        ol.highlighted = next(i for i, t in enumerate(_option_texts(pilot.app)) if t.strip().startswith("hostile"))

        def model_id() -> str:
            return pilot.app.screen.query_one("#set-model--id", Input).value

        await wait_until(pilot, lambda: model_id().startswith("org/"), "the hostile run's settings")
        # (why its name is refused quotes it with repr(): ``\\x1b]0;PWNED`` in plain characters, harmless)
        text = assert_screen_clean(pilot.app, payload=False)
        assert "run [/INST] [b]bold[/b]" in text
        assert model_id() == f"org/model{MARKUP}{ESCAPES_SHOWN}"  # sequences gone, lone controls visible
        # Delete asks, naming the folder: a dialog with the name as text.
        await pilot.press("d")
        assert isinstance(pilot.app.screen, ChoiceScreen)
        text = assert_screen_clean(pilot.app, payload=False)  # the settings' repr() still shows underneath
        assert "Delete the run hostile and all its files?" in text
        await pilot.press("n")

    drive(app, script, size=(120, 50))


def test_launcher_field_edited_to_markup_keeps_the_edit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A field edited to ``x[/]``: the reason is shown with the value as typed, and the edit stays."""
    monkeypatch.chdir(tmp_path)
    app = BlipmonApp(LauncherScreen(tmp_path / "profiles"))

    async def script(pilot: Any) -> None:
        await pilot.press("e")
        dtype = pilot.app.screen.query_one("#set-model--dtype", Input)
        dtype.value = "x[/]"
        await pilot.pause()
        text = assert_screen_clean(pilot.app)
        assert "model.dtype = 'x[/]'" in text or "model.dtype = x[/]" in text, text
        assert dtype.value == "x[/]"
        name = pilot.app.screen.query_one("#set-name", Input)
        name.value = f"mine[/]{CLEAR}"  # pasted, say: the field shows ␛[2J, never ESC itself
        await pilot.pause()
        text = assert_screen_clean(pilot.app)
        assert "mine[/]␛[2J␛[H" in text  # the field
        assert "name = 'mine[/]" in text  # why it is refused (a run name is a folder name)
        assert pilot.app.screen.query_one("#set-model--dtype", Input).value == "x[/]"
        assert pilot.app.screen.query_one("#set-name", Input).value == f"mine[/]{CLEAR}"
        name.value = "mine"
        dtype.value = "bfloat16"
        await pilot.pause()
        text = assert_screen_clean(pilot.app)
        assert "✓ valid (2 changed)" in text
        assert pilot.app.screen.valid_cfg["model"]["dtype"] == "bfloat16"

    drive(app, script, size=(120, 40))


# -- sweep, compare, notifications -------------------------------------------------------------------------


def test_sweep_queue_with_markup_status_and_names(tmp_path: Path) -> None:
    root = _launcher_root(tmp_path)
    sweep = root / "20260101T000000-sweep[x]"
    app = BlipmonApp(SweepScreen(sweep, replay=True))

    async def script(pilot: Any) -> None:
        text = assert_screen_clean(pilot.app)
        assert "[/]" in text and "cfg [/INST] [b]bold[/b]" in text
        assert "refused: [/INST]" in text
        await pilot.press("down")  # the refused configuration: enter says so in a notification
        await pilot.press("enter")
        await _toasts_shown(pilot, 1)
        text = assert_screen_clean(pilot.app)
        assert "tiny[/]: it was refused: nothing ran" in text

    drive_with_toasts(app, script, size=(160, 30))


def test_compare_view_of_hostile_runs(tmp_path: Path) -> None:
    a = hostile_run(tmp_path / "a[/]")
    b = write_run(tmp_path / "b", gpu_events(steps=2, oom_step=None))
    app = BlipmonApp(CompareScreen([a, b], standalone=True))

    async def script(pilot: Any) -> None:
        from ui_helpers import compared

        await wait_until(pilot, lambda: compared(pilot.app), "the comparison")
        text = assert_screen_clean(pilot.app)
        assert "1. run [/INST]" in text and "NVIDIA [/INST]" in text

    drive(app, script, size=(160, 50))


def test_notifications_are_plain_text(tmp_path: Path) -> None:
    d = hostile_run(tmp_path / "r")
    app = BlipmonApp(RunScreen(ReplaySource(d, clock=FrozenClock(), background=False)))

    async def script(pilot: Any) -> None:
        pilot.app.notify(f"could not delete exp[v2]: {ERROR_MESSAGE}{OSC_TITLE}", title=f"t[/]{CLEAR}")
        pilot.app.screen.notify(f"{MARKUP}{LONE}", severity="error")
        await _toasts_shown(pilot, 2)
        text = assert_screen_clean(pilot.app)
        assert "could not delete exp[v2]: ValueError(" in text  # the toast wraps the rest
        assert "t[/]" in text and "[/INST] [b]bold[/b]" in text

    drive_with_toasts(app, script, size=(160, 40))


# -- the command line: show and compare ----------------------------------------------------------------------


def test_show_and_compare_text_have_no_control_characters(tmp_path: Path) -> None:
    d = hostile_run(tmp_path / f"exp{OSC_TITLE}[v2]")
    run = load_run(d)
    text = render_show(run)
    assert_clean(text, "show output")
    assert f"run      run {MARKUP}" in text
    assert f"outcome  failed with an error: {ERROR_MESSAGE}" in text
    assert "note     note [/INST]" in text
    assert f"model    org/model{MARKUP}{ESCAPES_SHOWN}" in text
    other = load_run(write_run(tmp_path / "b", gpu_events(steps=2, oom_step=None)))
    for fmt in ("table", "markdown", "csv", "json"):
        out = render_compare([run, other], fmt)
        # CSV ends its rows with \r\n, as RFC 4180 says
        assert_clean(out.replace("\r\n", "\n") if fmt == "csv" else out, f"compare {fmt}", payload=fmt != "json")
        assert "run [/INST]" in out


def _cli(*args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "blipmon", *args], capture_output=True, timeout=120, check=False)


def test_show_on_the_command_line_prints_no_control_character(tmp_path: Path) -> None:
    """``blipmon show`` as a user runs it, on a folder whose name holds an OSC sequence and invalid UTF-8."""
    parent = os.fsencode(tmp_path)
    raw = parent + b"/exp" + OSC_TITLE.encode() + BAD_UTF8[:2]
    os.mkdir(raw)
    d = hostile_run(Path(os.fsdecode(raw)))
    done = _cli("show", raw)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    out = done.stdout.decode("utf-8")  # valid UTF-8, or this raises
    assert_clean(out, "`blipmon show` output")
    assert f"run      run {MARKUP}" in out
    assert f"outcome  failed with an error: {ERROR_MESSAGE}" in out
    other = write_run(tmp_path / "b", gpu_events(steps=2, oom_step=None))
    done = _cli("compare", os.fsencode(d), str(other))
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    assert_clean(done.stdout.decode("utf-8"), "`blipmon compare` output")
