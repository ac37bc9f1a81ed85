"""Fixes to the per-module views after review (issue 12): tables aligned on what is displayed, unreadable module
records said as such, compare's note naming runs unambiguously, and the documented ``--phase`` rule.

Profiles are the hand-written ones of tests/module_profiles.py (figures in whole KiB, stated there); the expected
lines are the ones tests/unit/test_show_modules.py holds for the plain profile, with the names replaced by what
``one_line`` shows of the hostile ones, padded by hand: a CJK ideograph takes two terminal columns (Unicode East
Asian Width "W"), ``\\x01`` is shown as the two characters ``^A``, an OSC sequence ``ESC ] … BEL`` disappears.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import module_profiles as mp
import pytest
from rich.cells import cell_len

from blipmon import cli
from blipmon.core.module_view import RowIndex, module_panel
from blipmon.core.modules import tree_names
from blipmon.core.report import cells
from blipmon.core.run import RunData
from blipmon.ui.widgets.modules import module_lines

# The plain profile's modules renamed: same figures, names a profile could hold.
HOSTILE = {
    "vision_model": "视觉_model",  # 2 wide characters: 8 characters, 10 columns
    "vision_model.encoder": "视觉_model.encoder",
    "qformer": "q\x1b]0;PWNED\x07former",  # 19 characters, shown as "qformer" (7)
    "language_model": "lang\x01model",  # 10 characters, shown as "lang^Amodel" (11)
    "language_model.model.decoder": "lang\x01model.model.decoder",
}


def _hostile_events(name: str = "plain", **kw: Any) -> list[dict[str, Any]]:
    evs = mp.events(name, prediction=False, **kw)
    for e in evs:
        if e["type"] == "module_tree":
            e["modules"] = [HOSTILE.get(m, m) for m in e["modules"]]
        if e["type"] == "oom":
            e["module"] = "lang\x01model.model.decoder.layers.1"
    return evs


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cells_counts_terminal_columns() -> None:
    assert cells("qformer") == 7
    assert cells("视觉_model") == 10  # two East Asian wide ideographs, two columns each
    assert cells("e\u0301") == 1  # e + a combining acute accent: one column
    assert cells("ＡＢ") == 4  # full-width Latin letters


# Indented by 2; the name column: the widest displayed label, "    model.decoder", 17 columns; two spaces; figures
# right-aligned to their columns' widths (params 11, grads 5, optim 10, acts 10, total 10), as for the plain
# profile in test_show_modules.py.
TREE_LINES = [
    "  module                  params  grads       optim        acts       total",
    "  (model)            1000.00 KiB    0 B    1.95 MiB    1.17 MiB    4.10 MiB",
    "    lang^Amodel       480.00 KiB    0 B  960.00 KiB  780.00 KiB    2.17 MiB",
    "      model.decoder   400.00 KiB    0 B  800.00 KiB  700.00 KiB    1.86 MiB",
    "    视觉_model        300.00 KiB    0 B  600.00 KiB  300.00 KiB    1.17 MiB",
    "      encoder         250.00 KiB    0 B  500.00 KiB  280.00 KiB    1.01 MiB",
    "    qformer           200.00 KiB    0 B  400.00 KiB  100.00 KiB  700.00 KiB",
]


def test_show_modules_aligns_on_the_displayed_names(tmp_path: Path, capsys) -> None:
    run = mp.write(tmp_path / "h", _hostile_events())
    code, out, err = _cli(capsys, "show", run, "--modules")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[2:] == TREE_LINES
    # every line ends in the same terminal column (the total's): 2 + 17 + 2 + 11 + 2 + 5 + 3 x (2 + 10)
    assert {cells(ln) for ln in lines[2:]} == {75}


def test_the_oom_module_table_of_show_aligns_on_the_displayed_names(tmp_path: Path, capsys) -> None:
    run = mp.write(tmp_path / "h", _hostile_events(oom=True))
    code, out, _ = _cli(capsys, "show", run)
    assert code == 0
    lines = out.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("outcome"))
    assert lines[i].endswith("in lang^Amodel.model.decoder.layers.1 (backward)")
    # the root, its children by size, and model.decoder (on the way to the OOM's module); no encoder
    assert lines[i + 2 :] == [*TREE_LINES[:5], TREE_LINES[6]]


def test_compare_modules_aligns_on_the_displayed_names(tmp_path: Path, capsys) -> None:
    a = mp.write(tmp_path / "a", _hostile_events("视觉"))
    code, out, _ = _cli(capsys, "compare", a, a, "--modules")
    assert code == 0
    # name column: "    lang^Amodel.model.decoder", 29 columns; each run's column as wide as its header
    # "1. 视觉 total" (2 + 1 + 4 + 6 = 13 columns)
    assert out.splitlines()[1:] == [
        "module                         1. 视觉 total  2. 视觉 total  changed",
        "(model)                             4.10 MiB       4.10 MiB  same",
        "  lang^Amodel                       2.17 MiB       2.17 MiB  same",
        "    lang^Amodel.model.decoder       1.86 MiB       1.86 MiB  same",
        "  视觉_model                        1.17 MiB       1.17 MiB  same",
        "    视觉_model.encoder              1.01 MiB       1.01 MiB  same",
        "  qformer                         700.00 KiB     700.00 KiB  same",
    ]


def test_the_dashboards_module_view_aligns_its_bars_on_the_displayed_names() -> None:
    run = RunData()
    run.extend(_hostile_events())
    panel = module_panel(RowIndex(), run.modules.rows, step_hint=1, expanded={""})
    rows = module_lines(panel, None, 80, 10)
    nodes = rows[1:5]
    # the name column: the widest displayed name, "  ▸ lang^Amodel" (15 columns), + 1
    names = [list(r)[0].text for r in nodes]
    assert names == ["▾ (model)       ", "  ▸ lang^Amodel ", "  ▸ 视觉_model  ", "    qformer     "]
    assert [cell_len(n) for n in names] == [16] * 4
    # so every bar starts in column 16 and every row is the view's 80 columns
    assert [cell_len(r.text) for r in nodes] == [80] * 4


# -- unreadable module records are said as such --------------------------------------------------------------------

BAD = (
    "per-module record{} unreadable and left out (malformed, or not matching the module tree): the profile may be"
    " damaged"
)


def _damaged(run_dir: Path, *, every: bool = False) -> Path:
    """The plain profile with one element of step 1 after_fwd's ``acts`` list negative (``every``: one bad element
    in every ``modules`` record, 3 steps x 4 phases = 12 of them)."""
    evs = mp.events("plain", prediction=False)
    for e in evs:
        if e["type"] == "modules" and (every or (e["step"], e["phase"]) == (1, "after_fwd")):
            e["acts"][2] = -1
    return mp.write(run_dir, evs)


def test_show_modules_says_records_were_unreadable_not_that_attribution_was_off(tmp_path: Path, capsys) -> None:
    run = _damaged(tmp_path / "all", every=True)
    code, out, err = _cli(capsys, "show", run, "--modules")
    assert code == 2 and out == ""
    assert err == f"blipmon: {run}: no per-module figures could be read: 12 {BAD.format('s are')}\n"
    code, out, err = _cli(capsys, "show", run, "--modules", "--json")
    assert code == 2 and out == "" and "12 per-module records are unreadable" in err


def test_one_unreadable_record_is_a_warning_on_stderr_and_in_the_text(tmp_path: Path, capsys) -> None:
    run = _damaged(tmp_path / "one")
    warning = f"blipmon: warning: {run}: 1 {BAD.format(' is')}\n"
    code, out, err = _cli(capsys, "show", run, "--modules")
    assert code == 0 and err == warning
    lines = out.splitlines()
    # the peak (step 1 after_fwd) lost its figures: the last boundary recorded is shown, step 2 after_opt_step
    assert lines[1].startswith("modules  step 2 after_opt_step (the last boundary recorded:")
    assert lines[-1] == f"warning  1 {BAD.format(' is')}"
    code, out, err = _cli(capsys, "show", run, "--modules", "--json")
    assert code == 0 and err == warning and len(json.loads(out)) == len(mp.TREE)
    # the fixed summary: every other boundary's rows (11 of 12 boundaries x 6 modules), the warning on stderr
    code, out, err = _cli(capsys, "show", run, "--json")
    assert code == 0 and err == warning and len(json.loads(out)["modules"]) == 11 * len(mp.TREE)
    code, out, err = _cli(capsys, "compare", run, run, "--modules")
    assert code == 0 and err == warning * 2


def test_compare_modules_names_the_damaged_run_and_why(tmp_path: Path, capsys) -> None:
    plain = mp.write(tmp_path / "plain", mp.events("plain", prediction=False))
    bad = _damaged(tmp_path / "bad", every=True)
    code, out, err = _cli(capsys, "compare", plain, bad, "--modules")
    assert code == 0 and err == f"blipmon: warning: {bad}: 12 {BAD.format('s are')}\n"
    assert out.splitlines()[1] == f"note     no module figures in run 2 (plain): 12 {BAD.format('s are')}"
    code, out, err = _cli(capsys, "compare", bad, bad, "--modules")
    assert code == 2 and out == ""
    assert err.endswith("blipmon: none of these runs has readable per-module figures (see the warnings above)\n")


# -- compare's note names a run by its number ------------------------------------------------------------------------


def test_compare_modules_note_names_the_run_by_number_when_names_are_shared(tmp_path: Path, capsys) -> None:
    with_mods = mp.write(tmp_path / "a", mp.events("tiny/blip2-opt", prediction=False))
    without = mp.write(tmp_path / "b", mp.events("tiny/blip2-opt", modules=False, prediction=False))
    code, out, _ = _cli(capsys, "compare", with_mods, without, with_mods, "--modules")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("modules  compared at 1. step 1 after_fwd · 2. no module figures · 3. step 1 after_fwd;")
    assert lines[1] == "note     no module figures in run 2 (tiny/blip2-opt): attribution off, or a profile before it"


# -- --phase alone: the default view's step (docs/modules-cli.md, "Which boundary") ---------------------------------


def _boundary_line(capsys: pytest.CaptureFixture[str], run: Path, *args: str) -> str:
    code, out, err = _cli(capsys, "show", run, "--modules", *args)
    assert code == 0, err
    return out.splitlines()[1].split(";")[0]


def test_phase_alone_takes_the_default_views_step_else_the_last_step_that_recorded_it(tmp_path: Path, capsys) -> None:
    # the peak is step 1 after_fwd (module_profiles.py): --phase alone stays at step 1, not the last step (2)
    plain = mp.write(tmp_path / "plain", mp.events("plain", prediction=False))
    assert _boundary_line(capsys, plain, "--phase", "before_fwd") == "modules  step 1 before_fwd (as asked)"
    # step 1 (the peak's) recorded without module figures, and the run ran out of memory in step 2's backward
    # pass: the default view is the last boundary recorded, step 2 after_fwd; step 2 has no after_bwd, so
    # --phase after_bwd takes the last step that recorded it, step 0
    gap = mp.write(tmp_path / "gap", mp.events("gap", prediction=False, oom=True, module_steps={0, 2}))
    assert _boundary_line(capsys, gap).startswith("modules  step 2 after_fwd (the last boundary recorded:")
    assert _boundary_line(capsys, gap, "--phase", "before_fwd") == "modules  step 2 before_fwd (as asked)"
    assert _boundary_line(capsys, gap, "--phase", "after_bwd") == "modules  step 0 after_bwd (as asked)"


# -- docs/modules-cli.md says what the recorder records ----------------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "modules-cli.md"


def test_the_docs_examples_name_only_modules_a_run_records_at_the_default_depth() -> None:
    """The compare example prints full paths: each must be one ``tree_names`` keeps at the default depth 2 (two
    levels, a module with a single child module being no level of its own, so ``language_model.model.decoder`` is
    there beside ``language_model.model``), as a real run records them."""
    text = DOC.read_text()
    block = text[text.index("$ blipmon compare") :]
    block = block[: block.index("```")]
    paths = [ln.split()[0] for ln in block.splitlines()[3:] if ln.strip()]
    assert paths[0] == "(model)" and "language_model.model" in paths and "language_model.model.decoder" in paths
    assert tree_names(paths[1:], 2) == ["", *paths[1:]]  # parents before children, as the table lists them
    assert tree_names(paths[1:], 1) == ["", *(p for p in paths[1:] if "." not in p)]
    assert "skips" not in text  # the recorder skips no wrapper
    assert "`--phase P` alone: phase `P` of **the step the default view shows**" in " ".join(text.split())
