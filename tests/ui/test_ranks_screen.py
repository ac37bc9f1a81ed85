"""The run view's rank selector, driven through Textual's Pilot: ``r`` cycles rank 0, 1, all ranks.

Uses the recorded two-rank DDP run (``tests/data/tiny-ddp``) and a synthetic CUDA-shaped one
whose ranks differ; a single-rank run must look exactly as before (no key, no indicator).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recorded import FrozenClock, ddp_gpu_events, write_run
from ui_helpers import check_snapshot, drive, screen_text, screenshot

from blipmon.core.ranks import ALL
from blipmon.core.replay import ReplaySource
from blipmon.runner.follow import FileFollowSource
from blipmon.ui.app import BlipmonApp
from blipmon.ui.dialogs import HelpScreen
from blipmon.ui.live import RunScreen
from blipmon.ui.widgets.phase_bars import PhaseBars
from blipmon.ui.widgets.steps import StepCharts


def _lines(text: str, start: str) -> list[str]:
    """The phase panel's rows: from the row starting with ``start`` (after the left padding)."""
    rows = text.splitlines()
    i = next(i for i, r in enumerate(rows) if r.lstrip().startswith(start))
    return rows[i : i + 6]


def _replay_at_end(path: Path, clock: FrozenClock) -> ReplaySource:
    src = ReplaySource(path, clock=clock, background=False)
    src.seek_fraction(1.0)
    return src


def test_r_cycles_rank_0_rank_1_all_ranks_and_back(tiny_ddp: Path, clock: FrozenClock) -> None:
    app = BlipmonApp(RunScreen(_replay_at_end(tiny_ddp, clock)))
    rank1_loss = [json.loads(x) for x in (tiny_ddp / "events.jsonl").read_text().splitlines()]
    last_r1 = [e for e in rank1_loss if e["type"] == "rank_step"][-1]["loss"]
    last_r0 = [e for e in rank1_loss if e["type"] == "step"][-1]["loss"]

    async def script(pilot: Any) -> None:
        screen = pilot.app.screen
        text = screen_text(pilot.app)
        assert " rank 0 of 2 " in text.splitlines()[0]
        assert "r rank" in text.splitlines()[-1]
        assert _lines(text, "rank 0 (step 3)")[1].lstrip().startswith("before fwd")
        assert f"loss {last_r0:.4f}" in text

        await pilot.press("r")
        text = screen_text(pilot.app)
        assert screen.rank == 1 and " rank 1 of 2 " in text.splitlines()[0]
        assert "rank 1 (step 3)" in text and f"loss {last_r1:.4f}" in text
        assert {p["rank"] for p in pilot.app.screen.query_one(PhaseBars).latest} == {1}

        await pilot.press("r")
        text = screen_text(pilot.app)
        assert screen.rank is ALL and " all 2 ranks " in text.splitlines()[0]
        panel = _lines(text, "all ranks (step 3)")
        assert all("same on all" in row for row in panel[1:5])  # DDP replicas: nothing between them
        assert panel[5].lstrip().startswith("rank peaks r0 ") and "r1 " in panel[5] and "▲" not in panel[5]
        assert "slowest" in text and "mean loss" in text
        assert pilot.app.screen.query_one(StepCharts).all_ranks

        await pilot.press("r")
        assert screen.rank == 0 and " rank 0 of 2 " in screen_text(pilot.app).splitlines()[0]

    drive(app, script)


def test_all_ranks_shows_min_max_and_the_worst_rank(ddp_gpu: Path) -> None:
    app = BlipmonApp(RunScreen(FileFollowSource(ddp_gpu, mode="attach")))

    async def script(pilot: Any) -> None:
        pilot.app.screen.select_rank(ALL)
        await pilot.pause()
        panel = _lines(screen_text(pilot.app), "all ranks (step 4)")
        assert "┃min" in panel[0]
        after_fwd = panel[2]
        assert after_fwd.lstrip().startswith("after fwd") and "52.2G..53.5G r0" in after_fwd
        assert "┃" in after_fwd.split("after fwd")[1]  # the lowest rank's mark on the bar
        assert "rank peaks r0 62.5G▲ r1 62.2G" in panel[5]

    drive(app, script, size=(120, 40))


