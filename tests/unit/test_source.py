"""Run sources: following a growing file and replaying a saved one, on a frozen clock."""

from __future__ import annotations

import json
from pathlib import Path

from recorded import FrozenClock, gpu_events, write_run

from blipmon.core.logtail import LogTail
from blipmon.core.replay import ReplaySource
from blipmon.runner.follow import FileFollowSource, open_source


def test_follow_sees_records_as_they_are_written(tmp_path: Path, clock: FrozenClock) -> None:
    events = gpu_events(finished=False)
    d = write_run(tmp_path / "r", events[:10])
    src = FileFollowSource(d, mode="attach", clock=clock)
    first = src.poll()
    assert first.status == "running" and first.environment["gpu_name"].startswith("NVIDIA")
    assert src.poll() is first  # nothing moved: the same snapshot
    with open(d / "events.jsonl", "a", encoding="utf-8") as fh:
        for e in events[10:40]:
            fh.write(json.dumps(e) + "\n")
        fh.write('{"type":"sample","t":99')  # half a record: not written yet
    second = src.poll()
    assert second.version > first.version and second.data_version > first.data_version
    assert len(second.phases) > len(first.phases)
    assert first.n_samples < second.n_samples
    clock.advance(30)
    assert src.poll().now >= 30  # elapsed follows the clock while running


def test_follow_a_finished_run_shows_its_end(gpu_run: Path) -> None:
    snap = FileFollowSource(gpu_run).poll()
    assert snap.finished and snap.status == "oom"
    assert snap.oom and snap.oom["requested_bytes"] == 20 * 1024**3
    assert snap.now == max(float(e["t"]) for e in gpu_events() if isinstance(e.get("t"), float))
    pk = snap.peaks()
    assert pk["allocated"] is not None and pk["device_used"] is not None and pk["allocated"] <= pk["device_used"]


def test_follow_a_run_whose_directory_vanishes(tmp_path: Path) -> None:
    d = write_run(tmp_path / "r", gpu_events(finished=False)[:5])
    src = FileFollowSource(d)
    src.poll()
    for p in d.iterdir():
        p.unlink()
    d.rmdir()
    snap = src.poll()
    assert snap.problem and "no longer exists" in snap.problem


def test_replay_moves_with_speed_pause_and_seek(gpu_run: Path, clock: FrozenClock) -> None:
    src = ReplaySource(gpu_run, speed=2.0, clock=clock, background=False)
    s0 = src.poll()
    assert s0.replay is not None and s0.status == "running" and not s0.finished
    assert s0.oom is None  # not yet: it happens later in the run
    clock.advance(1.0)
    s1 = src.poll()
    assert abs(s1.replay.position - s0.replay.position - 2.0) < 1e-9
    src.toggle_pause()
    clock.advance(5.0)
    assert src.poll().replay.position == s1.replay.position
    src.faster()
    assert src.speed == 4.0
    src.slower()
    src.slower()
    assert src.speed == 1.0
    src.seek(5)
    assert src.poll().replay.position == s1.replay.position + 5
    src.seek_fraction(1.0)
    end = src.poll()
    assert end.finished and end.status == "oom" and end.oom is not None
    assert end.replay.paused  # a replay stops at the end
    src.toggle_pause()  # play again from the start
    assert src.poll().replay.position == s0.replay.position


def test_replay_shows_only_what_happened_before_the_playhead(gpu_run: Path, clock: FrozenClock) -> None:
    src = ReplaySource(gpu_run, clock=clock, background=False)
    src.seek_to(10.0)
    snap = src.poll()
    assert all(p["t"] <= 10.0 for p in snap.phases)
    assert float(snap.samples["t"][-1]) <= 10.0
    assert len(snap.steps) < 4 and snap.exit is None


def test_replay_in_the_background_of_a_big_profile(tmp_path: Path, clock: FrozenClock) -> None:
    d = write_run(tmp_path / "big", gpu_events(steps=40, oom_step=None, samples_per_step=200))
    src = ReplaySource(d, clock=clock, chunk_bytes=64 << 10)
    first = src.poll()
    assert first.name == "h100/reduced-batch"
    assert src.wait_loaded(timeout=60)
    assert src.loaded == 1.0 and src.duration > 100
    src.seek_fraction(1.0)
    assert src.poll().status == "ok"
    src.close()


def test_progress_and_eta(gpu_run: Path, clock: FrozenClock) -> None:
    src = ReplaySource(gpu_run, clock=clock, background=False)
    src.seek_to(8.0)
    done, total, eta = src.poll().progress()
    assert total == 6 and 0 < done < 6 and eta is not None and eta > 0


def test_latest_step_prefers_the_last_complete_step(gpu_run: Path) -> None:
    snap = FileFollowSource(gpu_run).poll()
    latest = snap.latest_step()
    assert [p["phase"] for p in latest] == ["before_fwd", "after_fwd", "after_bwd", "after_opt_step"]
    assert latest[0]["step"] == 3  # step 4 ran out of memory half way
    assert snap.step_peaks()["after_fwd"] > snap.step_peaks()["before_fwd"]


def test_log_tail_keeps_the_last_state_of_progress_bars(tmp_path: Path) -> None:
    p = tmp_path / "child.log"
    p.write_text("loading\nweights 10%\rweights 100%\nhalf", encoding="utf-8")
    tail = LogTail(p)
    assert tail.poll()
    assert tail.snapshot() == ("loading", "weights 100%", "half")
    assert not tail.poll()


def test_open_source_picks_by_mode(gpu_run: Path) -> None:
    assert isinstance(open_source(gpu_run, "replay", background=False), ReplaySource)
    assert open_source(gpu_run, "attach").mode == "attach"
