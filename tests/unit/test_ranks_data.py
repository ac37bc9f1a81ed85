"""The rank computations behind the dashboard's rank selector (blipmon.core.ranks and Snapshot's rank methods).

Driven by a real two-rank DDP run recorded on a CPU (``tests/data/tiny-ddp``) and by a synthetic
CUDA-shaped two-rank run whose rank 0 holds more than rank 1 (``recorded.ddp_gpu_events``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from recorded import GIB, MIB, RANK1_LESS_ACTS, RANK1_OTHER, TINY_DDP, FrozenClock, ddp_gpu_events, write_run

from blipmon.core.ranks import ALL, bar_total, choose_steps, combine_steps, next_rank, phase_spread, rank_view
from blipmon.core.replay import ReplaySource
from blipmon.core.run import PHASES, load_run
from blipmon.core.snapshot import Snapshot
from blipmon.runner.follow import FileFollowSource


def _snap(path: Path) -> Snapshot:
    return FileFollowSource(path).poll()


# -- the recorded fixture is what the runner writes --------------------------------------------------


def test_the_recorded_fixture_is_a_two_rank_ddp_run() -> None:
    run = load_run(TINY_DDP)
    assert run.status == "ok" and run.environment["world_size"] == 2
    assert {p["rank"] for p in run.phases} == {0, 1}
    kinds = [json.loads(line)["type"] for line in (TINY_DDP / "events.jsonl").read_text().splitlines()]
    assert kinds.count("step") == 4 and kinds.count("rank_step") == 4
    assert sum(f.stat().st_size for f in TINY_DDP.iterdir()) < 200_000


# -- selection ---------------------------------------------------------------------------------------


def test_next_rank_cycles_each_rank_then_all_then_the_first() -> None:
    assert next_rank((0, 1), 0) == 1
    assert next_rank((0, 1), 1) is ALL
    assert next_rank((0, 1), ALL) == 0
    assert [next_rank((0, 1, 2, 3), r) for r in (0, 1, 2, 3)] == [1, 2, 3, ALL]
    assert next_rank((0, 1), 7) == 0  # a rank that is not there any more starts over
    assert next_rank((0,), 0) == 0 and next_rank((0,), ALL) == 0  # one rank: nothing to cycle
    assert next_rank((), 0) == 0


# -- what a snapshot knows about ranks ---------------------------------------------------------------


def test_snapshot_knows_the_ranks_and_keeps_the_other_ranks_steps(tiny_ddp: Path) -> None:
    snap = _snap(tiny_ddp)
    assert snap.world_size() == 2 and snap.ranks() == (0, 1)
    assert [s["step"] for s in snap.steps] == [0, 1, 2, 3]  # rank 0's, as RunData keeps them
    assert [(s["rank"], s["step"]) for s in snap.rank_steps] == [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert snap.steps_of(0) is snap.steps
    assert [s["loss"] for s in snap.steps_of(1)] == [s["loss"] for s in snap.rank_steps]
    assert snap.steps_of(5) == ()


def test_a_single_rank_run_has_one_rank(gpu_run: Path, cpu_run: Path) -> None:
    for path in (gpu_run, cpu_run):
        snap = _snap(path)
        assert snap.ranks() == (0,) and snap.world_size() == 1 and snap.rank_steps == ()


def test_announced_ranks_count_before_their_first_record(tmp_path: Path) -> None:
    events = ddp_gpu_events(finished=False)
    first_phase = next(i for i, e in enumerate(events) if e["type"] == "phase")
    snap = _snap(write_run(tmp_path / "r", events[: first_phase + 1]))  # rank 0's first record only
    assert snap.ranks() == (0, 1)
    assert snap.latest_step(1) == [] and snap.step_peaks(1) == {}


def test_latest_step_is_one_ranks_newest_complete_step(ddp_gpu: Path) -> None:
    snap = _snap(ddp_gpu)
    for rank in (0, 1):
        latest = snap.latest_step(rank)
        assert [p["phase"] for p in latest] == list(PHASES)
        assert {p["rank"] for p in latest} == {rank} and {p["step"] for p in latest} == {4}
    assert snap.latest_step() == snap.latest_step(0)  # the default is rank 0, whichever rank wrote last
    assert snap.phases[-1]["rank"] == 1


def test_step_peaks_per_rank_and_over_all_ranks(ddp_gpu: Path) -> None:
    snap = _snap(ddp_gpu)
    p0, p1, both = snap.step_peaks(0), snap.step_peaks(1), snap.step_peaks()
    assert set(p0) == set(p1) == set(PHASES)
    assert all(p0[ph] > p1[ph] for ph in PHASES)  # rank 0 holds more in every phase
    assert both == {ph: max(p0[ph], p1[ph]) for ph in PHASES}
    no_index = replace(snap, index=None, _memo={})  # the slow path reads the records themselves
    assert no_index.step_peaks(0) == p0 and no_index.step_peaks(1) == p1 and no_index.step_peaks() == both
    assert no_index.latest_step(1) == snap.latest_step(1) and no_index.ranks() == (0, 1)


# -- the views ---------------------------------------------------------------------------------------


def test_single_rank_view_is_what_the_dashboard_always_showed(gpu_run: Path) -> None:
    snap = _snap(gpu_run)
    for selected in (0, 1, ALL):
        view = rank_view(snap, selected)
        assert not view.multi and not view.all_ranks and view.label() == "" and view.title() == "phases"
        assert [dict(p) for p in view.latest] == snap.latest_step()
        assert dict(view.peaks) == snap.step_peaks()
        assert view.steps is snap.steps and view.spread == ()


def test_one_rank_of_several(ddp_gpu: Path) -> None:
    snap = _snap(ddp_gpu)
    view = rank_view(snap, 1)
    assert view.multi and view.selected == 1 and view.label() == "rank 1 of 2" and view.title() == "rank 1"
    assert {p["rank"] for p in view.latest} == {1}
    assert dict(view.peaks) == snap.step_peaks(1)
    assert [s["step"] for s in view.steps] == [0, 1, 2, 3, 4] and all(s["rank"] == 1 for s in view.steps)
    assert rank_view(snap, 0).steps is snap.steps
    assert rank_view(snap, 9).selected == 0  # a rank the run does not have falls back to the first
    assert rank_view(snap, 1) is view  # memoised per snapshot
    with pytest.raises(TypeError):
        view.latest[0]["acts"] = 0  # type: ignore[index]  # widgets get read-only records


def test_all_ranks_spread_has_min_max_and_the_rank_of_max(ddp_gpu: Path) -> None:
    snap = _snap(ddp_gpu)
    view = rank_view(snap, ALL)
    assert view.all_ranks and view.label() == "all 2 ranks" and view.title() == "all ranks"
    assert view.spread_steps == (4,) and [s.phase for s in view.spread] == list(PHASES)
    r0 = {p["phase"]: p for p in snap.latest_step(0)}
    r1 = {p["phase"]: p for p in snap.latest_step(1)}
    for sp in view.spread:
        assert (sp.hi, sp.hi_rank) == (bar_total(r0[sp.phase]), 0)
        assert (sp.lo, sp.lo_rank) == (bar_total(r1[sp.phase]), 1)
        assert sp.values == (r0[sp.phase]["params"], r0[sp.phase]["grads"], r0[sp.phase]["optim"],
                             r0[sp.phase]["acts"], r0[sp.phase]["other"])  # fmt: skip
        assert sp.peak == r0[sp.phase]["peak"] and sp.peak_rank == 0 and sp.ranks == 2 and not sp.even
    fwd = next(sp for sp in view.spread if sp.phase == "after_fwd")
    assert fwd.hi - fwd.lo == RANK1_LESS_ACTS + 512 * MIB - RANK1_OTHER
    assert dict(view.rank_peaks) == {0: max(snap.step_peaks(0).values()), 1: max(snap.step_peaks(1).values())}


def test_all_ranks_of_ddp_replicas_are_even(tiny_ddp: Path) -> None:
    view = rank_view(_snap(tiny_ddp), ALL)
    assert view.spread_steps == (3,) and len(view.spread) == 4
    assert all(sp.even and sp.ranks == 2 for sp in view.spread)  # DDP replicas hold the same tensors


def test_all_ranks_steps_are_slowest_time_mean_loss_summed_throughput(ddp_gpu: Path) -> None:
    snap = _snap(ddp_gpu)
    steps = rank_view(snap, ALL).steps
    assert [s["step"] for s in steps] == [0, 1, 2, 3, 4]
    for s, a, b in zip(steps, snap.steps_of(0), snap.steps_of(1), strict=True):
        assert s["seconds"] == max(a["seconds"], b["seconds"])
        assert s["loss"] == pytest.approx((a["loss"] + b["loss"]) / 2)
        assert s["samples_per_s"] == pytest.approx(a["samples_per_s"] + b["samples_per_s"])


def test_combine_steps_keeps_only_steps_every_rank_finished() -> None:
    a = [{"step": 0, "seconds": 1.0, "loss": 2.0, "samples_per_s": 4.0}, {"step": 1, "seconds": 1.0, "loss": 1.0}]
    b = [{"step": 0, "seconds": 3.0, "loss": 4.0, "samples_per_s": None}]
    out = combine_steps({0: a, 1: b})
    assert [dict(s) for s in out] == [{"step": 0, "seconds": 3.0, "loss": 3.0, "samples_per_s": 4.0}]
    assert combine_steps({0: a, 1: []}) == combine_steps({0: a})  # a rank with no steps does not hold others back
    assert combine_steps({}) == ()


def _rec(rank: int, step: int, phase: str, acts: int) -> dict[str, object]:
    return {"rank": rank, "step": step, "micro_step": 0, "phase": phase, "params": GIB, "grads": 0, "optim": 0,
            "acts": acts, "other": 0}  # fmt: skip


def test_choose_steps_compares_the_newest_step_every_rank_completed() -> None:
    r0 = [_rec(0, s, ph, s * MIB) for s in (0, 1, 2) for ph in PHASES]
    r1 = [_rec(1, s, ph, s * MIB) for s in (0, 1) for ph in PHASES] + [_rec(1, 2, "before_fwd", 0)]
    chosen, shown = choose_steps({0: r0, 1: r1})
    assert shown == (1,) and {p["step"] for phs in chosen.values() for p in phs.values()} == {1}
    # No step complete on every rank: each rank's own latest, and the steps say which.
    chosen, shown = choose_steps({0: r0, 1: [_rec(1, 5, "before_fwd", 0)]})
    assert shown == (2, 5) and set(chosen[1]) == {"before_fwd"}
    assert choose_steps({0: [], 1: []}) == ({}, ())


def test_phase_spread_breaks_ties_towards_the_lowest_rank() -> None:
    chosen = {r: {"after_fwd": _rec(r, 0, "after_fwd", MIB)} for r in (2, 0, 1)}
    (sp,) = phase_spread(chosen, {})
    assert sp.even and (sp.lo_rank, sp.hi_rank) == (0, 0) and sp.ranks == 3
    assert sp.peak == bar_total(chosen[0]["after_fwd"]) - 0  # no allocator peak: the total stands in
    assert phase_spread({}, {}) == ()


# -- the same from every source ------------------------------------------------------------------------


def test_live_follow_catches_a_lagging_rank_at_the_common_step(tmp_path: Path, clock: FrozenClock) -> None:
    full = ddp_gpu_events(finished=False)
    lagging = ddp_gpu_events(finished=False, rank1_steps=3)
    d = write_run(tmp_path / "live", lagging)
    src = FileFollowSource(d, mode="live", clock=clock)
    snap = src.poll()
    view = rank_view(snap, ALL)
    assert view.spread_steps == (2,)  # rank 1 has finished step 2 only
    assert [s["step"] for s in view.steps] == [0, 1, 2]
    assert {p["step"] for p in rank_view(snap, 0).latest} == {4}
    with open(d / "events.jsonl", "a", encoding="utf-8") as fh:  # rank 1 catches up
        for e in full:
            if e.get("rank") == 1 and e["type"] in ("phase", "rank_step") and e["step"] >= 3:
                fh.write(json.dumps(e) + "\n")
    later = src.poll()
    assert later.data_version > snap.data_version
    assert rank_view(later, ALL).spread_steps == (4,) and len(later.rank_steps) == 5


def test_replay_shows_each_ranks_data_up_to_the_playhead(ddp_gpu: Path, clock: FrozenClock) -> None:
    src = ReplaySource(ddp_gpu, clock=clock, background=False)
    events = ddp_gpu_events()
    rank_step_t = [e["t"] for e in events if e["type"] == "rank_step"]
    src.seek_to(rank_step_t[1] + 0.001)  # rank 1 has finished two steps
    snap = src.poll()
    assert [s["step"] for s in snap.rank_steps] == [0, 1]
    assert [s["step"] for s in rank_view(snap, 1).steps] == [0, 1]
    assert rank_view(snap, ALL).spread_steps[-1] in (1, 2)
    assert snap.step_peaks(1) == {
        ph: max(bar_total(p) + 2 * GIB for p in snap.phases if p["rank"] == 1 and p["phase"] == ph)
        for ph in PHASES
        if any(p["rank"] == 1 and p["phase"] == ph for p in snap.phases)
    }
    src.seek_fraction(1.0)
    end = src.poll()
    assert len(end.rank_steps) == 5 and rank_view(end, ALL).spread_steps == (4,)
    # Same figures whether followed or replayed.
    followed = FileFollowSource(ddp_gpu).poll()
    for sel in (0, 1, ALL):
        a, b = rank_view(end, sel), rank_view(followed, sel)
        assert (a.spread, a.rank_peaks, a.spread_steps) == (b.spread, b.rank_peaks, b.spread_steps)
        assert [dict(p) for p in a.latest] == [dict(p) for p in b.latest]
        assert [dict(s) for s in a.steps] == [dict(s) for s in b.steps]
