"""The per-module views as data (core/module_view.py): the tree, its depth, the boundary chosen, runs compared.

Profiles are hand-written (tests/module_profiles.py): every figure is a whole number of KiB chosen by hand, so
the expected values below are stated, not recomputed by the code under test.
"""

from __future__ import annotations

from pathlib import Path

import module_profiles as mp
import pytest

from blipmon.core.errors import UsageError
from blipmon.core.module_view import (
    Boundary,
    build_tree,
    check_depth,
    compare_modules,
    default_boundary,
    depths,
    parents,
    predicted_at,
    predicted_rows,
    rows_at,
    run_module_diffs,
    select_boundary,
    tree_json,
    walk,
)
from blipmon.core.modules import ModuleRow
from blipmon.core.run import RunData, load_run

K = mp.K


def _run(**kw: object) -> RunData:
    run = RunData()
    run.extend(mp.events(**kw))  # type: ignore[arg-type]
    return run


def test_a_modules_parent_is_its_longest_recorded_prefix_and_depth_counts_recorded_ancestors() -> None:
    up = parents(mp.TREE)
    assert up == {
        "": None,
        "vision_model": "",
        "vision_model.encoder": "vision_model",
        "qformer": "",
        "language_model": "",
        # language_model.model is not recorded: the decoder hangs from language_model, one level down
        "language_model.model.decoder": "language_model",
    }
    assert depths(mp.TREE) == {"": 0, "vision_model": 1, "vision_model.encoder": 2, "qformer": 1,
                               "language_model": 1, "language_model.model.decoder": 2}  # fmt: skip
    # without a root row, the top-level modules are roots, still at depth 1
    assert parents(["a", "a.b"]) == {"a": None, "a.b": "a"} and depths(["a", "a.b"]) == {"a": 1, "a.b": 2}


