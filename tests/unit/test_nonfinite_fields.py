"""A profile whose figures are ``Infinity`` or ``NaN`` (Python's JSON reader accepts both) still loads.

Found by tests/unit/test_reader_fuzz.py: ``"host_total_bytes": Infinity`` in an environment record made
``load_run`` raise OverflowError (a traceback for ``show``) instead of reading the figure as not recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

from blipmon.core.run import load_run


def test_non_finite_byte_counts_read_as_not_recorded(tmp_path: Path) -> None:
    lines = [
        '{"type": "header", "format_version": 1, "name": "x", "pid": 1, "hostname": "elsewhere"}',
        '{"type": "environment", "t": 0.1, "device": "cpu", "host_total_bytes": Infinity, "gpu_total_bytes": NaN}',
        '{"type": "end", "t": 1.0, "status": "ok", "code": 0}',
    ]
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = load_run(tmp_path)
    assert run.environment["host_total_bytes"] is None
    assert run.environment["gpu_total_bytes"] is None
    summary = run.summary()
    json.dumps(summary, allow_nan=False)  # the fixed summary stays strict JSON
    assert summary["environment"]["host_total_bytes"] is None
