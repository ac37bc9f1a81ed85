"""The run index (issue 17): ``show`` and ``compare`` read a run's ``index`` record instead of every sample.

The expected values are always the same run read in full (``load_run`` without the index, the path every
profile took before): the text of ``show``, the rows of ``compare`` and the predicted-vs-measured rows must
be equal, for the whole profile and for the profile cut at every line and at a stride of bytes (a cut
before the index, or through it, falls back to the full read; a cut after it uses it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from blipmon.core.layout import EVENTS
from blipmon.core.profile import EventWriter, find_index
from blipmon.core.report import compare_rows, render_show
from blipmon.core.run import RunData, index_fields, load_run
from blipmon.estimate.compare import predicted_vs_measured
from blipmon.runner.child import _write_index
from tests.recorded import DATA, TINY_DDP, ddp_gpu_events, gpu_events, write_run


def _is_rank0_end(rec: dict[str, Any]) -> bool:
    """Rank 0's ``end`` (or the parent's ``exit``): rank 0 writes the index just before its own ``end``."""
    return rec.get("type") == "exit" or (rec.get("type") == "end" and not rec.get("rank"))


def _with_index(src_events: Path, run_dir: Path) -> bytes:
    """``src_events`` copied into ``run_dir`` with an index written where the child writes it (before ``end``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = src_events.read_bytes().splitlines(keepends=True)
    cut = next(i for i, raw in enumerate(lines) if _is_rank0_end(json.loads(raw)))
    (run_dir / EVENTS).write_bytes(b"".join(lines[:cut]))
    writer = EventWriter(run_dir / EVENTS, reserve_dir=run_dir)
    _write_index(writer, run_dir)
    writer.close()
    with open(run_dir / EVENTS, "ab") as fh:
        fh.write(b"".join(lines[cut:]))
    return (run_dir / EVENTS).read_bytes()


def _same(fast: RunData, full: RunData) -> None:
    assert render_show(fast) == render_show(full)
    assert compare_rows([fast, full]) == compare_rows([full, full])
    assert fast.peaks() == full.peaks()
    assert fast.status == full.status and fast.warnings == full.warnings
    if isinstance(full.prediction, dict) and full.prediction.get("phases"):
        assert predicted_vs_measured(fast.prediction, fast.summary()) == predicted_vs_measured(
            full.prediction, full.summary()
        )


def _runs(tmp_path: Path) -> dict[str, Path]:
    return {
        "tiny-cpu": DATA / "tiny-cpu" / EVENTS,
        "tiny-ddp": TINY_DDP / EVENTS,
        "gpu-oom": write_run(tmp_path / "src-gpu", gpu_events()) / EVENTS,
        "gpu-ok": write_run(tmp_path / "src-ok", gpu_events(oom_step=None)) / EVENTS,
        "ddp-gpu": write_run(tmp_path / "src-ddp", ddp_gpu_events()) / EVENTS,
    }


@pytest.mark.parametrize("name", ["tiny-cpu", "tiny-ddp", "gpu-oom", "gpu-ok", "ddp-gpu"])
def test_index_summary_matches_full_read(tmp_path: Path, name: str) -> None:
    src = _runs(tmp_path)[name]
    run_dir = tmp_path / "run"
    _with_index(src, run_dir)
    assert find_index(run_dir) is not None
    fast, full = load_run(run_dir, summary=True), load_run(run_dir)
    assert fast.indexed is not None and full.indexed is None  # the index was used, and only when asked
    _same(fast, full)
    # ... and equal to the profile as recorded, without any index.
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(src, plain / EVENTS)
    original = load_run(plain)
    assert render_show(fast).replace(str(run_dir), "P") == render_show(original).replace(str(plain), "P")


def test_index_keeps_few_phases_and_no_samples(tmp_path: Path) -> None:
    """The point of it: a run's index holds a handful of phase records and no sample, whatever the run's length."""
    run_dir = write_run(tmp_path / "long", gpu_events(steps=60, oom_step=None, samples_per_step=50))
    fields = index_fields(run_dir)
    full = load_run(run_dir)
    assert fields["n_phases"] == len(full.phases) == 60 * 4
    assert fields["n_samples"] == len(full.samples) == 60 * 4 * (50 // 4)  # the fixture samples 12 per phase
    # steps 0 and 1 (8 records), the last four, the peak step's four at most: never more than 16.
    assert len(fields["phases"]) <= 16
    assert fields["sample_maxima"] == full.samples.maxima()
    assert fields["upto"] == (run_dir / EVENTS).stat().st_size


def _cuts(data: bytes) -> list[int]:
    at = {i + 1 for i, b in enumerate(data) if b == 10}  # every line boundary
    at |= {i - 1 for i in at if i > 1} | {i + 1 for i in at}  # either side of one
    at |= set(range(1, len(data), 97))  # and through lines
    return sorted(i for i in at if 0 < i <= len(data))


@pytest.mark.parametrize("name", ["gpu-oom", "tiny-cpu"])
def test_profile_cut_anywhere_still_opens_with_the_same_summary(tmp_path: Path, name: str) -> None:
    data = _with_index(_runs(tmp_path)[name], tmp_path / "whole")
    header_end = data.index(b"\n") + 1
    run_dir = tmp_path / "cut"
    run_dir.mkdir()
    used = 0
    for n in _cuts(data):
        (run_dir / EVENTS).write_bytes(data[:n])
        if n < header_end:
            continue  # nothing readable yet: both refuse alike (checked in test_profile.py)
        fast, full = load_run(run_dir, summary=True), load_run(run_dir)
        used += fast.indexed is not None
        _same(fast, full)
    # Only the cuts after the whole index line can use it: the index line and the end and exit lines.
    index_end = data.index(b"\n", data.index(b'{"type":"index",')) + 1
    after = [n for n in _cuts(data) if n >= index_end]
    assert used == len(after)


def test_records_after_the_index_that_change_the_summary_mean_a_full_read(tmp_path: Path) -> None:
    """A step written after the index (another rank still training) is not in it: the file is read in full."""
    run_dir = tmp_path / "run"
    _with_index(write_run(tmp_path / "src", gpu_events(oom_step=None)) / EVENTS, run_dir)
    with open(run_dir / EVENTS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"type": "step", "t": 999.0, "step": 99, "seconds": 9.0, "loss": 0.5}) + "\n")
    fast, full = load_run(run_dir, summary=True), load_run(run_dir)
    assert fast.indexed is None
    assert len(fast.steps) == len(full.steps) == 7
    _same(fast, full)


