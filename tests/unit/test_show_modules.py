"""``blipmon show RUN --modules`` and ``blipmon compare A B --modules`` (issue 12 items 3 and 5), on hand-written
profiles (tests/module_profiles.py): the tables, their JSON, the refusals (exit 2) and the OOM's module in ``show``.

Expected figures are the profile's KiB written out by hand: e.g. 4200 KiB = 4.10 MiB, 2220 KiB = 2.17 MiB.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import module_profiles as mp
import pytest

from blipmon import cli

K = mp.K


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    return {
        "plain": mp.write(tmp_path / "plain", mp.events("plain")),
        "ckpt": mp.write(
            tmp_path / "ckpt",
            mp.events("ckpt", acts=mp.ACTS_CKPT, tree=[*mp.TREE, "language_model.lm_head"], prediction=False),
        ),
        "oom": mp.write(tmp_path / "oom", mp.events("oom", oom=True)),
        "old": mp.write(tmp_path / "old", mp.events("old", modules=False)),
    }


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_show_modules_prints_the_peak_phases_tree_as_a_table(runs: dict[str, Path], capsys) -> None:
    code, out, err = _cli(capsys, "show", runs["plain"], "--modules")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "run      plain   [ok]"
    assert (
        lines[1]
        == "modules  step 1 after_fwd (the run's peak phase); bytes; each module's figures include its children's"
    )
    assert lines[2].split() == ["module", "params", "grads", "optim", "acts", "total", "predicted"]
    # (model): 1000 KiB params, 2000 KiB optim = 1.95 MiB, 1200 KiB acts = 1.17 MiB, total 4200 KiB = 4.10 MiB;
    # predicted 4210 KiB = 4.11 MiB, (4210 - 4200) / 4200 = +0.24 %
    assert lines[3] == "  (model)            1000.00 KiB    0 B    1.95 MiB    1.17 MiB    4.10 MiB  4.11 MiB (+0.2%)"
    assert lines[4] == "    language_model    480.00 KiB    0 B  960.00 KiB  780.00 KiB    2.17 MiB  2.18 MiB (+0.5%)"
    assert lines[5] == "      model.decoder   400.00 KiB    0 B  800.00 KiB  700.00 KiB    1.86 MiB  1.87 MiB (+0.5%)"
    assert [ln.strip().split()[0] for ln in lines[3:9]] == ["(model)", "language_model", "model.decoder",
                                                           "vision_model", "encoder", "qformer"]  # fmt: skip
    assert lines[9].startswith("predicted: the estimate saved when the run started")


def test_depth_step_and_phase_choose_what_is_shown(runs: dict[str, Path], capsys) -> None:
    code, out, _ = _cli(capsys, "show", runs["plain"], "--modules", "--depth", "1", "--step", "0", "--phase",
                        "after_opt_step")  # fmt: skip
    assert code == 0
    lines = out.splitlines()
    assert lines[1].startswith("modules  step 0 after_opt_step (as asked);")
    assert [ln.split()[0] for ln in lines[3:-1]] == ["(model)", "language_model", "vision_model", "qformer"]
    # after step 0's optimizer step: params + grads + 2 x params = 4 x 480 KiB = 1.88 MiB for the language model
    assert lines[4].split()[:9] == ["language_model", "480.00", "KiB", "480.00", "KiB", "960.00", "KiB", "0", "B"]
    assert lines[4].split()[9:11] == ["1.88", "MiB"]
    code, out, _ = _cli(capsys, "show", runs["plain"], "--modules", "--depth", "0")
    assert code == 0 and [ln.split()[0] for ln in out.splitlines()[3:-1]] == ["(model)"]


def test_show_modules_json_is_the_boundarys_rows_as_the_summarys_objects(runs: dict[str, Path], capsys) -> None:
    code, out, _ = _cli(capsys, "show", runs["plain"], "--modules", "--depth", "1", "--json")
    assert code == 0
    doc = json.loads(out)
    assert [o["module"] for o in doc] == ["", "language_model", "vision_model", "qformer"]
    assert doc[3] == {"step": 1, "micro_step": 0, "rank": 0, "phase": "after_fwd", "module": "qformer",
                      "params": 200 * K, "grads": 0, "optim": 400 * K, "acts": 100 * K, "depth": 1,
                      "predicted": {"params": 200 * K, "grads": 0, "optim": 400 * K, "acts": 100 * K}}  # fmt: skip
    # a run without a saved prediction has no "predicted" key
    code, out, _ = _cli(capsys, "show", runs["ckpt"], "--modules", "--json")
    assert code == 0 and all("predicted" not in o for o in json.loads(out))
    # --json without --modules stays the fixed summary, with every row in "modules"
    code, out, _ = _cli(capsys, "show", runs["plain"], "--json")
    summary = json.loads(out)
    assert summary["format_version"] == 1 and len(summary["modules"]) == 3 * 4 * len(mp.TREE)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--modules", "--phase", "forward"], "--phase 'forward': not a phase; one of before_fwd, after_fwd, after_bwd, after_opt_step"),
        (["--modules", "--step", "7"], "--step 7: no module figures at that step; recorded at steps 0-2"),
        (["--modules", "--depth", "-1"], "--depth -1: must be 0 or more"),
        (["--depth", "1"], "--depth: only with --modules"),
        (["--step", "1", "--phase", "after_fwd"], "--step, --phase: only with --modules"),
    ],
)  # fmt: skip
def test_bad_choices_exit_2_with_a_clear_message(runs: dict[str, Path], capsys, args: list[str], message: str) -> None:
    code, out, err = _cli(capsys, "show", runs["plain"], *args)
    assert code == 2 and out == ""
    assert err.startswith("blipmon: " + message) and "Traceback" not in err


def test_a_run_without_module_records_says_why(runs: dict[str, Path], capsys) -> None:
    for extra in ([], ["--json"]):
        code, out, err = _cli(capsys, "show", runs["old"], "--modules", *extra)
        assert code == 2 and out == ""
        assert "no per-module figures: module attribution was off (runtime.module_depth = 0)" in err
        assert "recorded before blipmon attributed memory to modules" in err
    code, _, _ = _cli(capsys, "show", runs["old"])  # the plain summary of an old profile is unchanged
    assert code == 0


def test_show_names_the_ooms_module_and_the_modules_before_it(runs: dict[str, Path], capsys) -> None:
    code, out, _ = _cli(capsys, "show", runs["oom"])
    assert code == 0
    lines = out.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("outcome"))
    assert lines[i] == ("outcome  OUT OF MEMORY at step 2 (micro-step 0, backward) in "
                        "language_model.model.decoder.layers.1 (backward)")  # fmt: skip
    assert lines[i + 1] == ("modules  at step 2 after_fwd, the last boundary before it (bytes; each module's figures "
                            "include its children's):")  # fmt: skip
    # the root's children by size, and model.decoder: the recorded module the OOM's module is inside
    assert [ln.split()[0] for ln in lines[i + 3 : i + 8]] == ["(model)", "language_model", "model.decoder",
                                                              "vision_model", "qformer"]  # fmt: skip
    assert lines[i + 5].split()[-2:] == ["1.86", "MiB"]  # decoder: 400 + 800 + 700 KiB
    assert len(lines) == i + 8
    # the fixed summary carries the module too
    code, out, _ = _cli(capsys, "show", runs["oom"], "--json")
    oom = json.loads(out)["oom"]
    assert (oom["module"], oom["module_pass"]) == ("language_model.model.decoder.layers.1", "backward")


def test_compare_modules_table_shows_what_changed_per_category(runs: dict[str, Path], capsys) -> None:
    code, out, err = _cli(capsys, "compare", runs["plain"], runs["ckpt"], "--modules")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("modules  compared at 1. step 1 after_fwd · 2. step 1 after_fwd;")
    rows = {ln.split()[0]: ln for ln in lines[2:]}
    # 4200 -> 3500 KiB (= 4.10 -> 3.42 MiB, -16.7 %): the language model's activations, 700 KiB fewer
    assert rows["(model)"].split() == ["(model)", "4.10", "MiB", "3.42", "MiB", "(-16.7%)", "acts", "−700.00", "KiB"]
    assert rows["language_model.model.decoder"].split()[-3:] == ["acts", "−700.00", "KiB"]
    assert rows["vision_model"].split()[-1] == "same" and rows["qformer"].split()[-1] == "same"
    assert rows["language_model.lm_head"].endswith("only in run 2")


def test_compare_modules_in_markdown_csv_and_json(runs: dict[str, Path], capsys) -> None:
    code, out, _ = _cli(capsys, "compare", runs["plain"], runs["ckpt"], "--modules", "--format", "markdown")
    assert code == 0
    assert "| module | 1. plain total | 2. ckpt total | changed |" in out
    assert "| (model) | 4.10 MiB | 3.42 MiB (-16.7%) | acts −700.00 KiB |" in out
    code, out, _ = _cli(capsys, "compare", runs["plain"], runs["ckpt"], "--modules", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    dec = [r for r in rows if r["module"] == "language_model.model.decoder"]
    assert [(r["run"], r["acts"], r["delta_acts"]) for r in dec] == [("1", str(700 * K), ""), ("2", "0", str(-700 * K))]
    assert [r["run"] for r in rows if r["module"] == "language_model.lm_head"] == ["2"]
    code, out, _ = _cli(capsys, "compare", runs["plain"], runs["ckpt"], "--modules", "--format", "json")
    doc = json.loads(out)
    assert [r["label"] for r in doc["rows"]][:2] == ["status", "device"]  # the usual comparison is still there
    mods = doc["modules"]
    assert mods["boundaries"] == [{"step": 1, "micro_step": 0, "rank": 0, "phase": "after_fwd"}] * 2
    root = mods["rows"][0]
    assert root["module"] == "" and root["changed"] is True
    assert root["values"][1] == {"params": 1000 * K, "grads": 0, "optim": 2000 * K, "acts": 500 * K, "total": 3500 * K}
    assert root["deltas"] == [None, {"params": 0, "grads": 0, "optim": 0, "acts": -700 * K, "total": -700 * K}]
    # without --modules the JSON has no "modules" key
    code, out, _ = _cli(capsys, "compare", runs["plain"], runs["ckpt"], "--format", "json")
    assert "modules" not in json.loads(out)


def test_compare_modules_of_runs_without_records(runs: dict[str, Path], capsys) -> None:
    code, out, err = _cli(capsys, "compare", runs["old"], runs["old"], "--modules")
    assert code == 2 and out == "" and "none of these runs has per-module figures" in err
    code, out, _ = _cli(capsys, "compare", runs["old"], runs["plain"], "--modules")
    assert code == 0
    assert out.splitlines()[1] == "note     no module figures in run 1 (old): attribution off, or a profile before it"


def test_compare_table_names_the_ooms_module(runs: dict[str, Path], capsys) -> None:
    code, out, _ = _cli(capsys, "compare", runs["plain"], runs["oom"])
    assert code == 0
    row = next(ln for ln in out.splitlines() if ln.startswith("out of memory at"))
    assert row.endswith("step 2 backward in language_model.model.decoder.layers.1 (backward)")


def test_a_module_name_from_the_file_cannot_drive_the_terminal(tmp_path: Path, capsys) -> None:
    evil = "language_model.\x1b]0;owned\x07x"
    tree = [*mp.TREE, evil]
    run = mp.write(tmp_path / "evil", mp.events("evil", tree=tree, prediction=False))
    for args in (["show", run, "--modules"], ["compare", run, run, "--modules"],
                 ["compare", run, run, "--modules", "--format", "csv"]):  # fmt: skip
        code, out, _ = _cli(capsys, *args)
        assert code == 0
        assert "\x1b" not in out and "\x07" not in out
        # the escape sequence is removed whole (core/safe_text.py): its row is there, named by what is left
        if args[0] == "show":
            assert out.splitlines()[6].split()[0] == "x"  # under language_model, after its decoder (0 B)
        else:
            assert "language_model.x" in out
