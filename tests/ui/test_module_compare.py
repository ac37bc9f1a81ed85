"""The compare view's per-module section (issue 12 item 4): each module's total in every run and what changed
against the first run, per category, as ``blipmon compare --modules`` prints it; hidden when no run has modules.

Profiles are hand-written (tests/module_profiles.py, figures in whole KiB): the activation-checkpointed variant
holds 700 KiB fewer activations in the language model's decoder after forward, and records one module more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import module_profiles as mp
import pytest
from ui_helpers import compared, drive, screen_text, wait_until

from blipmon.core.module_view import run_module_diffs
from blipmon.core.run import load_run
from blipmon.ui.app import BlipmonApp
from blipmon.ui.compare import CompareModules, CompareScreen, module_diff_lines

K = mp.K


@pytest.fixture
def pair(tmp_path: Path) -> list[Path]:
    return [
        mp.write(tmp_path / "plain", mp.events("plain")),
        mp.write(tmp_path / "ckpt", mp.events("ckpt", acts=mp.ACTS_CKPT, tree=[*mp.TREE, "language_model.lm_head"])),
    ]


def _section(app: Any) -> list[str]:
    w = app.screen.query_one(CompareModules)
    return [s.text.rstrip() for s in w.build(w.size.width, w.size.height)]


def test_the_compare_view_shows_which_modules_changed_and_by_how_much(pair: list[Path]) -> None:
    app = BlipmonApp(CompareScreen(pair, standalone=True))

    async def script(pilot: Any) -> None:
        await wait_until(pilot, lambda: compared(pilot.app), "the comparison")
        await pilot.pause()
        section = pilot.app.screen.query_one(CompareModules)
        assert section.display
        lines = _section(pilot.app)
        assert lines[0] == "per module  at step 1 after_fwd in every run; changes against run 1"
        rows = {ln.split()[0]: ln.split()[1:] for ln in lines[1:]}
        # root: 4200 -> 3500 KiB (4.10 -> 3.42 MiB); the activations of the decoder, 700 KiB, are the change
        assert rows["(model)"] == ["4.10", "MiB", "3.42", "MiB", "acts", "−700.00", "KiB"]
        assert rows["model.decoder"] == ["1.86", "MiB", "1.17", "MiB", "acts", "−700.00", "KiB"]
        assert rows["lm_head"] == ["—", "0", "B", "only", "in", "run", "2"]
        assert rows["qformer"] == ["700.00", "KiB", "700.00", "KiB", "same"]
        assert [ln.split()[0] for ln in lines[1:]] == ["(model)", "language_model", "model.decoder", "lm_head",
                                                      "vision_model", "encoder", "qformer"]  # fmt: skip
        pilot.app.screen.query_one("#compare-body").scroll_to_widget(section, animate=False)
        await pilot.pause()
        assert "per module  at step 1 after_fwd in every run" in screen_text(pilot.app)

    drive(app, script, size=(100, 40))


def test_three_runs_name_each_runs_changes(tmp_path: Path) -> None:
    runs = [
        load_run(mp.write(tmp_path / "a", mp.events("a"))),
        load_run(mp.write(tmp_path / "b", mp.events("b", acts=mp.ACTS_CKPT))),
        load_run(mp.write(tmp_path / "c", mp.events("c", acts={m: 2 * a for m, a in mp.ACTS.items()}))),
    ]
    bounds, diffs = run_module_diffs(runs)
    lines = [s.text.rstrip() for s in module_diff_lines(runs, bounds, diffs, 120)]
    root = next(ln for ln in lines if ln.startswith("(model)"))
    # b: 1200 -> 500 KiB of activations; c: 1200 -> 2400 KiB
    assert root.split("  ")[-1].strip() == "2: acts −700.00 KiB; 3: acts +1.17 MiB"


def test_runs_without_module_figures_show_no_section(tmp_path: Path) -> None:
    old = [mp.write(tmp_path / n, mp.events(n, modules=False)) for n in ("x", "y")]
    app = BlipmonApp(CompareScreen(old, standalone=True))

    async def script(pilot: Any) -> None:
        await wait_until(pilot, lambda: compared(pilot.app), "the comparison")
        await pilot.pause()
        assert not pilot.app.screen.query_one(CompareModules).display
        assert "per module" not in screen_text(pilot.app)

    drive(app, script, size=(100, 40))


def test_module_names_in_the_compare_view_are_text(tmp_path: Path) -> None:
    tree = [*mp.TREE, "qformer.[b]x[/b]"]
    runs = [load_run(mp.write(tmp_path / n, mp.events(n, tree=tree))) for n in ("a", "b")]
    bounds, diffs = run_module_diffs(runs)
    lines = [s.text for s in module_diff_lines(runs, bounds, diffs, 100)]
    assert any(ln.lstrip().startswith("[b]x[/b]") for ln in lines)


def test_hostile_and_wide_module_names_keep_the_columns_aligned(tmp_path: Path) -> None:
    """A name's width is measured as shown: a control character made visible (two cells), a wide character (two)."""
    from rich.cells import cell_len

    tree = [*mp.TREE, "qformer.\x01名前", "qformer.\x1b]0;t\x07x"]
    runs = [load_run(mp.write(tmp_path / n, mp.events(n, tree=tree))) for n in ("a", "b")]
    bounds, diffs = run_module_diffs(runs)
    lines = [s.text for s in module_diff_lines(runs, bounds, diffs, 120)][1:]
    # Every row's first figure ends at the same cell: the name column has one width, whatever the names hold.
    ends = {cell_len(ln[: ln.index("B") + 1]) for ln in lines}
    assert len(ends) == 1, lines
    assert not any("\x01" in ln or "\x1b" in ln or "\x07" in ln for ln in lines)