def test_a_forged_index_of_the_wrong_shape_is_passed_over(tmp_path: Path) -> None:
    """A profile is anyone's file: an index whose fields are not what they should be means a full read."""
    run_dir = write_run(tmp_path / "run", gpu_events())
    bad: dict[str, Any] = {**index_fields(run_dir), "phases": "not a list"}
    with open(run_dir / EVENTS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"type": "index", "t": 1.0, **bad}, separators=(",", ":")) + "\n")
    assert find_index(run_dir) is not None
    fast = load_run(run_dir, summary=True)
    assert fast.indexed is None
    _same(fast, load_run(run_dir))


def test_a_real_run_writes_its_index_and_show_uses_it(start_run: Any) -> None:
    """``blipmon run`` of the tiny demo: the child writes the index before ``end``, and ``show`` reads through it."""
    done = start_run("tiny/blip2-opt").finish()
    assert done.returncode == 0, done.stderr
    run_dir = done.run_dir
    found = find_index(run_dir)
    assert found is not None
    rec, at = found
    data = (run_dir / EVENTS).read_bytes()
    assert rec["upto"] == at  # nothing between the index's view of the file and the index itself
    after = [json.loads(line)["type"] for line in data[at:].splitlines()]
    assert after == ["index", "end", "exit"]
    fast, full = load_run(run_dir, summary=True), load_run(run_dir)
    assert fast.indexed is not None
    assert rec["n_samples"] == len(full.samples) and rec["n_phases"] == len(full.phases)
    _same(fast, full)
