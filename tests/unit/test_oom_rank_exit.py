"""Under torchrun, ``blipmon run`` exits 3 when a rank ran out of memory, whatever torchrun's own exit code.

torchrun exits 1 whichever way a rank failed; each rank's ``end`` record says how it ended, and the
parent reads them from events.jsonl after torchrun exits. The streams here are what two ranks write:
the rank that ran out of memory ends ``oom`` (code 3), the other one fails or is stopped when its peer
disappears.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from blipmon.core.config import resolve
from blipmon.core.run import load_run
from blipmon.runner.launch import Launch, end_statuses


def _ddp_run(tmp_path: Path, ends: list[dict[str, Any]], returncode: int) -> Launch:
    cfg = resolve("tiny/blip2-opt", ["train.strategy=ddp", "train.devices=2"])
    launch = Launch(cfg, tmp_path)
    lines = [{"type": "header", "t": 0.0, "format_version": 1, "name": "tiny/blip2-opt", "pid": 1,
              "source": "blipmon run (torchrun)", "world_size": 2}]  # fmt: skip
    lines += [{"type": "rank_start", "t": 0.1, "rank": r, "local_rank": r, "pid": 100 + r} for r in (0, 1)]
    lines += [{"type": "sample", "t": 0.2, "rss": 1}] * 3
    lines += ends
    (launch.run_dir / "events.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    launch._finish(returncode)
    return launch


OOM_END = {"type": "end", "t": 5.0, "status": "oom", "code": 3, "rank": 1}


@pytest.mark.parametrize(
    "other",
    [
        {"type": "end", "t": 5.1, "status": "error", "code": 1, "rank": 0},  # gloo/nccl lost its peer
        {"type": "end", "t": 5.1, "status": "stopped", "code": 4, "rank": 0},  # torchrun's SIGTERM
        None,  # torchrun SIGKILLed it before it could say
    ],
)
def test_a_rank_that_ran_out_of_memory_makes_the_run_exit_3(tmp_path: Path, other: dict[str, Any] | None) -> None:
    launch = _ddp_run(tmp_path, [OOM_END] + ([other] if other else []), returncode=1)
    assert launch.exit_code() == 3
    run = load_run(launch.run_dir)
    assert run.status == "oom"
    assert run.exit == {**run.exit, "code": 1, "signal": None}  # torchrun's own code is kept as it was


def test_ranks_that_failed_otherwise_keep_exit_1(tmp_path: Path) -> None:
    ends = [{"type": "end", "t": 5.0, "status": "error", "code": 1, "rank": r} for r in (0, 1)]
    assert _ddp_run(tmp_path, ends, returncode=1).exit_code() == 1


def test_a_killed_torchrun_is_still_exit_4(tmp_path: Path) -> None:
    assert _ddp_run(tmp_path, [OOM_END], returncode=-9).exit_code() == 4


def test_end_records_are_read_line_by_line_and_damage_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_bytes(
        b'{"type":"header","format_version":1}\n{"type":"end","status":"oom"\n'  # a rank killed mid-line
        b'{"type":"note","message":"the word \\"end\\" in a note"}\n{"type":"end","status":"error","rank":0}\n'
    )
    assert end_statuses(tmp_path) == ["error"]
    assert end_statuses(tmp_path / "missing") == []
