"""The per-module records folded into rows (core/modules.py) and the JSON summary's ``modules`` key."""

from __future__ import annotations

import json
from pathlib import Path

from blipmon.core.modules import ModuleRecords, ModuleRow, rows_from_json
from blipmon.core.run import RunData, load_run

TREE = {"type": "module_tree", "rank": 0, "depth": 1, "modules": ["", "vision_model", "language_model"]}


def _mods(step: int, phase: str, params: list, acts: list, micro: int = 0, rank: int = 0) -> dict:
    return {
        "type": "modules",
        "step": step,
        "micro_step": micro,
        "rank": rank,
        "phase": phase,
        "params": params,
        "grads": [0, 0, 0],
        "optim": [0, 0, 0],
        "acts": acts,
    }


def test_rows_align_with_the_tree_and_keep_recording_order() -> None:
    m = ModuleRecords()
    m.apply(TREE)
    m.apply(_mods(0, "before_fwd", [30, 10, 20], [0, 0, 0]))
    m.apply(_mods(0, "after_fwd", [30, 10, 20], [7, 2, 4]))
    assert [r.module for r in m.rows] == ["", "vision_model", "language_model"] * 2
    assert m.at(0, "after_fwd") == [
        ModuleRow(0, 0, 0, "after_fwd", "", 30, 0, 0, 7),
        ModuleRow(0, 0, 0, "after_fwd", "vision_model", 10, 0, 0, 2),
        ModuleRow(0, 0, 0, "after_fwd", "language_model", 20, 0, 0, 4),
    ]
    assert m.at(0, "after_fwd")[0].total == 37
    assert m.boundaries() == [(0, 0, 0, "before_fwd"), (0, 0, 0, "after_fwd")]


def test_a_record_that_does_not_match_its_tree_is_dropped_whole() -> None:
    m = ModuleRecords()
    m.apply(_mods(0, "after_fwd", [1, 2, 3], [0, 0, 0]))  # no tree yet
    m.apply(TREE)
    m.apply(_mods(0, "after_fwd", [1, 2], [0, 0]))  # too short
    m.apply(_mods(0, "after_fwd", [1, -2, 3], [0, 0, 0]))  # negative
    m.apply(_mods(0, "after_fwd", [1, "2", 3], [0, 0, 0]))  # a string
    m.apply(_mods(0, "after_fwd", [1, True, 3], [0, 0, 0]))  # a bool
    m.apply(_mods(0, "sideways", [1, 2, 3], [0, 0, 0]))  # no such phase
    m.apply({**TREE, "modules": ["", "a", "a"]})  # duplicate names: the tree is refused, the old one stays
    assert m.rows == [] and m.dropped == 7
    assert m.trees[0] == ("", "vision_model", "language_model")


def test_last_micro_step_by_default_and_the_last_boundary_before_an_oom() -> None:
    m = ModuleRecords()
    m.apply(TREE)
    for micro in (0, 1):
        for phase in ("before_fwd", "after_fwd", "after_bwd"):
            m.apply(_mods(3, phase, [9, 4, 5], [micro, 0, micro], micro=micro))
    assert {r.acts for r in m.at(3, "after_fwd")} == {1, 0}
    assert {r.micro_step for r in m.at(3, "after_fwd")} == {1}
    assert {r.micro_step for r in m.at(3, "after_fwd", micro_step=0)} == {0}
    # An OOM in micro-step 1's backward: the last boundary reached is that micro-step's after_fwd.
    assert {r.boundary for r in m.last_before(3, 1, "backward")} == {(0, 3, 1, "after_fwd")}
    assert {r.boundary for r in m.last_before(3, 1, "forward")} == {(0, 3, 1, "before_fwd")}
    assert {r.boundary for r in m.last_before(3, 1, "optimizer_step")} == {(0, 3, 1, "after_bwd")}
    assert {r.boundary for r in m.last_before(3, 1, "after_bwd")} == {(0, 3, 1, "after_bwd")}
    assert {r.boundary for r in m.last_before(4, 0, "forward")} == {(0, 3, 1, "after_bwd")}  # a step later
    assert m.last_before(3, 0, None) == []  # nothing before step 3 was recorded
    assert m.last_before(2, 0, "forward") == []


def test_run_summary_carries_modules_and_the_oom_module(tmp_path: Path) -> None:
    run = RunData()
    run.extend(
        [
            {"type": "header", "format_version": 1},
            TREE,
            _mods(0, "after_fwd", [30, 10, 20], [7, 2, 4]),
            {
                "type": "oom",
                "step": 0,
                "micro_step": 0,
                "phase": "after_bwd",
                "message": "CUDA out of memory",
                "module": "language_model.model.decoder.layers.1",
                "module_pass": "backward",
            },  # fmt: skip
        ]
    )
    s = run.summary()
    assert s["modules"][2] == {
        "step": 0, "micro_step": 0, "rank": 0, "phase": "after_fwd", "module": "language_model",
        "params": 20, "grads": 0, "optim": 0, "acts": 4,
    }  # fmt: skip
    assert s["oom"]["module"] == "language_model.model.decoder.layers.1"
    assert s["oom"]["module_pass"] == "backward"
    assert rows_from_json(json.loads(json.dumps(s["modules"]))) == run.modules.rows


def test_an_older_profile_without_modules_has_no_key_and_oom_module_null(tmp_path: Path) -> None:
    run = RunData()
    run.extend([{"type": "header"}, {"type": "oom", "step": 1, "phase": "after_fwd", "message": "x"}])
    s = run.summary()
    assert "modules" not in s
    assert s["oom"]["module"] is None and "module_pass" not in s["oom"]


def test_load_run_reads_the_records_from_a_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    lines = [{"type": "header", "format_version": 1, "name": "r"}, TREE, _mods(1, "after_bwd", [3, 1, 2], [0, 0, 0])]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert [r.params for r in load_run(run_dir).modules.at(1, "after_bwd")] == [3, 1, 2]


def test_rows_from_json_accepts_an_estimates_rows_and_skips_bad_items() -> None:
    items = [
        {"step": 1, "phase": "after_fwd", "module": "", "params": 1, "grads": 2, "optim": 3, "acts": 4},
        {"step": 1, "phase": "after_fwd", "module": 5, "params": 1, "grads": 2, "optim": 3, "acts": 4},
        {"step": 1, "phase": "after_fwd", "module": "x", "params": -1, "grads": 2, "optim": 3, "acts": 4},
        "junk",
    ]
    assert rows_from_json(items) == [ModuleRow(1, 0, 0, "after_fwd", "", 1, 2, 3, 4)]
    assert rows_from_json({"not": "a list"}) == []
