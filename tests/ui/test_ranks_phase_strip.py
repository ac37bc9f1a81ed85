"""The phase strip under the memory timeline follows the rank selection.

One rank: that rank's phase boundaries and its own step starts. All ranks: every rank's boundaries
with rank 0's step starts, as the strip always was (and a single-rank run exactly as before).

Driven by ``skewed_events``: the two-rank CUDA-shaped run of ``recorded`` where rank 1 lags
(it records only its first ``RANK1_STEPS`` steps) and its forward pass runs longer, so its
boundaries differ from rank 0's in count and in time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from recorded import FrozenClock, ddp_gpu_events, write_run
from ui_helpers import drive, screen_text

from blipmon.core import timeline as tl
from blipmon.core.ranks import ALL
from blipmon.core.replay import ReplaySource
from blipmon.core.snapshot import Snapshot
from blipmon.runner.follow import FileFollowSource
from blipmon.ui.app import BlipmonApp
from blipmon.ui.live import RunScreen
from blipmon.ui.widgets.timeline import TimelineChart, timeline_lines

STEPS = 5
RANK1_STEPS = 3
RANK1_SLOWER_FWD = 0.3  # rank 1's after_fwd comes this much later than rank 0's (phases are 0.5 s apart)
COLS = 93


def skewed_events() -> list[dict[str, Any]]:
    """``ddp_gpu_events`` with rank 1 lagging and slower in forward; the stream stays in time order."""
    out = ddp_gpu_events(steps=STEPS, rank1_steps=RANK1_STEPS)
    for ev in out:
        if ev["type"] == "phase" and ev["rank"] == 1 and ev["phase"] == "after_fwd":
            ev["t"] = round(ev["t"] + RANK1_SLOWER_FWD, 6)
    return sorted(out, key=lambda e: e["t"] if e.get("t") is not None else float("inf"))


@pytest.fixture
def skewed(tmp_path: Path) -> Path:
    return write_run(tmp_path / "profiles" / "20261123T180000-h100-ddp-skewed", skewed_events())


def _phases(rank: int | None) -> list[dict[str, Any]]:
    return [e for e in skewed_events() if e["type"] == "phase" and (rank is None or e["rank"] == rank)]


def _kind(phase: str) -> int:
    return tl.ACTIVITIES.index(tl.PHASE_ACTIVITY[phase])


def _begins(e: dict[str, Any]) -> bool:
    return e["phase"] == "before_fwd" and not e["micro_step"]


def _strip(snap: Snapshot, rank: int | None, ncols: int = COLS) -> np.ndarray:
    t0 = 0.0
    t1 = float(max(snap.now, snap.samples["t"][-1]))
    load_end = float(snap.load["t"]) if snap.load else None
    return tl.phase_strip_columns(*snap.boundaries(rank), t0, t1, ncols, load_end)


def _strip_row(rows: list[str]) -> str:
    return next(r for r in rows if r.startswith("phase "))


# -- the data ------------------------------------------------------------------------------------------------


def test_one_ranks_boundaries_and_step_starts_are_its_own(skewed: Path) -> None:
    snap = FileFollowSource(skewed).poll()
    assert snap.ranks() == (0, 1)
    for rank in (0, 1):
        mine = _phases(rank)
        t, kind, start = snap.boundaries(rank)
        assert t.tolist() == [e["t"] for e in mine]
        assert kind.tolist() == [_kind(e["phase"]) for e in mine]
        assert start.tolist() == [_begins(e) for e in mine]
        assert int(start.sum()) == (STEPS if rank == 0 else RANK1_STEPS)  # rank 1 marks its own steps
        assert not (t.flags.writeable or kind.flags.writeable or start.flags.writeable)  # widgets only read them
    assert snap.boundaries(0)[0].tolist() != snap.boundaries(1)[0].tolist()
    # all ranks: every boundary, step starts from rank 0 alone, as the strip always was
    t, kind, start = snap.boundaries(ALL)
    everyone = _phases(None)
    assert t.tolist() == [e["t"] for e in everyone]
    assert start.tolist() == [_begins(e) and e["rank"] == 0 for e in everyone]


def test_the_strip_columns_differ_per_rank_and_all_ranks_is_unchanged(skewed: Path) -> None:
    snap = FileFollowSource(skewed).poll()
    r0, r1, every = _strip(snap, 0), _strip(snap, 1), _strip(snap, ALL)
    assert not np.array_equal(r0, r1)
    assert int((r0 == tl.STEP_MARK).sum()) == STEPS and int((r1 == tl.STEP_MARK).sum()) == RANK1_STEPS
    forward = tl.ACTIVITIES.index("forward")
    # within the steps both ranks ran, rank 1's slower forward takes more columns than rank 0's
    last_mark = np.flatnonzero(r1 == tl.STEP_MARK)[-1]
    assert (r1[:last_mark] == forward).sum() > (r0[:last_mark] == forward).sum()
    # after its last boundary (the end of its last step) rank 1 shows what it went on to do, data,
    # not rank 0's later steps
    t1 = float(max(snap.now, snap.samples["t"][-1]))
    after = int(np.ceil(_phases(1)[-1]["t"] / t1 * COLS))
    assert set(r1[after:].tolist()) == {tl.ACTIVITIES.index("data")}
    assert (r0[after:] == tl.STEP_MARK).any() and (r0[after:] == forward).any()
    # all ranks: the whole run's boundaries with rank 0's starts, computed here from the records alone
    everyone = _phases(None)
    bt = np.array([e["t"] for e in everyone])
    kinds = np.array([_kind(e["phase"]) for e in everyone], np.int8)
    starts = np.array([_begins(e) and e["rank"] == 0 for e in everyone])
    assert np.array_equal(every, tl.phase_strip_columns(bt, kinds, starts, 0.0, t1, COLS, float(snap.load["t"])))
    # and the chart's strip row is drawn from them
    rows = {r: _strip_row([s.text for s in timeline_lines(snap, 100, 14, r)]) for r in (0, 1, ALL)}
    assert rows[0] != rows[1] and rows[1] != rows[ALL]
    assert rows[0].count("┃") == STEPS and rows[1].count("┃") == RANK1_STEPS


def test_a_single_rank_run_has_one_strip_whatever_the_selection(gpu_run: Path, cpu_run: Path) -> None:
    for path in (gpu_run, cpu_run):
        snap = FileFollowSource(path).poll()
        for a, b in zip(snap.boundaries(0), snap.boundaries(ALL), strict=True):
            assert np.array_equal(a, b)
        assert np.array_equal(_strip(snap, 0), _strip(snap, ALL))


def test_replay_gives_each_ranks_boundaries_up_to_the_playhead(skewed: Path, clock: FrozenClock) -> None:
    src = ReplaySource(skewed, clock=clock, background=False)
    src.seek_fraction(1.0)
    end = src.poll()
    assert len(end.boundaries(1)[0]) == len(_phases(1))
    src.seek_to(8.0)  # back: a shorter prefix of what rank 1 had
    snap = src.poll()
    for rank in (0, 1):
        t, _, start = snap.boundaries(rank)
        expected = [e for e in _phases(rank) if e["t"] <= 8.0]
        assert t.tolist() == [e["t"] for e in expected] and 0 < len(t) < len(_phases(rank))
        assert start.tolist() == [_begins(e) for e in expected]


# -- the run view --------------------------------------------------------------------------------------------


def test_pressing_r_changes_the_phase_strip(skewed: Path, clock: FrozenClock) -> None:
    src = ReplaySource(skewed, clock=clock, background=False)
    src.seek_fraction(1.0)
    app = BlipmonApp(RunScreen(src))

    async def script(pilot: Any) -> None:
        chart = pilot.app.screen.query_one(TimelineChart)
        w, h = chart.size.width, chart.size.height
        snap = chart.snapshot

        def shown() -> str:
            return _strip_row([s.text for s in chart.build(w, h)])

        def expected(rank: int | None) -> str:
            return _strip_row([s.text for s in timeline_lines(snap, w, h, rank)])

        assert chart.rank == 0
        rank0 = shown()
        assert rank0 == expected(0) and rank0.count("┃") == STEPS

        await pilot.press("r")
        await pilot.pause()
        assert chart.rank == 1
        rank1 = shown()
        assert rank1 != rank0 and rank1 == expected(1) and rank1.count("┃") == RANK1_STEPS
        assert rank1.rstrip() in screen_text(pilot.app)  # what is on screen is rank 1's strip

        await pilot.press("r")
        await pilot.pause()
        assert chart.rank is ALL
        every = shown()
        assert every == expected(None) and every != rank1 and every.count("┃") == STEPS

        await pilot.press("r")
        await pilot.pause()
        assert chart.rank == 0 and shown() == rank0

    drive(app, script, size=(140, 40))