def test_a_single_rank_run_has_no_rank_key_or_indicator(gpu_run: Path, clock: FrozenClock) -> None:
    app = BlipmonApp(RunScreen(_replay_at_end(gpu_run, clock)))

    async def script(pilot: Any) -> None:
        before = screen_text(pilot.app)
        assert "rank" not in before and "r rank" not in before.splitlines()[-1]
        assert "rank" not in pilot.app.screen.visible_actions()
        await pilot.press("r")
        await pilot.pause()
        assert pilot.app.screen.rank == 0 and screen_text(pilot.app) == before
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(pilot.app.screen, HelpScreen) and " r " not in screen_text(pilot.app)

    drive(app, script)


def test_help_lists_the_rank_key_for_a_multi_rank_run(tiny_ddp: Path, clock: FrozenClock) -> None:
    app = BlipmonApp(RunScreen(_replay_at_end(tiny_ddp, clock)))

    async def script(pilot: Any) -> None:
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(pilot.app.screen, HelpScreen) and " r " in screen_text(pilot.app)

    drive(app, script)


def test_live_view_follows_the_selected_rank_as_records_arrive(tmp_path: Path, clock: FrozenClock) -> None:
    full = ddp_gpu_events(finished=False)
    d = write_run(tmp_path / "live", ddp_gpu_events(finished=False, rank1_steps=2))
    app = BlipmonApp(RunScreen(FileFollowSource(d, mode="live", clock=clock)))

    async def script(pilot: Any) -> None:
        screen = pilot.app.screen
        assert "r rank" in screen_text(pilot.app).splitlines()[-1]
        screen.select_rank(1)
        await pilot.pause()
        assert "rank 1 (step 1)" in screen_text(pilot.app)
        screen.select_rank(ALL)
        await pilot.pause()
        assert "all ranks (step 1)" in screen_text(pilot.app)  # the newest step both ranks finished
        with open(d / "events.jsonl", "a", encoding="utf-8") as fh:
            for e in full:
                if e.get("rank") == 1 and e["type"] in ("phase", "rank_step") and e["step"] >= 2:
                    fh.write(json.dumps(e) + "\n")
        screen.tick()
        await pilot.pause()
        text = screen_text(pilot.app)
        assert "all ranks (step 4)" in text and " all 2 ranks " in text.splitlines()[0]

    drive(app, script)


def test_replay_keeps_the_selection_while_it_plays(ddp_gpu: Path, clock: FrozenClock) -> None:
    src = ReplaySource(ddp_gpu, clock=clock, background=False)
    src.seek_to(9.0)
    app = BlipmonApp(RunScreen(src))

    async def script(pilot: Any) -> None:
        await pilot.press("r")
        text = screen_text(pilot.app)
        assert " rank 1 of 2 " in text.splitlines()[0]
        mid = next(r for r in text.splitlines() if "rank 1 (step" in r)
        await pilot.press("end")
        await pilot.pause()
        text = screen_text(pilot.app)
        assert pilot.app.screen.rank == 1 and "rank 1 (step 4)" in text and mid not in text

    drive(app, script, size=(120, 40))


def test_all_ranks_snapshot_80x24(tiny_ddp: Path, clock: FrozenClock, snapshot_update: bool) -> None:
    app = BlipmonApp(RunScreen(_replay_at_end(tiny_ddp, clock)))
    out: dict[str, str] = {}

    async def script(pilot: Any) -> None:
        pilot.app.screen.select_rank(ALL)
        await pilot.pause()
        out["svg"] = screenshot(pilot.app)

    drive(app, script)
    check_snapshot("replay_ddp_all_ranks_80x24", out["svg"], (80, 24), snapshot_update)
