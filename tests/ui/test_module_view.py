"""The run view's module view (issue 12 item 4): ``m`` swaps the timeline for the model's modules as a tree with
stacked bars, the prediction beside; ``,``/``.`` choose the boundary, ``↑``/``↓``/``enter`` open the tree.

Driven by hand-written profiles (tests/module_profiles.py: figures in whole KiB, stated there) in a replay on a
frozen clock and through ``FileFollowSource`` (live and attach read the same way), plus one snapshot at 120x40.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import module_profiles as mp
import pytest
from recorded import FrozenClock
from ui_helpers import check_snapshot, drive, screen_text, screenshot, wait_until

from blipmon.core.module_view import Boundary, RowIndex, module_panel, predicted_rows
from blipmon.core.replay import ReplaySource
from blipmon.core.run import RunData
from blipmon.runner.follow import FileFollowSource
from blipmon.ui.app import BlipmonApp
from blipmon.ui.live import RunScreen
from blipmon.ui.widgets.modules import ModuleView, module_lines
from blipmon.ui.widgets.timeline import TimelineChart

K = mp.K


def _replay(run: Path, clock: FrozenClock, at: float | None = None) -> ReplaySource:
    src = ReplaySource(run, clock=clock, background=False)
    if at is None:
        src.seek_fraction(1.0)
    else:
        src.seek_to(at)
    return src


def _rows(app: Any) -> list[str]:
    """The module view's rows as on screen: the first word of each line after its header (the names)."""
    view = app.screen.query_one(ModuleView)
    return [s.text for s in view.build(view.size.width, view.size.height)]


def _names(app: Any) -> list[str]:
    screen = app.screen
    return [n.label for n in screen.module_panel.nodes]


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    return mp.write(tmp_path / "profiles" / "20261201T100000-tiny", mp.events())


def test_m_shows_the_tree_of_the_latest_steps_largest_phase(plain: Path, clock: FrozenClock) -> None:
    app = BlipmonApp(RunScreen(_replay(plain, clock)))

    async def script(pilot: Any) -> None:
        screen = pilot.app.screen
        assert not screen.query_one(ModuleView).display and screen.query_one(TimelineChart).display
        await pilot.press("m")
        await pilot.pause()
        assert screen.query_one(ModuleView).display and not screen.query_one(TimelineChart).display
        panel = screen.module_panel
        # the phase bars show step 2 (the last complete step); its largest phase is after_fwd, 4200 KiB
        assert panel.boundary == Boundary(0, 2, 0, "after_fwd") and panel.following
        assert (panel.position, panel.count) == (9, 12)  # 3 steps x 4 boundaries; step 2 after_fwd is the 10th
        assert _names(pilot.app) == ["(model)", "language_model", "vision_model", "qformer"]  # root open, by size
        text = screen_text(pilot.app)
        assert "modules step 2 after_fwd (following 10/12)" in text
        lines = text.splitlines()
        # language_model: 480 + 960 + 780 = 2220 KiB = 2.17 MiB; predicted 2230 KiB = 2.18 MiB, +0.45 %
        row = next(ln for ln in lines if "language_model" in ln)
        assert row.rstrip().endswith("2.17 MiB pred 2.18 MiB +0.5%")
        assert next(ln for ln in lines if "qformer" in ln).rstrip().endswith("700.00 KiB pred 700.00 KiB +0.0%")
        await pilot.press("m")
        await pilot.pause()
        assert not screen.query_one(ModuleView).display and screen.query_one(TimelineChart).display

    drive(app, script, size=(100, 30))


def test_enter_opens_a_module_and_comma_full_stop_move_the_boundary(plain: Path, clock: FrozenClock) -> None:
    app = BlipmonApp(RunScreen(_replay(plain, clock)))

    async def script(pilot: Any) -> None:
        screen = pilot.app.screen
        await pilot.press("m", "down", "enter")
        await pilot.pause()
        assert screen.module_cursor == "language_model"
        assert _names(pilot.app) == ["(model)", "language_model", "model.decoder", "vision_model", "qformer"]
        await pilot.press("enter")  # closes it again
        await pilot.pause()
        assert _names(pilot.app) == ["(model)", "language_model", "vision_model", "qformer"]
        await pilot.press("comma")
        await pilot.pause()
        assert screen.module_panel.boundary == Boundary(0, 2, 0, "before_fwd") and not screen.module_panel.following
        assert "modules step 2 before_fwd (chosen 9/12)" in screen_text(pilot.app)
        # before forward at step 2 no activations are held: language_model = 480 + 960 = 1440 KiB = 1.41 MiB
        lm = next(n for n in screen.module_panel.nodes if n.path == "language_model")
        assert (lm.row.acts, lm.total) == (0, 1440 * K)
        await pilot.press("full_stop", "full_stop", "full_stop")  # after_fwd, after_bwd, after_opt_step
        await pilot.pause()
        assert screen.module_panel.boundary == Boundary(0, 2, 0, "after_opt_step")
        await pilot.press("full_stop")  # past the newest: follow the run again
        await pilot.pause()
        assert screen.module_panel.following and screen.module_panel.boundary == Boundary(0, 2, 0, "after_fwd")

    drive(app, script, size=(100, 30))


