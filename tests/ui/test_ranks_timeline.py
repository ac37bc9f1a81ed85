"""The memory timeline follows the rank selection: one rank plots its own samples, all ranks their envelope.

Driven by the recorded two-rank DDP run (``tests/data/tiny-ddp``: rank 0's samples carry no ``rank``,
rank 1's say ``"rank":1``) and by ``ddp_sampled``, the synthetic CUDA-shaped two-rank run of
``recorded`` with a sampler on rank 1 that holds less GPU memory and less host memory than rank 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from recorded import GIB, MIB, FrozenClock, ddp_gpu_events, write_run
from ui_helpers import drive, screen_text

from blipmon.core import timeline as tl
from blipmon.core.ranks import ALL, rank_view
from blipmon.core.replay import ReplaySource
from blipmon.core.snapshot import Snapshot
from blipmon.core.units import fmt_bytes
from blipmon.runner.follow import FileFollowSource
from blipmon.ui.app import BlipmonApp
from blipmon.ui.live import RunScreen
from blipmon.ui.widgets.run_header import header_lines
from blipmon.ui.widgets.timeline import TimelineChart, timeline_lines

RANK1_LESS_GPU = 6 * GIB  # rank 1's sampled allocated/reserved/device memory is this much lower than rank 0's
RANK1_LESS_RSS = 512 * MIB


def ddp_sampled_events(**kw: Any) -> list[dict[str, Any]]:
    """``ddp_gpu_events`` with rank 1's sampler too: a sample of rank 1 right after each of rank 0's."""
    out: list[dict[str, Any]] = []
    for ev in ddp_gpu_events(**kw):
        out.append(ev)
        if ev["type"] == "sample":
            r1 = {"type": "sample", "t": round(ev["t"] + 0.001, 6), "rss": ev["rss"] - RANK1_LESS_RSS, "rank": 1}
            r1 |= {k: ev[k] - RANK1_LESS_GPU for k in ("alloc", "res", "dev", "proc_gpu")}
            out.append(r1)
    return out


@pytest.fixture
def ddp_sampled(tmp_path: Path) -> Path:
    return write_run(tmp_path / "profiles" / "20261123T170000-h100-ddp-sampled", ddp_sampled_events())


def _snap(path: Path) -> Snapshot:
    return FileFollowSource(path).poll()


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (path / "events.jsonl").read_text().splitlines() if x.strip()]


def _samples_of_rank(events: list[dict[str, Any]], rank: int) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "sample" and e.get("rank", 0) == rank]


def _text(snap: Snapshot, rank: int | None, width: int = 100, height: int = 14) -> list[str]:
    return [s.text for s in timeline_lines(snap, width, height, rank)]


# -- the samples of each rank -----------------------------------------------------------------------------


def test_each_rank_has_its_own_samples_and_all_ranks_every_sample(tiny_ddp: Path) -> None:
    events = _events(tiny_ddp)
    r0, r1 = _samples_of_rank(events, 0), _samples_of_rank(events, 1)
    assert r0 and r1 and all("rank" not in e for e in r0)  # rank 0's sampler writes no rank at all
    snap = _snap(tiny_ddp)
    assert set(snap.rank_samples) == {0, 1}
    assert snap.samples_of(0)["t"].tolist() == [e["t"] for e in r0]
    assert snap.samples_of(1)["t"].tolist() == [e["t"] for e in r1]
    assert snap.samples_of(1)["rss"].tolist() == [float(e["rss"]) for e in r1]
    assert np.isnan(snap.samples_of(1)["alloc"]).all()  # a CPU run: nothing measured on a GPU
    assert snap.samples_of(ALL) is snap.samples and snap.n_samples == len(r0) + len(r1)
    assert len(snap.samples_of(7)["t"]) == 0 and set(snap.samples_of(7)) == set(snap.samples)


def test_a_single_rank_run_keeps_no_split_and_draws_exactly_as_before(gpu_run: Path, cpu_run: Path) -> None:
    for path in (gpu_run, cpu_run):
        snap = _snap(path)
        assert snap.rank_samples == {} and snap.samples_of(0) is snap.samples
        assert len(snap.samples_of(1)["t"]) == 0
        view = rank_view(snap, 0)
        assert view.sample_rank is None  # the view asks for the whole run's samples, as it always did
        assert snap.peaks(0) == snap.peaks()
        assert _text(snap, 0) == _text(snap, None)


def test_replay_gives_each_ranks_samples_up_to_the_playhead(ddp_sampled: Path, clock: FrozenClock) -> None:
    events = _events(ddp_sampled)
    src = ReplaySource(ddp_sampled, clock=clock, background=False)
    src.seek_to(9.0)
    snap = src.poll()
    for rank in (0, 1):
        t = snap.samples_of(rank)["t"]
        assert len(t) == sum(1 for e in _samples_of_rank(events, rank) if e["t"] <= 9.0) > 0
        assert t.max() <= 9.0
    assert len(snap.samples_of(0)["t"]) + len(snap.samples_of(1)["t"]) == snap.n_samples
    src.seek_fraction(1.0)
    end = src.poll()
    assert len(end.samples_of(1)["t"]) == len(_samples_of_rank(events, 1))


def test_live_follow_splits_the_ranks_as_their_samples_arrive(tmp_path: Path, clock: FrozenClock) -> None:
    full = ddp_sampled_events(finished=False)
    lines = [json.dumps(e, separators=(",", ":")) + "\n" for e in full]
    first_r1 = next(i for i, e in enumerate(full) if e["type"] == "sample" and e.get("rank") == 1)
    d = write_run(tmp_path / "live", [])
    src = FileFollowSource(d, mode="live", clock=clock)
    data = "".join(lines)
    cut_at = [len("".join(lines[:first_r1])), len("".join(lines[: first_r1 + 7])) + 5, len(data) // 2, len(data)]
    written = 0
    for cut in cut_at:  # rank 0 alone first (no split kept), then rank 1 shows up, then a half-written line
        with open(d / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write(data[written:cut])
        written = cut
        snap = src.poll()
        if cut == cut_at[0]:
            assert snap.rank_samples == {} and snap.samples_of(0) is snap.samples
    fresh = _snap(d)
    for rank in (0, 1):
        for key in ("t", "rss", "alloc", "res", "dev"):
            assert np.array_equal(snap.samples_of(rank)[key], fresh.samples_of(rank)[key], equal_nan=True)
        assert snap.samples_of(rank)["t"].tolist() == [e["t"] for e in _samples_of_rank(full, rank)]


# -- the chart ----------------------------------------------------------------------------------------------


def test_one_rank_is_drawn_from_its_samples_alone(ddp_sampled: Path, tmp_path: Path) -> None:
    snap = _snap(ddp_sampled)
    r0, r1, whole = _text(snap, 0), _text(snap, 1), _text(snap, None)
    assert r0 != r1 and r0 != whole and r1 != whole
    assert _text(snap, ALL) == whole
    for rank, chart in ((0, r0), (1, r1)):
        # the same plot as a run whose only sampler was that rank's (the legend's peaks aside)
        alone = [e for e in _events(ddp_sampled) if e["type"] != "sample" or e.get("rank", 0) == rank]
        other = _snap(write_run(tmp_path / f"alone-{rank}", alone))
        assert chart[1:] == _text(other, None)[1:]


def test_all_ranks_is_the_envelope_of_the_ranks(ddp_sampled: Path) -> None:
    snap = _snap(ddp_sampled)
    t0, t1 = 0.0, float(snap.samples["t"][-1])
    for key in ("alloc", "rss"):
        lo, hi = tl.minmax_columns(snap.samples["t"], snap.samples[key], t0, t1, 150, hold=False)
        per = [tl.minmax_columns(s["t"], s[key], t0, t1, 150, hold=False) for s in map(snap.samples_of, (0, 1))]
        with np.errstate(invalid="ignore"):
            assert np.array_equal(lo, np.fmin(per[0][0], per[1][0]), equal_nan=True)
            assert np.array_equal(hi, np.fmax(per[0][1], per[1][1]), equal_nan=True)
        assert (per[1][1] < per[0][1]).sum() > 50  # rank 1 does hold less: the envelope's top is rank 0's


def test_legend_and_header_give_the_selected_ranks_peaks(ddp_sampled: Path) -> None:
    events = _events(ddp_sampled)
    snap = _snap(ddp_sampled)

    def expected(rank: int) -> int:
        vals = [e["alloc"] for e in _samples_of_rank(events, rank)]
        vals += [e["peak"] for e in events if e["type"] == "phase" and e["rank"] == rank]
        vals += [e["peak"] for e in events if e["type"] == "load" and rank == 0]
        return max(vals)

    p0, p1 = snap.peaks(0), snap.peaks(1)
    assert p0["allocated"] == expected(0) and p1["allocated"] == expected(1) < expected(0)
    assert p1["device_used"] == p0["device_used"] - RANK1_LESS_GPU  # samples alone: no phase record has it
    assert snap.peaks(ALL) == snap.peaks() and snap.peaks()["allocated"] == max(expected(0), expected(1))
    legend = timeline_lines(snap, 140, 10, 1)[0].text
    assert f"allocated {fmt_bytes(p1['allocated'])}" in legend
    assert f"host RSS {fmt_bytes(p1['host_rss'])}" in legend
    head = header_lines(snap, 140, "rank 1 of 2", 1)[1].text
    assert f"alloc {fmt_bytes(p1['allocated'])}" in head and f"host {fmt_bytes(p1['host_rss'])}" in head
    assert f"alloc {fmt_bytes(snap.peaks()['allocated'])}" in header_lines(snap, 140, "all 2 ranks")[1].text


# -- the run view ---------------------------------------------------------------------------------------------


def _replay_at_end(path: Path, clock: FrozenClock) -> ReplaySource:
    src = ReplaySource(path, clock=clock, background=False)
    src.seek_fraction(1.0)
    return src


def _chart_rows(app: Any) -> list[str]:
    chart = app.screen.query_one(TimelineChart)
    return [s.text for s in chart.build(chart.size.width, chart.size.height)]


def test_pressing_r_changes_the_timelines_data(ddp_sampled: Path, clock: FrozenClock) -> None:
    app = BlipmonApp(RunScreen(_replay_at_end(ddp_sampled, clock)))

    async def script(pilot: Any) -> None:
        chart = pilot.app.screen.query_one(TimelineChart)
        w, h = chart.size.width, chart.size.height
        snap = chart.snapshot
        assert chart.rank == 0
        rank0 = _chart_rows(pilot.app)
        assert rank0 == [s.text for s in timeline_lines(snap, w, h, 0)]
        header0 = screen_text(pilot.app).splitlines()[1]
        assert f"alloc {fmt_bytes(snap.peaks(0)['allocated'])}" in header0

        await pilot.press("r")
        await pilot.pause()
        assert chart.rank == 1
        rank1 = _chart_rows(pilot.app)
        assert rank1 != rank0 and rank1 == [s.text for s in timeline_lines(snap, w, h, 1)]
        text = screen_text(pilot.app)
        assert f"alloc {fmt_bytes(snap.peaks(1)['allocated'])}" in text.splitlines()[1]  # the header follows
        assert any(row.strip() and row in text for row in rank1[1:-2])  # and what is on screen is rank 1's

        await pilot.press("r")
        await pilot.pause()
        assert chart.rank is ALL and pilot.app.screen.rank is ALL
        assert _chart_rows(pilot.app) == [s.text for s in timeline_lines(snap, w, h, None)] != rank1
        assert f"alloc {fmt_bytes(snap.peaks()['allocated'])}" in screen_text(pilot.app).splitlines()[1]

        await pilot.press("r")
        await pilot.pause()
        assert chart.rank == 0 and _chart_rows(pilot.app) == rank0

    drive(app, script, size=(140, 40))


def test_pressing_r_on_the_recorded_ddp_run_plots_each_ranks_samples(tiny_ddp: Path, clock: FrozenClock) -> None:
    app = BlipmonApp(RunScreen(_replay_at_end(tiny_ddp, clock)))

    async def script(pilot: Any) -> None:
        chart = pilot.app.screen.query_one(TimelineChart)
        seen = {}
        for _ in range(3):
            seen[chart.rank] = chart.snapshot.samples_of(chart.rank)
            await pilot.press("r")
            await pilot.pause()
        assert set(seen) == {0, 1, ALL}
        assert len(seen[0]["t"]) + len(seen[1]["t"]) == len(seen[ALL]["t"]) == chart.snapshot.n_samples
        assert chart.rank == 0

    drive(app, script)
