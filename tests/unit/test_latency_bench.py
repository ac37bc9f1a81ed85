"""``benchmarks/latency.py`` (issue 17 item 4): how it reads a terminal, and one real run of it.

The benchmark is only as good as its notion of "the first frame is on screen": these tests hold its
escape stripping and marker search to hand-made terminal output, and run it once for real (a replay
of a 1,000-sample profile in a pty) to see that it finds the run view's frame and prints its table.
No time is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("blipmon_latency_bench", BENCH / "latency.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


lat = _load()


def test_screen_text_removes_escapes_and_keeps_each_run_of_text_whole() -> None:
    raw = (
        b"\x1b[?1049h\x1b[?25l\x1b]0;blipmon\x07\x1b[1;1H\x1b[38;2;95;175;255;1m\xe2\x97\x8f \x1b[0m"
        b"\x1b[1mbench/1M  \x1b[0m\x1b[2m  [replay]  \x1b[0m\x1b(B\x1b[5;3Hphases \x1b[1m(step 3)\x1b[0m"
    )
    assert lat.screen_text(raw) == "● bench/1M    [replay]  phases (step 3)"


def test_frame_shown_needs_every_marker() -> None:
    header_only = b"\x1b[1;1H\x1b[2m  [replay]  \x1b[0m"
    markers = (lat.MODE_TAG["replay"], *lat.RUN_VIEW)
    assert not lat.frame_shown(header_only, markers)
    full = header_only + b"\x1b[3;1H\x1b[1mmemory \x1b[0m\x1b[20;1H\x1b[1mphases \x1b[0m"
    assert lat.frame_shown(full, markers)


def test_has_record_ignores_a_partial_last_line(tmp_path: Path) -> None:
    ev = tmp_path / "events.jsonl"
    ev.write_text(json.dumps({"type": "header", "t": 0.0}) + "\n" + '{"type": "step", "t": 1.0, "st')
    assert not lat.has_record(ev, "step")
    with open(ev, "a") as fh:
        fh.write('ep": 0}\n')
    assert lat.has_record(ev, "step")
    assert not lat.has_record(ev, "end")


def test_table_gives_medians_and_each_run() -> None:
    out = lat.table({"replay": [0.3, 0.1, 0.2], "attach": [None, None, None]})
    lines = out.splitlines()
    assert lines[1].split()[-4:] == ["0.200", "0.300", "0.100", "0.200"]
    assert lines[2].endswith("-  - - -")


def test_a_real_replay_in_a_pty_reaches_its_first_frame(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = lat.main(["--runs", "1", "--samples", "1000", "--dir", str(tmp_path / "run"), "--only", "replay"])
    out = capsys.readouterr().out
    assert code == 0, out  # 1 would mean the frame's markers never all appeared
    row = next(line for line in out.splitlines() if line.startswith(lat.LABELS["replay"]))
    assert row.split()[-1] != "-"