def test_a_replay_shows_only_the_boundaries_it_has_reached(plain: Path, clock: FrozenClock) -> None:
    # phases are 0.5 s apart from t = 0.5: step 0's four boundaries are at 0.5, 1.0, 1.5 and 2.0 s
    app = BlipmonApp(RunScreen(_replay(plain, clock, at=2.0)))

    async def script(pilot: Any) -> None:
        screen = pilot.app.screen
        await pilot.press("m")
        await pilot.pause()
        panel = screen.module_panel
        assert panel.count == 4
        # step 0's largest phase: after_opt_step, 1000 + 1000 + 2000 KiB (after_fwd holds 1000 + 1200)
        assert panel.boundary == Boundary(0, 0, 0, "after_opt_step")
        assert panel.nodes[0].total == 4000 * K
        screen.source.seek_fraction(1.0)
        screen.tick()
        await pilot.pause()
        assert screen.module_panel.count == 12

    drive(app, script, size=(100, 30))


def test_an_attached_run_grows_its_module_view_as_the_file_does(tmp_path: Path) -> None:
    evs = mp.events()
    cut = next(i for i, e in enumerate(evs) if e["type"] == "phase" and e["step"] == 1)  # step 0 only, first
    run = mp.write(tmp_path / "r", evs[:cut])
    app = BlipmonApp(RunScreen(FileFollowSource(run, mode="attach")))

    async def script(pilot: Any) -> None:
        screen = pilot.app.screen
        await pilot.press("m")
        await pilot.pause()
        assert screen.module_panel.count == 4
        with (run / "events.jsonl").open("a") as f:
            f.write("".join(json.dumps(e) + "\n" for e in evs[cut:]))
        screen.tick()
        await pilot.pause()
        assert screen.module_panel.count == 12 and screen.module_panel.boundary == Boundary(0, 2, 0, "after_fwd")

    drive(app, script, size=(100, 30))


def test_an_oom_run_opens_at_the_last_boundary_before_it_naming_the_module(tmp_path: Path, clock: FrozenClock) -> None:
    run = mp.write(tmp_path / "oom", mp.events("oom", oom=True))
    app = BlipmonApp(RunScreen(_replay(run, clock)))

    async def script(pilot: Any) -> None:
        screen = pilot.app.screen
        await pilot.press("m")
        await pilot.pause()
        panel = screen.module_panel
        # step 2 ran out in backward: the last boundary reached is its after_fwd (the phase bars show step 1)
        assert panel.boundary == Boundary(0, 2, 0, "after_fwd")
        assert panel.oom == f"in {mp.OOM_MODULE} (backward)"
        assert panel.oom_paths == {"", "language_model", "language_model.model.decoder"}
        assert f"OOM next, in {mp.OOM_MODULE} (backward)" in screen_text(pilot.app)

    drive(app, script, size=(100, 30))


def test_a_profile_without_module_records_says_why(tmp_path: Path, clock: FrozenClock) -> None:
    run = mp.write(tmp_path / "old", mp.events("old", modules=False))
    app = BlipmonApp(RunScreen(_replay(run, clock)))

    async def script(pilot: Any) -> None:
        from textual.widgets._toast import Toast

        screen = pilot.app.screen
        assert "m modules" not in screen_text(pilot.app)  # the footer does not offer it
        await pilot.press("m")
        await wait_until(pilot, lambda: len(pilot.app.screen.query(Toast)) >= 1, "the notification")
        await pilot.pause()
        assert not screen.modules_shown and screen.query_one(TimelineChart).display
        text = screen_text(pilot.app)  # the toast wraps the message over several lines beside the view
        assert "no per-module figures:" in text and "first phase boundary yet" in text

    async def main() -> None:
        async with app.run_test(size=(100, 30), notifications=True) as pilot:  # run_test hides toasts otherwise
            await pilot.pause()
            await script(pilot)

    asyncio.run(main())

    # the widget says the same wherever it is drawn without figures (a rank that recorded none)
    text = " ".join(s.text.strip() for s in module_lines(None, None, 60, 8))
    assert "no per-module figures: module attribution was off (runtime.module_depth = 0)" in text


