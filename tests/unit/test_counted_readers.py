"""Readers of a run whose steps are not all counted in full (docs/profile-format.md, ``phase``).

A step between the counted ones has ``grads``, ``optim``, ``acts`` and ``other`` null: every view that describes a
phase's categories takes a counted record, while the run's maxima still cover every record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blipmon.core.ranks import choose_steps
from blipmon.core.report import compare_rows, rank_peaks, render_show
from blipmon.core.run import PHASES, RunData, counted, kept_phases, peak_record

GIB = 1 << 30


def _rec(step: int, phase: str, *, full: bool, peak: int, rank: int = 0, host: bool = False) -> dict[str, Any]:
    rec: dict[str, Any] = {"step": step, "micro_step": 0, "rank": rank, "phase": phase, "t": float(step),
                           "params": GIB, "grads": None, "optim": None, "acts": None, "other": None,
                           "allocated": peak // 2, "peak": peak, "reserved": peak, "host_rss": GIB}  # fmt: skip
    if full:
        rec.update(grads=GIB, optim=2 * GIB, acts=3 * GIB if phase == "after_fwd" else 0, other=0)
        if host:
            rec.update(optim_host=2 * GIB, grads_host=0)
    return rec


def _run(steps: int, every: int, *, bigger_uncounted: bool = False, host: bool = False) -> RunData:
    run = RunData(path=Path("cadence"))
    for s in range(steps):
        full = s < 2 or s % every == 0
        for ph in PHASES:
            peak = 8 * GIB if ph == "after_fwd" else 5 * GIB
            if bigger_uncounted and not full and ph == "after_fwd":
                peak += GIB  # the allocator's peak of a step between the counted ones is the run's highest
            run.phases.append(_rec(s, ph, full=full, peak=peak, host=host))
    return run


def test_the_peak_phase_is_the_largest_counted_record_and_the_peaks_cover_every_record() -> None:
    run = _run(6, 4, bigger_uncounted=True)  # counted: 0, 1, 4
    peak = run.peak_phase()
    assert peak is not None and counted(peak) and (peak["step"], peak["phase"]) == (0, "after_fwd")
    assert run.peaks()["allocated"] == 9 * GIB  # step 2's (or 3's, 5's) peak, not counted, is still the run's
    assert peak_record([]) is None
    uncounted_only = [_rec(3, "after_fwd", full=False, peak=GIB)]
    assert peak_record(uncounted_only) is uncounted_only[0]  # nothing counted: the largest record stands in
    assert rank_peaks(run)[0] is peak
    assert run.phases.index(peak) in kept_phases(run)  # ``show``'s fast path keeps the same record


def test_show_and_compare_name_categories_of_a_counted_step() -> None:
    run = _run(6, 4, bigger_uncounted=True)
    text = render_show(run)
    assert "None" not in text
    rows = {r.label: r.values for r in compare_rows([run, run])}
    assert rows["acts @ peak phase"] == [3 * GIB, 3 * GIB]
    assert rows["peak allocated"] == [9 * GIB, 9 * GIB]


def test_offload_rows_come_from_the_last_counted_record_not_the_last_four() -> None:
    run = _run(7, 5, host=True)  # counted: 0, 1, 5; step 6's four records, the last, are not
    assert all(not counted(p) for p in run.phases[-4:])
    rows = {r.label: r.values for r in compare_rows([run])}
    assert rows["optim on host @ peak phase"] == [2 * GIB]
    assert "offload  at the last phase: optimizer state 2.00 GiB on the host" in render_show(run)


def test_all_ranks_compare_the_newest_step_counted_on_every_rank() -> None:
    per_rank = {r: [_rec(s, ph, full=s < 2, peak=GIB, rank=r) for s in range(4) for ph in PHASES] for r in (0, 1)}
    chosen, shown = choose_steps(per_rank)
    assert shown == (1,) and all(counted(p) for phs in chosen.values() for p in phs.values())
    # No step counted on both: the newest complete one, as before.
    per_rank[1] = [_rec(s, ph, full=False, peak=GIB, rank=1) for s in (2, 3) for ph in PHASES]
    _chosen, shown = choose_steps(per_rank)
    assert shown == (3,)


def test_the_lab_lines_are_printed_at_steps_0_1_and_the_first_counted_step_of_every_50(
    tmp_path: Path, capsys: Any
) -> None:
    from blipmon.integrations._recorder import Recorder

    rec = Recorder(tmp_path, sample_hz=1.0, print_phases=True, source="test", module_every=7)
    printed = []
    for step in range(120):
        rec.step = step
        full = step < 2 or step % 7 == 0
        for ph in PHASES:
            rec._maybe_print(ph, _rec(step, ph, full=full, peak=GIB))
        if capsys.readouterr().out:
            printed.append(step)
    # 50 and 100 are not counted with every 7th step: the first counted step after each is printed instead.
    assert printed == [0, 1, 56, 105]
