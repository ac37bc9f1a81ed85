"""A big profile's first frame comes before its samples (issue 17 item 1): streamed state equals a full read.

``ReplaySource`` and ``FileFollowSource`` read the head of a big file at once and the rest in chunks on
a loader thread that holds back until the view says its first frame is up (``view_shown``). These
tests hold the streamed result to the same file read whole, also for a profile cut at any byte, and
check that the loader waits for the view. No time is asserted.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from blipmon.core import replay as replay_mod
from blipmon.core.layout import EVENTS
from blipmon.core.replay import ReplaySource, tail_status
from blipmon.core.snapshot import Snapshot
from blipmon.runner.follow import FileFollowSource

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
N = 2000  # samples: 100 steps, 400 phases, an index, end and exit (~390 kB)


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("blipmon_replay_open_bench", BENCH / "replay_open.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _bench().write_profile(tmp_path_factory.mktemp("p") / "run", N)


def same(a: Snapshot, b: Snapshot) -> None:
    """Everything a view draws from: samples (the timeline's columns), phases, steps, peaks, status."""
    assert a.samples.keys() == b.samples.keys()
    for k in a.samples:
        np.testing.assert_array_equal(a.samples[k], b.samples[k])
    assert list(a.phases) == list(b.phases)
    assert list(a.steps) == list(b.steps)
    assert a.peaks(None) == b.peaks(None)
    assert (a.status, a.finished, a.name, a.environment) == (b.status, b.finished, b.name, b.environment)


def attach_streamed(run: Path, chunk: int) -> Snapshot:
    src = FileFollowSource(run, mode="attach", backlog_bytes=0, chunk_bytes=chunk)
    assert src.wait_loaded(timeout=60)
    snap = src.poll()
    src.close()
    return snap


def test_attach_streamed_in_chunks_equals_the_whole_file_read_at_once(profile: Path) -> None:
    whole = FileFollowSource(profile, mode="attach").poll()
    assert whole.samples["t"].shape == (N,) and len(whole.steps) == N // 20 and whole.status == "ok"
    same(attach_streamed(profile, 16 << 10), whole)


def test_attach_of_a_big_file_shows_the_head_first_and_how_the_run_ended(profile: Path) -> None:
    src = FileFollowSource(profile, mode="attach", backlog_bytes=0, chunk_bytes=16 << 10)
    first = src.poll()  # the view has not said its frame is up: only the head is read
    assert first.name == "bench/1M" and first.environment["gpu_name"] == "NVIDIA H100 80GB HBM3"
    assert len(first.samples["t"]) < N
    assert first.status == "ok"  # from the end record at the file's end, not "running" nor a dead pid's "killed"
    assert first.stall is None
    src.close()


def test_replay_streamed_equals_replay_read_at_once(profile: Path) -> None:
    at_once = ReplaySource(profile, background=False)
    at_once.seek_fraction(1.0)
    streamed = ReplaySource(profile, chunk_bytes=16 << 10)
    streamed.view_shown()
    assert streamed.wait_loaded(timeout=60)
    streamed.seek_fraction(1.0)
    same(streamed.poll(), at_once.poll())
    streamed.close()


def test_the_loader_waits_for_the_first_frame(profile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay_mod, "HOLD_S", 60.0)
    src = ReplaySource(profile, chunk_bytes=16 << 10)
    head = src.reader.offset
    time.sleep(0.3)
    assert src.reader.offset == head and src.loaded < 1.0  # held: nothing beyond the head yet
    src.view_shown()
    assert src.wait_loaded(timeout=60) and src.loaded == 1.0
    src.close()


def test_a_profile_cut_at_any_byte_still_opens_and_streams_to_the_same_state(tmp_path: Path) -> None:
    data = (_bench().write_profile(tmp_path / "small", 200) / EVENTS).read_bytes()  # ~40 kB, 10 chunks
    ends = [i for i, b in enumerate(data) if b == 0x0A]
    # byte offsets all through the file, and every byte of the last records (end, exit)
    cuts = sorted({*range(1, len(data), 397), *range(ends[-3] - 3, len(data) + 1), ends[0], ends[0] + 1})
    run = tmp_path / "cut"
    run.mkdir()
    for cut in cuts:
        (run / EVENTS).write_bytes(data[:cut])
        whole = FileFollowSource(run, mode="attach").poll()
        same(attach_streamed(run, 4096), whole)
        if whole.name != run.name:  # a header was read: a replay opens it too
            at_once = ReplaySource(run, background=False)
            streamed = ReplaySource(run, chunk_bytes=4096)
            streamed.view_shown()
            assert streamed.wait_loaded(timeout=60), cut
            at_once.seek_fraction(1.0)
            streamed.seek_fraction(1.0)
            same(streamed.poll(), at_once.poll())
            streamed.close()


def test_tail_status_reads_how_the_run_ended(profile: Path, tmp_path: Path) -> None:
    assert tail_status(profile / EVENTS) == "ok"
    data = (profile / EVENTS).read_bytes()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / EVENTS).write_bytes(data[: data.rindex(b'{"type": "end"')])  # before end and exit
    assert tail_status(cut / EVENTS) is None