def test_damaged_module_records_are_said_as_damage_not_as_attribution_off(tmp_path: Path, clock: FrozenClock) -> None:
    evs = mp.events("damaged")
    for ev in evs:
        if ev.get("type") == "modules":
            ev["acts"] = ev["acts"][:-1]  # one figure short of its tree: every record is dropped
    run = mp.write(tmp_path / "damaged", evs)
    app = BlipmonApp(RunScreen(_replay(run, clock)))

    async def script(pilot: Any) -> None:
        from textual.widgets._toast import Toast

        await pilot.press("m")
        await wait_until(pilot, lambda: len(pilot.app.screen.query(Toast)) >= 1, "the notification")
        await pilot.pause()
        text = " ".join(screen_text(pilot.app).split())
        assert "unreadable" in text and "may be damaged" in text
        assert "attribution was off" not in text

    async def main() -> None:
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            await pilot.pause()
            await script(pilot)

    asyncio.run(main())


def test_module_names_are_text_never_markup(tmp_path: Path, clock: FrozenClock) -> None:
    tree = [*mp.TREE, "language_model.[bold red]x[/]", "qformer.\x1b]0;owned\x07q"]
    run = mp.write(tmp_path / "evil", mp.events("evil", tree=tree, prediction=False))
    app = BlipmonApp(RunScreen(_replay(run, clock)))

    async def script(pilot: Any) -> None:
        screen = pilot.app.screen
        screen.module_expanded |= {"language_model", "qformer"}
        await pilot.press("m")
        await pilot.pause()
        text = screen_text(pilot.app)
        assert "[bold red]x[/]" in text  # shown as written
        assert "owned" not in text and "\x1b" not in screenshot(pilot.app)  # the escape sequence removed whole

    drive(app, script, size=(100, 30))


def test_the_help_lists_the_module_keys_by_their_characters(plain: Path, clock: FrozenClock) -> None:
    app = BlipmonApp(RunScreen(_replay(plain, clock)))

    async def script(pilot: Any) -> None:
        await pilot.press("m", "question_mark")
        await pilot.pause()
        # each key's row of the dialog, its padding squeezed: "│ m modules │" (a scrollbar may follow)
        text = "\n".join(" ".join(ln.split()) for ln in screen_text(pilot.app).splitlines())
        for row in ("m modules", ", previous boundary", ". next boundary (then: follow)", "↑ module above",
                    "↓ module below", "enter open / close the module"):  # fmt: skip
            assert f"│ {row} " in text, text

    drive(app, script, size=(100, 40))


def test_module_lines_draw_each_category_to_scale() -> None:
    """The bars, drawn without a screen: a module's bar is its share of the root's total, per category."""
    run = RunData()
    run.extend(mp.events())
    panel = module_panel(
        RowIndex(), run.modules.rows, step_hint=1, expanded={""}, predicted=predicted_rows(run.prediction)
    )
    assert panel.boundary == Boundary(0, 1, 0, "after_fwd")
    width = 80
    rows = module_lines(panel, "", width, 10)
    # names: "  ▸ language_model" is the widest, 18 cells, + 1; then the total (11) and the prediction (24)
    bar_w = width - 19 - 11 - 24
    assert bar_w == 26
    root = rows[1]
    bars = [seg for seg in root if seg.text and set(seg.text) == {"█"}]
    assert [seg.style.color.name for seg in bars] == ["#5fafff", "#ffd75f", "#87d787"]  # params, optim, acts
    # the scale is the largest total shown, the root's predicted 4210 KiB: params 1000, optim 2000, acts 1200 KiB
    # are 6.18, 12.35, 7.41 cells -> 6, 12, 7, and round(4200 / 4210 x 26) = 26 cells in all: the spare one goes
    # to the largest remainder (acts)
    assert [len(seg.text) for seg in bars] == [6, 12, 8]
    # qformer: 200 + 400 + 100 = 700 KiB of 4210 = 4.32 cells: 1.24, 2.47, 0.62 -> 1, 2, 1
    qf = next(r for r in rows if "qformer" in r.text)
    assert [len(seg.text) for seg in qf if seg.text and set(seg.text) == {"█"}] == [1, 2, 1]


@pytest.mark.parametrize("size", [(120, 40)], ids=["120x40"])
def test_snapshot_module_view(plain: Path, clock: FrozenClock, snapshot_update: bool, size: tuple[int, int]) -> None:
    app = BlipmonApp(RunScreen(_replay(plain, clock)))
    shots: list[str] = []

    async def script(pilot: Any) -> None:
        await pilot.press("m", "down", "enter", "down", "down", "enter")
        await pilot.pause()
        shots.append(screenshot(pilot.app))

    drive(app, script, size=size)
    check_snapshot("module_view_120x40", shots[0], size, snapshot_update)
