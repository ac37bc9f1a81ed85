"""``blipmon show`` on a sweep folder prints the sweep's comparison (the committed example sweep)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blipmon import cli

EXAMPLE = Path(__file__).resolve().parents[2] / "profiles" / "examples" / "tiny-sweep-cpu"


def test_show_on_a_sweep_folder_prints_its_comparison(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["show", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "tiny/blip2-opt" in header and "tiny/blip2-t5" in header and "tiny/blip-vqa" in header
    assert "peak host RSS" in out


def test_show_json_on_a_sweep_folder_names_every_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["show", str(EXAMPLE), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in doc["runs"]] == ["tiny/blip2-opt", "tiny/blip2-t5", "tiny/blip-vqa"]


def test_show_on_a_folder_that_is_neither_still_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["show", str(tmp_path)]) == 2
    assert "not a blipmon run" in capsys.readouterr().err
