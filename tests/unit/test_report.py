"""``show``'s text and ``compare``'s table, markdown, CSV and JSON, on runs built from events."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from blipmon.core.report import Row, compare_rows, median_step_seconds, oom_where, render_compare, render_show
from blipmon.core.run import RunData

GIB, MIB = 1024**3, 1024**2


def make_run(name: str, *, cuda: bool = False, peak: int = 3 * GIB, steps: tuple[float, ...] = (2.0, 1.0, 1.2),
             status: str = "ok", path: Path | None = None, extra: tuple[dict[str, Any], ...] = ()) -> RunData:  # fmt: skip
    env = {"type": "environment", "t": 0.1, "device": "cuda" if cuda else "cpu", "host_total_bytes": 64 * GIB,
           "gpu_name": "NVIDIA H100 80GB HBM3" if cuda else None, "gpu_total_bytes": 80 * GIB if cuda else None,
           "gpu_reason": None if cuda else "no NVIDIA GPU visible to torch"}  # fmt: skip
    cfg = {"name": name, "model": {"id": "tiny/blip2-opt", "weights": "random"}, "job": {"kind": "train"},
           "train": {"batch_size": 8, "accumulate_grad_batches": 2, "precision": "bf16-true", "optim": "adamw",
                     "act_ckpt": True, "lora": {"enabled": True}, "qlora": False}}  # fmt: skip

    def alloc(ph: str) -> dict[str, Any]:  # on CUDA every phase has allocator figures; the spike is in forward
        if not cuda:
            return {}
        top = peak if ph == "after_fwd" else peak // 4
        return {"allocated": top // 2, "peak": top, "reserved": peak + GIB, "other": 0}

    phases = []
    for s in range(len(steps)):
        for ph, acts, grads in (("before_fwd", 0, 0), ("after_fwd", GIB, 0), ("after_bwd", 0, GIB // 2), ("after_opt_step", 0, GIB // 2)):  # fmt: skip
            phases.append({"type": "phase", "t": 1.0 + s, "step": s, "micro_step": 0, "rank": 0, "phase": ph,
                           "params": GIB, "grads": grads, "optim": GIB if s or ph == "after_opt_step" else 0,
                           "acts": acts, "other": None, "allocated": None, "peak": None, "reserved": None,
                           "host_rss": 2 * GIB, **alloc(ph)})  # fmt: skip
    events = [
        {"type": "header", "t": 0.0, "format_version": 1, "name": name, "pid": 1, "hostname": "elsewhere"},
        {"type": "config", "t": 0.0, "config": cfg},
        env,
        {"type": "load", "t": 0.5, "seconds": 1.5, "params_bytes": GIB, "placement": {"cpu": GIB}, "weights": "random"},
        {"type": "plan", "t": 0.6, "total_steps": len(steps), "trainable_params": 1000, "total_params": 250_000_000},
        *phases,
        *({"type": "step", "t": 2.0 + i, "step": i, "seconds": s, "loss": 3.0 - i, "samples_per_s": 16 / s}
          for i, s in enumerate(steps)),
        *extra,
        {"type": "end", "t": 9.0, "status": status, "code": {"ok": 0, "oom": 3, "error": 1, "stopped": 4}.get(status, 1)},
    ]  # fmt: skip
    run = RunData(path=path)
    run.extend(events)
    return run


# -- rows ----------------------------------------------------------------------------------------------


def test_best_index() -> None:
    assert Row("x", [3, 1, 2], "bytes", "lower").best_index() == 1
    assert Row("x", [3, 1, 2], "rate", "higher").best_index() == 0
    assert Row("x", [None, 5, 4], "bytes", "lower").best_index() == 2
    assert Row("x", [2, 2], "bytes", "lower").best_index() is None  # a tie is no winner
    assert Row("x", [None, 5], "bytes", "lower").best_index() is None  # one number is no comparison
    assert Row("x", ["a", "b"], "text").best_index() is None


def test_median_step_skips_the_warm_up_step() -> None:
    assert median_step_seconds(make_run("a", steps=(9.0, 1.0, 2.0, 3.0))) == 2.0
    assert median_step_seconds(make_run("a", steps=(9.0,))) == 9.0
    assert median_step_seconds(make_run("a", steps=())) is None


def test_compare_rows_hold_raw_numbers() -> None:
    a, b = make_run("a", cuda=True, peak=4 * GIB), make_run("b", cuda=True, peak=2 * GIB)
    rows = {r.label: r for r in compare_rows([a, b])}
    assert rows["status"].values == ["ok", "ok"]
    assert rows["device"].values == ["NVIDIA H100 80GB HBM3"] * 2
    assert rows["peak allocated"].values == [4 * GIB, 2 * GIB] and rows["peak allocated"].best_index() == 1
    assert rows["peak reserved"].values == [5 * GIB, 3 * GIB]
    assert rows["params @ peak phase"].values == [GIB, GIB]
    assert rows["acts @ peak phase"].values == [GIB, GIB]
    assert rows["peak phase"].values == ["step 0 after_fwd", "step 0 after_fwd"]
    assert rows["steps"].values == [3, 3]
    assert rows["load time"].values == [1.5, 1.5]


def test_cpu_runs_compare_with_nulls_for_allocator_figures() -> None:
    rows = {r.label: r for r in compare_rows([make_run("a"), make_run("b")])}
    assert rows["peak allocated"].values == [None, None]
    assert rows["peak device used"].values == [None, None]
    assert rows["device"].values == ["cpu", "cpu"]


# -- compare formats ----------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> list[RunData]:
    oom = {"type": "oom", "t": 5.0, "step": 2, "micro_step": 1, "phase": "backward", "requested_bytes": 2 * GIB,
           "message": "CUDA out of memory. Tried to allocate 2.00 GiB"}  # fmt: skip
    return [
        make_run("base", cuda=True, peak=4 * GIB, path=tmp_path / "base"),
        make_run("bs|16", cuda=True, peak=2 * GIB, steps=(2.0, 2.0, 2.0), status="oom", extra=(oom,),
                 path=tmp_path / "bs16"),
    ]  # fmt: skip


def test_compare_table(pair: list[RunData]) -> None:
    out = render_compare(pair, "table")
    lines = out.splitlines()
    assert lines[0].split() == ["base", "bs|16"]
    peak = next(x for x in lines if x.startswith("peak allocated"))
    assert "4.00 GiB" in peak and "2.00 GiB (-50.0%) *" in peak  # the best is starred, deltas vs the first run
    assert "step 2 backward, tried 2.00 GiB" in next(x for x in lines if x.startswith("out of memory at"))
    assert out.rstrip().endswith("— = not measured on that device")
    rows = compare_rows(pair)
    w = max(len(r.label) for r in rows) + 2  # the label column is aligned: values start in one column
    for row, text in zip(rows, lines[1 : len(rows) + 1], strict=True):
        assert text[:w].rstrip() == row.label
        assert len(text) <= w or text[w] != " " or row.values[0] in ("", None)  # an empty row is stripped


def test_compare_markdown(pair: list[RunData]) -> None:
    out = render_compare(pair, "markdown")
    lines = out.splitlines()
    assert lines[0] == "|  | base | bs\\|16 |"  # a pipe in a run's name would split the header cell
    assert lines[1] == "|---|---|---|"
    peak = next(x for x in lines if x.startswith("| peak allocated |"))
    assert peak == "| peak allocated | 4.00 GiB | **2.00 GiB (-50.0%)** |"
    assert "| status | ok | oom |" in lines
    assert lines[-1].startswith("**bold** = best of the row")


def test_compare_markdown_escapes_pipes_in_cells() -> None:
    run = make_run("a")
    run.error = {"message": "x"}
    out = render_compare([run, make_run("b", extra=({"type": "oom", "t": 1, "step": 0, "phase": "a|b"},))], "markdown")
    assert "step 0 a\\|b" in out


def test_compare_csv(pair: list[RunData]) -> None:
    rows = list(csv.reader(io.StringIO(render_compare(pair, "csv"))))
    assert rows[0] == ["metric", "base", "bs|16"]
    by = {r[0]: r[1:] for r in rows[1:]}
    assert by["peak allocated"] == [str(4 * GIB), str(2 * GIB)]  # raw bytes, for spreadsheets
    assert by["status"] == ["ok", "oom"]
    assert by["peak device used"] == ["", ""]
    assert len(rows) == 1 + len(compare_rows(pair))


def test_compare_json(pair: list[RunData], tmp_path: Path) -> None:
    data = json.loads(render_compare(pair, "json"))
    assert data["runs"] == [
        {"name": "base", "path": str(tmp_path / "base")},
        {"name": "bs|16", "path": str(tmp_path / "bs16")},
    ]
    rows = {r["label"]: r for r in data["rows"]}
    assert rows["peak allocated"] == {
        "label": "peak allocated",
        "kind": "bytes",
        "better": "lower",
        "values": [4 * GIB, 2 * GIB],
    }
    assert rows["peak device used"]["values"] == [None, None]
    assert [r["label"] for r in data["rows"]] == [r.label for r in compare_rows(pair)]


def test_every_format_shows_the_same_rows(pair: list[RunData]) -> None:
    labels = [r.label for r in compare_rows(pair)]
    table, md = render_compare(pair, "table"), render_compare(pair, "markdown")
    for label in labels:
        assert label in table and f"| {label} |" in md


# -- show --------------------------------------------------------------------------------------------


def test_show_a_finished_cpu_run() -> None:
    out = render_show(make_run("lab/a", path=Path("/runs/lab-a")))
    assert out.startswith("run      lab/a   [ok]\n")
    assert "path     /runs/lab-a" in out
    assert "device   CPU (no NVIDIA GPU visible to torch)" in out
    assert "(random weights: losses are meaningless, memory is real)" in out
    assert "batch 8 x accumulate 2, bf16-true, adamw act-ckpt lora" in out
    assert "params   1,000 trainable of 250,000,000" in out
    assert "load     1.50 s, parameters 1.00 GiB (cpu 1.00 GiB)" in out
    assert "steps    3/3, median 1.10 s per step (first 2.00 s)" in out and "last loss 1.0000" in out
    assert "peaks    allocated —, reserved —, device used —, host RSS 2.00 GiB" in out
    assert "outcome  finished" in out
    table = out[out.index("phases   (GiB;") :]
    for phase in ("before_fwd", "after_fwd", "after_bwd", "after_opt_step"):
        assert phase in table
    assert "—" in table  # allocator columns on the CPU


def test_show_marks_the_peak_phase_and_includes_its_step() -> None:
    run = make_run("a", cuda=True, steps=(1.0, 1.0, 1.0, 1.0))
    run.phases[-3]["peak"] = 9 * GIB  # step 3 after_fwd
    out = render_show(run)
    peak_lines = [x for x in out.splitlines() if "<- peak" in x]
    assert len(peak_lines) == 1 and peak_lines[0].split()[:3] == ["3", "0", "after_fwd"]
    assert "device   NVIDIA H100 80GB HBM3, 80.00 GiB" in out


def test_show_an_oom_run() -> None:
    oom = {"type": "oom", "t": 5.0, "step": 2, "micro_step": 1, "phase": "backward", "requested_bytes": 2 * GIB,
           "message": "CUDA out of memory."}  # fmt: skip
    out = render_show(make_run("a", cuda=True, status="oom", extra=(oom,)))
    assert "[oom]" in out
    assert "outcome  OUT OF MEMORY at step 2 (micro-step 1, backward) trying to allocate 2.00 GiB" in out


def test_show_an_error_run_with_its_message_and_the_exit_code() -> None:
    err = {"type": "error", "t": 5.0, "message": "ValueError: Target modules {'x'} not found", "traceback": "..."}
    run = make_run("a", status="error", extra=(err,))
    run.apply({"type": "exit", "t": None, "code": 1, "signal": None})
    out = render_show(run)
    assert "outcome  failed with an error: ValueError: Target modules {'x'} not found (exit 1)" in out


def test_show_a_killed_run_notes_and_warnings() -> None:
    run = make_run("a")
    run.end = None
    run.apply({"type": "exit", "t": None, "code": None, "signal": "SIGKILL"})
    run.apply({"type": "note", "t": 1.0, "message": "NVML unavailable"})
    run.warnings = ["events.jsonl: line 7 is corrupt and was skipped"]
    out = render_show(run)
    assert "[killed]" in out and "outcome  killed (signal SIGKILL)" in out
    assert "note     NVML unavailable" in out
    assert "warning  events.jsonl: line 7 is corrupt and was skipped" in out


def test_show_a_load_job_and_a_generate_job() -> None:
    run = RunData()
    run.extend([
        {"type": "header", "t": 0.0, "format_version": 1, "name": "gen", "pid": 1, "hostname": "elsewhere"},
        {"type": "config", "t": 0.0, "config": {"name": "gen", "job": {"kind": "generate"}, "model": {"id": "m"}}},
        {"type": "load", "t": 1.0, "seconds": 0.25, "params_bytes": 3 * MIB, "placement": {"cuda:0": 2 * MIB, "cpu": MIB}},
        {"type": "generate", "t": 2.0, "call": 0, "seconds": 0.5, "batch_size": 4, "peak": None, "host_rss": GIB},
        {"type": "end", "t": 3.0, "status": "ok", "code": 0},
    ])  # fmt: skip
    out = render_show(run)
    assert "job      generate" in out
    assert "load     250 ms, parameters 3.00 MiB (cuda:0 2.00 MiB, cpu 1.00 MiB)" in out
    assert "generate call 0: 500 ms for 4 images, peak —, host 1.00 GiB" in out
    assert "phases" not in out and "steps" not in out


def test_oom_where() -> None:
    assert oom_where(make_run("a")) == ""
    run = make_run("a", extra=({"type": "oom", "t": 1, "step": 4, "phase": "forward", "requested_bytes": None},))
    assert oom_where(run) == "step 4 forward"


# -- ranks -----------------------------------------------------------------------------------------------


def _two_ranks(rank1_seconds: tuple[Any, ...]) -> RunData:
    """``make_run``'s rank 0 (steps 2.0, 1.0, 1.2 s) with a rank 1 that recorded phases and ``rank_step`` records."""
    r1_phases = tuple(
        {"type": "phase", "t": 1.0 + s, "step": s, "micro_step": 0, "rank": 1, "phase": ph, "params": GIB,
         "grads": 0, "optim": GIB, "acts": 0, "other": None, "host_rss": 2 * GIB}
        for s in range(3) for ph in ("before_fwd", "after_fwd", "after_bwd", "after_opt_step")
    )  # fmt: skip
    r1_steps = tuple(
        {"type": "rank_step", "t": 2.0 + i, "rank": 1, "step": i, "seconds": v, "loss": 1.0, "samples_per_s": 4.0}
        for i, v in enumerate(rank1_seconds)
    )
    return make_run("ddp", extra=r1_phases + r1_steps)


def _rank_lines(text: str) -> dict[int, str]:
    return {int(line.split()[1].rstrip(":")): line for line in text.splitlines() if line.startswith("  rank ")}


def test_show_gives_each_ranks_median_step_time() -> None:
    text = render_show(_two_ranks((3.0, 2.0, 2.5, 2.25)))
    assert "ranks    2; each rank's peak phase" in text and "step time" in text
    lines = _rank_lines(text)
    # the first step is warm-up and left out, as in the run's own median: rank 0 -> median(1.0, 1.2)
    assert "median step 1.10 s (3 steps)" in lines[0] and "<- max" in lines[0]
    assert "median step 2.25 s (4 steps)" in lines[1]


def test_show_survives_a_rank_without_steps_or_step_times() -> None:
    lines = _rank_lines(render_show(_two_ranks(())))
    assert lines[1].endswith(", no steps")
    lines = _rank_lines(render_show(_two_ranks((None, "x"))))
    assert "median step — (2 steps)" in lines[1]
