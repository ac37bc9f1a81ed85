"""Fixes to the per-module views after review (issue 12): tables aligned on what is displayed, unreadable module
records said as such, compare's note naming runs unambiguously, and the documented ``--phase`` rule.

Profiles are the hand-written ones of tests/module_profiles.py (figures in whole KiB, stated there); the expected
lines are the ones tests/unit/test_show_modules.py holds for the plain profile, with the names replaced by what
``one_line`` shows of the hostile ones, padded by hand: a CJK ideograph takes two terminal columns (Unicode East
Asian Width "W"), ``\\x01`` is shown as the two characters ``^A``, an OSC sequence ``ESC ] … BEL`` disappears.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import module_profiles as mp
import pytest
from rich.cells import cell_len

from blipmon import cli
from blipmon.core.module_view import RowIndex, module_panel
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
