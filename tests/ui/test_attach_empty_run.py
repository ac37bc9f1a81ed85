"""``attach`` to a run whose events.jsonl is still empty waits for its header (issue 16, item 11).

Attaching in the first moment of a run (the folder and the file exist, the header is being written)
used to exit 2, "the run has recorded nothing yet". ``check_follow_dir`` accepts that run, and the
run view shows it as starting until the header arrives, then as the run it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from recorded import FrozenClock, gpu_events
from ui_helpers import drive, screen_text, wait_until

from blipmon.core.errors import ProfileError
from blipmon.core.profile import check_run_dir
from blipmon.core.run import check_follow_dir
from blipmon.runner.follow import FileFollowSource
from blipmon.ui.app import BlipmonApp
from blipmon.ui.live import RunScreen


def _empty_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "events.jsonl").write_bytes(b"")
    return path


def _append(d: Path, events: list[dict[str, Any]]) -> None:
    with open(d / "events.jsonl", "a", encoding="utf-8") as fh:
        for ev in events:
            fh.write(json.dumps(ev) + "\n")


def test_check_follow_dir_accepts_an_empty_run_and_refuses_what_is_no_run(tmp_path: Path) -> None:
    d = _empty_run(tmp_path / "starting")
    with pytest.raises(ProfileError, match="recorded nothing yet"):
        check_run_dir(d)  # show, compare, replay: nothing to show yet
    assert check_follow_dir(d) == d  # attach: wait for it
    (tmp_path / "plain").mkdir()
    (tmp_path / "file").write_text("x", encoding="utf-8")
    for bad, why in (
        (tmp_path / "missing", "no such run directory"),
        (tmp_path / "plain", r"not a blipmon run \(no events.jsonl in it\)"),
        (tmp_path / "file", "not a directory"),
    ):
        with pytest.raises(ProfileError, match=why):
            check_follow_dir(bad)


def test_following_an_empty_run_waits_for_its_header(tmp_path: Path) -> None:
    d = _empty_run(tmp_path / "20260101T000000-tiny")
    src = FileFollowSource(d, mode="attach", clock=FrozenClock())
    snap = src.poll()
    assert (snap.status, snap.name, snap.finished, snap.problem) == ("starting", "20260101T000000-tiny", False, None)
    _append(d, gpu_events(finished=False)[:3])
    snap = src.poll()
    assert (snap.status, snap.name) == ("running", "h100/reduced-batch")
    assert snap.environment["gpu_name"] == "NVIDIA H100 80GB HBM3"


def test_the_run_view_on_an_empty_run_shows_it_starting_then_running(tmp_path: Path) -> None:
    d = _empty_run(tmp_path / "20260101T000000-tiny")
    app = BlipmonApp(RunScreen(FileFollowSource(d, mode="attach", clock=FrozenClock()), refresh=0.05))

    async def script(pilot: Any) -> None:
        text = screen_text(pilot.app)
        assert "20260101T000000-tiny  starting  [attached]" in text
        assert "device: waiting for the child…" in text
        _append(d, gpu_events(finished=False)[:3])
        await wait_until(pilot, lambda: "h100/reduced-batch  running" in screen_text(pilot.app), "the header")
        assert "GPU NVIDIA H100 80GB HBM3" in screen_text(pilot.app)

    drive(app, script, size=(120, 30))
