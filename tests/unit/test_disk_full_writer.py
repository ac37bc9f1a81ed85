"""A full disk, byte for byte: the writer keeps every record whole, the run's last records still fit, nothing is left.

The "disk" is a budget of free bytes in front of a real file: a write larger than what is free writes
what fits and returns the short count, the next one fails with ENOSPC, as on a real filesystem. The
run's reserve file is real; freeing it (unlinking) gives its bytes back to the budget.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from blipmon.core import profile
from blipmon.core.config import resolve
from blipmon.core.profile import RESERVE, RESERVE_BYTES, EventWriter, read_all, reserve_space, write_config
from blipmon.core.run import load_run
from blipmon.runner import launch as launch_mod
from blipmon.runner.launch import Launch


class Disk:
    """A file whose writes draw on ``free`` bytes, plus whatever the run's reserve gives back when freed."""

    def __init__(self, path: Path, free: int, reserve_dir: Path | None) -> None:
        self.fh = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by the writer
        self.free = free
        self.reserve = reserve_dir / RESERVE if reserve_dir else None
        self.had_reserve = bool(self.reserve and self.reserve.exists())

    def _available(self) -> int:
        back = RESERVE_BYTES if self.had_reserve and self.reserve is not None and not self.reserve.exists() else 0
        return self.free + back

    def write(self, data: bytes) -> int:
        room = self._available()
        if room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = min(room, len(data))
        self.fh.write(bytes(data[:n]))
        self.free -= n
        return n

    def close(self) -> None:
        self.fh.close()


def writer_on(tmp_path: Path, free: int, *, reserve: bool) -> EventWriter:
    if reserve:
        reserve_space(tmp_path)
    w = EventWriter(tmp_path / "events.jsonl", reserve_dir=tmp_path if reserve else None)
    w._fh.close()  # type: ignore[union-attr]
    w._fh = Disk(tmp_path / "events.jsonl", free, tmp_path if reserve else None)  # type: ignore[assignment]
    return w


def fill(w: EventWriter) -> int:
    n = 0
    while w.write("sample", rss=10**9 + n, alloc=None):
        n += 1
    return n


