"""The bulk sample path (``EventReader.poll_batch``) reads exactly what the per-line path reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from blipmon.core.errors import ProfileError
from blipmon.core.profile import EventReader
from blipmon.core.run import RunData, load_run
from blipmon.core.sample_lines import parse_numbers
from blipmon.core.samples import Samples

ODD_LINES = [
    '{"type":"sample","t":1e-05,"rss":5}',
    '{"type":"sample","t":0.5,"rss":null,"alloc":null,"res":3,"dev":true}',
    '{"type":"sample","t":0.6,"rss":12,"rank":1,"alloc":5,"res":6,"dev":7,"proc_gpu":8}',
    '{"type":"sample","t":0.7,"rss":"x"}',
    '{"type":"sample","t":0.8,"rss":12,garbage}',
    '{"type":"sample","t":0.9,"rss":-12}',
    '{"type":"sample","t":1.0,"rss":12345678901234567}',
    "",
    '{"type":"phase","t":2,"phase":"after_fwd","peak":10}',
    '{"type":"sample","t":null,"rss":1.5}',
    '{"type":"sample","t":3,"rss":0}',
    '{"type":"sample","rss":7,"t":3}',
    '{"type":"sample","t":100.25,"rss":1,"alloc":2.75,"res":3,"dev":4,"proc_gpu":5}',
    "[1, 2]",
]


def _write(path: Path, n: int = 3000, tail: str = '{"type":"sample","t":99') -> Path:
    lines = ['{"type":"header","t":0.1,"format_version":1,"name":"e","hostname":"x"}']
    for i in range(n):
        if i < len(ODD_LINES):
            lines.append(ODD_LINES[i])
        else:
            rec = {"type": "sample", "t": round(i * 0.1 + 0.000123, 6), "rss": 1000 + i,
                   "alloc": i * 7 if i % 3 else None, "res": i * 9, "dev": 4, "proc_gpu": None}  # fmt: skip
            lines.append(json.dumps(rec, separators=(",", ":")))
    path.mkdir(parents=True, exist_ok=True)
    (path / "events.jsonl").write_text("\n".join(lines) + "\n" + tail, encoding="utf-8")
    return path


def _per_line(run_dir: Path) -> tuple[RunData, list[str]]:
    reader = EventReader(run_dir)
    run = RunData(path=run_dir)
    run.extend(reader.poll())
    return run, reader.warnings


def test_bulk_and_per_line_agree_on_odd_records(tmp_path: Path) -> None:
    d = _write(tmp_path / "r")
    slow, warnings = _per_line(d)
    fast = load_run(d)
    assert fast.samples == slow.samples
    assert fast.samples.t == slow.samples.t
    assert fast.samples.host_rss == slow.samples.host_rss
    assert fast.samples.allocated == slow.samples.allocated
    assert fast.samples.device_used == slow.samples.device_used
    assert fast.last_t == slow.last_t
    assert fast.warnings == warnings and len(warnings) == 2  # the garbage line and the list
    assert fast.summary() == slow.summary()


def test_bulk_agrees_on_a_recorded_run(cpu_run: Path) -> None:
    slow, _ = _per_line(cpu_run)
    fast = load_run(cpu_run)
    assert fast.summary() == slow.summary() and fast.samples == slow.samples


def test_small_chunks_and_a_truncated_last_line(tmp_path: Path) -> None:
    d = _write(tmp_path / "r", n=500)
    reader = EventReader(d)
    run = RunData(path=d)
    while run.follow(reader, max_bytes=1000):
        pass
    slow, _ = _per_line(d)
    assert run.samples == slow.samples
    with open(d / "events.jsonl", "a", encoding="utf-8") as fh:
        fh.write(',"rss":5}\n')  # the truncated last line completes
    assert run.follow(reader) == 1
    assert run.samples.t[-1] == 99.0


def test_a_profile_must_start_with_a_header(tmp_path: Path) -> None:
    d = tmp_path / "r"
    d.mkdir()
    (d / "events.jsonl").write_text('{"type":"sample","t":1,"rss":2}\n', encoding="utf-8")
    with pytest.raises(ProfileError, match="not a blipmon profile"):
        EventReader(d).poll_batch()


def test_parse_numbers_exact_and_refusals() -> None:
    text = b"12.5,0.000123,7,null,1e-05,-3,5.,.5,1.2.3,12345678901234567"
    a = np.frombuffer(text, np.uint8)
    parts, s = [], 0
    for tok in text.split(b","):
        parts.append((s, s + len(tok)))
        s += len(tok) + 1
    vals, bad = parse_numbers(a, np.array([p[0] for p in parts]), np.array([p[1] for p in parts]))
    assert vals[0] == 12.5 and vals[1] == float("0.000123") and vals[2] == 7.0
    assert np.isnan(vals[3]) and not bad[3]  # null is a value: not measured
    assert list(bad[4:]) == [True] * 6


def test_samples_keep_the_list_api() -> None:
    s = Samples(t=[0.0, 1.0], host_rss=[5, 6], allocated=[None, 3])
    s.append({"t": 2.0, "rss": 7, "alloc": 9})
    assert s.t == [0.0, 1.0, 2.0] and s.host_rss == [5, 6, 7]
    assert s.allocated == [None, 3, 9] and s.reserved == [None, None, None]
    assert len(s) == 3 and s.maxima()["allocated"] == 9 and s.maxima()["reserved"] is None
    view = s.arrays()["t"]
    for i in range(5000):
        s.append({"t": 3.0 + i, "rss": 1})
    assert list(view) == [0.0, 1.0, 2.0]  # an earlier view never changes
    assert len(s) == 5003 and s.t[-1] == 5002.0
