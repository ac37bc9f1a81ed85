"""The child's log shows its tail, not its first MiB (issue 16, item 4).

A run that logged 30,000 warnings before its traceback used to replay with the first 1 MiB of
child.log and end mid-line: the error never appeared. ``LogTail`` now reads at most its budget from
the end, drops the line the cut falls in, and says how much it skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recorded import FrozenClock, gpu_events, write_run
from ui_helpers import drive, screen_text

from blipmon.core.logtail import LOG_TAIL_BYTES, LogTail
from blipmon.core.replay import ReplaySource
from blipmon.runner.follow import FileFollowSource
from blipmon.ui.app import BlipmonApp
from blipmon.ui.live import RunScreen

WARNINGS = 30_000
TRACEBACK = [
    "Traceback (most recent call last):",
    '  File "train.py", line 12, in <module>',
    "    trainer.fit(model)",
    "ValueError: the image processor got 0 images for 2 prompts",
]


def _noisy_log(path: Path) -> bytes:
    lines = [f"UserWarning: step {i:05d}: `torch.cuda.amp.autocast(args...)` is deprecated" for i in range(WARNINGS)]
    data = ("\n".join(lines + TRACEBACK) + "\n").encode()
    path.write_bytes(data)
    return data


def _first_kept(data: bytes, budget: int) -> int:
    """Where the shown tail must begin: the first whole line inside the last ``budget`` bytes."""
    start = len(data) - budget
    return data.index(b"\n", start) + 1


def test_log_tail_of_a_long_log_ends_with_the_traceback_and_says_what_it_skipped(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    data = _noisy_log(log)
    assert len(data) > 2 * LOG_TAIL_BYTES  # the situation of the issue: far more than one read
    tail = LogTail(log, keep=WARNINGS + 10)
    assert tail.poll()
    lines = tail.snapshot()
    skipped = _first_kept(data, LOG_TAIL_BYTES)
    assert tail.skipped == skipped
    assert lines[0] == (
        f"[blipmon: child.log is long: its first {skipped / 2**20:.2f} MiB ({skipped:,} bytes) are skipped here; "
        f"the whole log is {log}]"
    )
    assert list(lines[-4:]) == TRACEBACK
    # Every line after the note is a whole line of the file, and they are exactly the file from the cut on.
    assert "\n".join(lines[1:]).encode() + b"\n" == data[skipped:]
    assert not tail.poll()  # nothing new


def test_log_tail_follows_on_after_skipping(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    _noisy_log(log)
    tail = LogTail(log)
    tail.poll()
    with open(log, "ab") as fh:
        fh.write(b"one more line\npartial")
    assert tail.poll()
    assert tail.snapshot()[-2:] == ("one more line", "partial")
    assert tail.snapshot()[-6:-2] == tuple(TRACEBACK)


def test_a_short_log_is_read_whole_with_no_note(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    log.write_text("a\nb\n", encoding="utf-8")
    tail = LogTail(log)
    tail.poll()
    assert tail.skipped == 0 and tail.snapshot() == ("a", "b")


def test_a_character_split_between_two_reads_is_decoded_whole(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    log.write_bytes(b"caf\xc3")  # the child has written the first byte of "é" so far
    tail = LogTail(log)
    tail.poll()
    with open(log, "ab") as fh:
        fh.write(b"\xa9 au lait\n")
    tail.poll()
    assert tail.snapshot() == ("café au lait",)


def test_attach_to_a_run_with_a_long_log_reads_its_tail_at_once(tmp_path: Path) -> None:
    d = write_run(tmp_path / "run", gpu_events(finished=False)[:40])
    _noisy_log(d / "child.log")
    snap = FileFollowSource(d, mode="attach", clock=FrozenClock()).poll()
    assert snap.log[0].startswith("[blipmon: child.log is long")
    assert list(snap.log[-4:]) == TRACEBACK


def test_replay_shows_the_traceback_after_30000_warnings(tmp_path: Path) -> None:
    d = write_run(tmp_path / "run", gpu_events())
    data = _noisy_log(d / "child.log")
    app = BlipmonApp(RunScreen(ReplaySource(d, clock=FrozenClock(), background=False)))

    async def script(pilot: Any) -> None:
        await pilot.press("end")
        await pilot.pause()
        text = screen_text(pilot.app)
        assert TRACEBACK[-1] in text  # the error that ended the run, on screen
        assert f"UserWarning: step {WARNINGS - 1:05d}" in text
        pilot.app.screen.query_one("#log").scroll_home(animate=False)
        await pilot.pause()
        skipped = _first_kept(data, LOG_TAIL_BYTES)
        assert f"its first {skipped / 2**20:.2f} MiB ({skipped:,} bytes) are skipped here" in screen_text(pilot.app)

    drive(app, script, size=(160, 40))