def test_the_record_that_fills_the_disk_ends_whole_and_the_ending_still_fits(tmp_path: Path) -> None:
    w = writer_on(tmp_path, 400, reserve=True)
    assert w.write("header", format_version=1, name="run")
    written = fill(w)
    assert isinstance(w.failed, OSError) and w.failed.errno == errno.ENOSPC
    assert not (tmp_path / RESERVE).exists()  # freed for the ending
    assert w.write("sample", rss=1) is False  # the job stops writing samples...
    assert w.write_final("error", message="disk full: ...", reason="disk_full")  # ...but says how it ended
    assert w.write_final("end", status="error", code=1)
    w.close()
    lines = (tmp_path / "events.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""  # every record ends its line
    recs = [json.loads(x) for x in lines[:-1]]  # and every line is a whole record
    kinds = [r["type"] for r in recs]
    assert kinds == ["header"] + ["sample"] * written + ["error", "end"]
    assert [r["rss"] for r in recs[1:-2]] == [10**9 + i for i in range(written)]
    # the sample that hit the full disk went out whole (write returned True): its end is in the freed space
    assert sum(len(x) + 1 for x in lines[: 1 + written]) > 400
    assert [e["type"] for e in read_all(tmp_path).events][-1] == "end" and not read_all(tmp_path).warnings


def test_without_a_reserve_the_partial_line_is_ended_before_the_next_record(tmp_path: Path) -> None:
    w = writer_on(tmp_path, 100, reserve=False)  # the header fits, the first sample is cut
    assert w.write("header", format_version=1, name="run")
    fill(w)
    assert w.write_final("end", status="error", code=1) is False  # no room at all
    w._fh.free = 1000  # type: ignore[union-attr]  # someone freed space meanwhile
    assert w.write_final("end", status="error", code=1)
    w.close()
    result = read_all(tmp_path)
    assert [e["type"] for e in result.events][0] == "header" and result.events[-1]["type"] == "end"
    assert len(result.warnings) == 1 and "corrupt" in result.warnings[0]  # the cut line, skipped


def test_a_file_size_limit_is_not_a_full_disk(tmp_path: Path) -> None:
    reserve_space(tmp_path)
    w = EventWriter(tmp_path / "events.jsonl", reserve_dir=tmp_path)

    class TooBig:
        def write(self, data: bytes) -> int:
            raise OSError(errno.EFBIG, "File too large")

        def close(self) -> None:
            pass

    w._fh.close()  # type: ignore[union-attr]
    w._fh = TooBig()  # type: ignore[assignment]
    assert w.write("header", format_version=1) is False
    assert (tmp_path / RESERVE).exists()  # freeing space cures nothing here: the parent frees it later


def test_config_json_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_text

    def full_disk(self: Path, text: str, *a: Any, **k: Any) -> int:
        real(self, text[:10], *a, **k)  # part of it went out, then the disk was full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError):
        write_config(tmp_path, {"name": "x"})
    assert sorted(os.listdir(tmp_path)) == []  # no config.json.tmp behind


def test_a_disk_too_full_to_start_a_run_is_refused_leaving_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_room(run_dir: Path, nbytes: int = RESERVE_BYTES) -> None:
        (run_dir / RESERVE).write_bytes(b"\0" * 100)  # what fitted before the disk was full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(launch_mod, "reserve_space", no_room)
    with pytest.raises(OSError) as err:
        Launch(resolve("tiny/blip2-opt"), tmp_path / "out")
    assert "disk full" in str(err.value) and "No space left on device" in str(err.value)
    assert list((tmp_path / "out").iterdir()) == []  # no run directory, no config.json(.tmp), no reserve


def test_the_parent_says_disk_full_when_the_child_could_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child died on a full disk without its end record: the parent, once the reserve is freed, says why."""
    launch = Launch(resolve("tiny/blip2-opt"), tmp_path)
    (launch.run_dir / "events.jsonl").write_text(
        json.dumps({"type": "header", "t": 0.0, "format_version": 1, "name": "tiny/blip2-opt", "pid": 1}) + "\n"
        '{"type":"sample","t":0.5,"rss":1000}\n{"type":"sample","t":0.6,"r'  # cut by the full disk
    )
    monkeypatch.setattr(launch_mod, "_disk_nearly_full", lambda _d: True)
    launch._finish(1)
    assert launch.exit_code() == 1
    assert not (launch.run_dir / RESERVE).exists()
    run = load_run(launch.run_dir)
    assert run.status == "error"
    assert run.error is not None and run.error["message"].startswith("disk full")
    assert run.error["reason"] == "disk_full" and run.exit == {**run.exit, "code": 1, "signal": None}


def test_a_child_that_ended_cleanly_gets_no_extra_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    launch = Launch(resolve("tiny/blip2-opt"), tmp_path)
    (launch.run_dir / "events.jsonl").write_text(
        '{"type":"header","t":0.0,"format_version":1,"name":"x","pid":1}\n'
        '{"type":"error","t":1.0,"message":"disk full: cannot write the profile any more","reason":"disk_full"}\n'
        '{"type":"end","t":1.1,"status":"error","code":1,"rank":0}\n'
    )
    monkeypatch.setattr(launch_mod, "_disk_nearly_full", lambda _d: True)
    launch._finish(1)
    kinds = [e["type"] for e in read_all(launch.run_dir).events]
    assert kinds == ["header", "error", "end", "exit"]


def test_the_exit_that_cannot_be_recorded_says_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "events.jsonl").write_text('{"type":"header","format_version":1}\n')
    real_open = open

    def full(path: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full)
    launch_mod.append_exit(tmp_path, 1)
    err = capsys.readouterr().err
    assert err.startswith("blipmon: disk full: could not record the exit of") and "No space left on device" in err


def test_the_reserve_is_real_blocks(tmp_path: Path) -> None:
    reserve_space(tmp_path)
    st = os.stat(tmp_path / RESERVE)
    assert st.st_size == RESERVE_BYTES == 64 * 1024
    assert st.st_blocks * 512 >= RESERVE_BYTES  # written, not sparse: it holds the space it will give back
    assert profile.release_reserve(tmp_path) and not profile.release_reserve(tmp_path)