def test_the_tree_is_sorted_by_total_at_the_boundary_with_relative_labels() -> None:
    run = _run()
    roots = build_tree(rows_at(run.modules, Boundary(0, 1, 0, "after_fwd")))
    assert len(roots) == 1
    nodes = walk(roots)
    # totals (KiB) at step 1 after_fwd = params + 2 x params (optim) + acts:
    # language_model 480+960+780 = 2220 > vision_model 300+600+300 = 1200 > qformer 200+400+100 = 700
    assert [(n.label, n.depth, n.total // K) for n in nodes] == [
        ("(model)", 0, 1000 + 2000 + 1200),
        ("language_model", 1, 2220),
        ("model.decoder", 2, 400 + 800 + 700),
        ("vision_model", 1, 1200),
        ("encoder", 2, 250 + 500 + 280),
        ("qformer", 1, 700),
    ]
    assert [n.path for n in walk(roots, max_depth=1)] == ["", "language_model", "vision_model", "qformer"]
    assert [n.path for n in walk(roots, max_depth=0)] == [""]
    # only the expanded nodes open: the root alone shows its children, not theirs
    assert [n.path for n in walk(roots, expanded={""})] == ["", "language_model", "vision_model", "qformer"]
    assert [n.path for n in walk(roots, expanded=set())] == [""]


def test_the_default_boundary_is_the_peak_phase_else_the_last_recorded() -> None:
    run = _run()
    # the CPU peak: step 1 after_fwd, 4200 KiB (step 2's equal total comes later)
    assert run.peak_phase()["step"] == 1 and run.peak_phase()["phase"] == "after_fwd"
    assert default_boundary(run.modules, run.peak_phase()) == Boundary(0, 1, 0, "after_fwd")
    # module figures only at step 0 (a cadence): the peak has none, so the last recorded boundary
    sparse = _run(module_steps={0})
    assert default_boundary(sparse.modules, sparse.peak_phase()) == Boundary(0, 0, 0, "after_opt_step")
    assert default_boundary(_run(modules=False).modules, None) is None


def test_select_boundary_by_step_phase_or_both_and_what_it_refuses() -> None:
    run = _run()
    peak = run.peak_phase()
    # step 0's largest phase: after_opt_step, 1000 + 1000 + 2000 = 4000 KiB (after_fwd: 1000 + 1200 = 2200)
    assert select_boundary(run.modules, peak, step=0) == Boundary(0, 0, 0, "after_opt_step")
    assert select_boundary(run.modules, peak, phase="after_bwd") == Boundary(0, 1, 0, "after_bwd")
    assert select_boundary(run.modules, peak, step=2, phase="before_fwd") == Boundary(0, 2, 0, "before_fwd")
    with pytest.raises(UsageError, match=r"--step 9: no module figures at that step; recorded at steps 0-2"):
        select_boundary(run.modules, peak, step=9)
    with pytest.raises(UsageError, match=r"--phase 'forward': not a phase; one of before_fwd, after_fwd"):
        select_boundary(run.modules, peak, phase="forward")
    with pytest.raises(UsageError, match=r"--step -1: steps count from 0"):
        select_boundary(run.modules, peak, step=-1)
    sparse = _run(module_steps={0, 2})
    with pytest.raises(UsageError, match=r"recorded at steps 0, 2$"):
        select_boundary(sparse.modules, sparse.peak_phase(), step=1)
    oom = _run(oom=True)  # step 2 stopped in backward: it has before_fwd and after_fwd only
    with pytest.raises(UsageError, match=r"step 2 has before_fwd, after_fwd$"):
        select_boundary(oom.modules, oom.peak_phase(), step=2, phase="after_bwd")
    check_depth(0)
    with pytest.raises(UsageError, match=r"--depth -2: must be 0 or more"):
        check_depth(-2)


def test_the_prediction_stands_beside_each_module_its_step_1_for_later_steps() -> None:
    run = _run()
    pred = predicted_rows(run.prediction)
    assert len(pred) == 2 * 4 * len(mp.TREE)
    at3 = predicted_at(pred, 3, "after_fwd")  # a later step: the estimate's step 1
    assert {p: r.step for p, r in at3.items()} == dict.fromkeys(mp.TREE, 1)
    assert at3["language_model"].acts == (780 + 10) * K and at3["vision_model"].acts == 300 * K
    assert predicted_at(pred, 0, "after_opt_step")["qformer"] == ModuleRow(0, 0, 0, "after_opt_step", "qformer",
                                                                           200 * K, 200 * K, 400 * K, 0)  # fmt: skip
    assert predicted_at([], 1, "after_fwd") == {} and predicted_rows(None) == []
    nodes = walk(build_tree(rows_at(run.modules, Boundary(0, 1, 0, "after_fwd")), at3), max_depth=1)
    objs = tree_json(nodes)
    assert objs[1] == {"step": 1, "micro_step": 0, "rank": 0, "phase": "after_fwd", "module": "language_model",
                       "params": 480 * K, "grads": 0, "optim": 960 * K, "acts": 780 * K, "depth": 1,
                       "predicted": {"params": 480 * K, "grads": 0, "optim": 960 * K, "acts": 790 * K}}  # fmt: skip
    # without a saved per-module prediction the key is not there at all
    assert "predicted" not in tree_json(walk(build_tree(rows_at(run.modules, Boundary(0, 1, 0, "after_fwd")))))[0]


def test_runs_compared_module_by_module() -> None:
    plain = _run()
    ckpt = _run(acts=mp.ACTS_CKPT, tree=[*mp.TREE, "language_model.lm_head"])
    bounds, diffs = run_module_diffs([plain, ckpt])
    assert bounds == [Boundary(0, 1, 0, "after_fwd")] * 2
    by = {d.path: d for d in diffs}
    assert [d.path for d in diffs] == ["", "language_model", "language_model.model.decoder",
                                       "language_model.lm_head", "vision_model", "vision_model.encoder", "qformer"]  # fmt: skip
    dec = by["language_model.model.decoder"]
    assert dec.delta(1, "acts") == -700 * K and dec.delta(1, "params") == 0 and dec.delta(1, "total") == -700 * K
    assert by[""].delta(1, "acts") == (500 - 1200) * K
    assert dec.changed and not by["vision_model"].changed and not by["qformer"].changed
    head = by["language_model.lm_head"]
    assert head.only_in == (1,) and head.changed and head.delta(1, "acts") is None and head.value(0, "total") is None
    assert by["language_model.lm_head"].depth == 2
    # a run that recorded no modules: every module is "only in" the other
    none = compare_modules([[], rows_at(plain.modules, Boundary(0, 1, 0, "after_fwd"))])
    assert {d.only_in for d in none} == {(1,)}


def test_compare_uses_the_first_runs_step_and_phase_in_every_run(tmp_path: Path) -> None:
    first = _run()  # peak: step 1 after_fwd
    other = _run(acts={m: 4 * a for m, a in mp.ACTS.items()})  # its own peak is also step 1 after_fwd
    only_zero = _run(module_steps={0})  # has no step 1: its own default (its last boundary)
    bounds, _ = run_module_diffs([first, other, only_zero])
    assert bounds == [
        Boundary(0, 1, 0, "after_fwd"),
        Boundary(0, 1, 0, "after_fwd"),
        Boundary(0, 0, 0, "after_opt_step"),
    ]


def test_module_records_read_from_a_file_give_the_same_tree(tmp_path: Path) -> None:
    run = load_run(mp.write(tmp_path / "r", mp.events()))
    b = default_boundary(run.modules, run.peak_phase())
    assert b == Boundary(0, 1, 0, "after_fwd")
    assert [n.path for n in walk(build_tree(rows_at(run.modules, b)))][:3] == ["", "language_model",
                                                                              "language_model.model.decoder"]  # fmt: skip


def test_a_replay_sees_the_rows_of_the_boundaries_it_reached_and_the_index_follows_it_back() -> None:
    from blipmon.core.module_view import RowIndex, rows_seen

    run = _run()
    rows, phases, n = run.modules.rows, run.phases, len(mp.TREE)
    # each phase record's boundary holds len(TREE) rows: k phase records shown -> k x 6 rows
    assert [rows_seen(rows, phases, k) for k in (0, 1, 5, 12)] == [0, n, 5 * n, 12 * n]
    index = RowIndex()
    index.update(rows)
    assert len(index.boundaries(0)) == 12
    assert index.rows(rows, Boundary(0, 1, 0, "after_fwd")) == rows_at(run.modules, Boundary(0, 1, 0, "after_fwd"))
    index.update(rows[: 5 * n])  # a replay seeking back
    assert index.boundaries(0) == [Boundary(0, 0, 0, p) for p in mp.PHASES] + [Boundary(0, 1, 0, "before_fwd")]
    assert index.rows(rows, Boundary(0, 1, 0, "after_fwd")) == []
    index.update(rows)  # and forward again
    assert len(index.boundaries(0)) == 12
    assert index.rows(rows, Boundary(0, 2, 0, "after_opt_step")) == rows_at(
        run.modules, Boundary(0, 2, 0, "after_opt_step")
    )
