"""The on-disk profile: the writer, the incremental reader, and every way a run directory can be broken."""

from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blipmon import cli
from blipmon.core.errors import ProfileError
from blipmon.core.layout import CONFIG, EVENTS
from blipmon.core.profile import (
    FORMAT_VERSION,
    EventReader,
    EventWriter,
    check_run_dir,
    iter_run_dirs,
    read_all,
    read_config,
    write_config,
)
from blipmon.core.run import RunData, load_run
from blipmon.core.sample_lines import SampleBatch

HEADER = {"type": "header", "t": 0.0, "format_version": FORMAT_VERSION, "name": "r", "pid": 1, "hostname": "x"}


def line(rec: dict[str, Any]) -> bytes:
    return (json.dumps(rec) + "\n").encode()


def make_run(tmp_path: Path, *chunks: bytes, name: str = "run") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / EVENTS).write_bytes(b"".join(chunks))
    return d


def append(d: Path, data: bytes) -> None:
    with open(d / EVENTS, "ab") as fh:
        fh.write(data)


def step(i: int) -> dict[str, Any]:
    return {"type": "step", "t": float(i + 1), "step": i, "seconds": 0.5, "loss": 1.0, "samples_per_s": 8.0}


# -- writer ------------------------------------------------------------------------------------------


def test_writer_appends_one_flushed_json_line_per_event(tmp_path: Path) -> None:
    w = EventWriter(tmp_path / EVENTS)
    assert w.write("header", format_version=1, name="x")
    assert w.write("step", step=0, seconds=0.25, loss=1.5)
    # Flushed: readable before close.
    lines = (tmp_path / EVENTS).read_text().splitlines()
    assert [json.loads(x)["type"] for x in lines] == ["header", "step"]
    rec = json.loads(lines[1])
    assert rec == {"type": "step", "t": rec["t"], "step": 0, "seconds": 0.25, "loss": 1.5}
    assert isinstance(rec["t"], float) and rec["t"] >= 0
    w.close()
    assert not w.write("step", step=1)  # after close: refused, not raised
    w.close()  # twice is fine


def test_writer_keeps_an_explicit_time(tmp_path: Path) -> None:
    w = EventWriter(tmp_path / EVENTS, t0=0.0)
    w.write("sample", t=12.5, rss=1)
    w.close()
    assert json.loads((tmp_path / EVENTS).read_text())["t"] == 12.5


def test_writer_turns_tensor_like_scalars_into_numbers(tmp_path: Path) -> None:
    class Scalar:
        def item(self) -> int:
            return 7

    w = EventWriter(tmp_path / EVENTS)
    w.write("phase", params=Scalar())
    w.close()
    assert json.loads((tmp_path / EVENTS).read_text())["params"] == 7


def test_writer_records_a_non_finite_loss_as_null_instead_of_raising(tmp_path: Path) -> None:
    """A diverged loss (NaN under 16-mixed, say) must not kill the job from inside the profiler."""
    w = EventWriter(tmp_path / EVENTS)
    assert w.write("step", step=0, loss=math.nan, samples_per_s=math.inf)
    w.close()
    rec = json.loads((tmp_path / EVENTS).read_text())
    assert rec["loss"] is None and rec["samples_per_s"] is None


def test_writer_remembers_a_failed_write_instead_of_raising() -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    w = EventWriter(Path("/dev/full"))
    assert w.write("header", format_version=1) is False
    assert isinstance(w.failed, OSError)
    assert w.write("step", step=0) is False
    w.close()


def test_writer_is_safe_to_share_between_threads(tmp_path: Path) -> None:
    w = EventWriter(tmp_path / EVENTS)
    w.write("header", format_version=1)

    def burst(k: int) -> None:
        for i in range(300):
            w.write("sample", rss=k * 1000 + i)

    threads = [threading.Thread(target=burst, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    recs = [json.loads(x) for x in (tmp_path / EVENTS).read_text().splitlines()]
    assert len(recs) == 1 + 4 * 300
    assert sorted(r["rss"] for r in recs[1:]) == sorted(k * 1000 + i for k in range(4) for i in range(300))


# -- reader: incremental, truncated and corrupt lines --------------------------------------------


def test_a_truncated_last_line_is_not_written_yet(tmp_path: Path) -> None:
    full = line(step(0))
    d = make_run(tmp_path, line(HEADER), full[:17])
    reader = EventReader(d)
    assert [e["type"] for e in reader.poll()] == ["header"]
    assert reader.poll() == []
    assert reader.warnings == []
    append(d, full[17:])
    assert reader.poll() == [step(0)]
    append(d, line(step(1)))
    assert reader.poll() == [step(1)]
    assert reader.warnings == []


def test_load_run_ignores_a_half_written_last_line(tmp_path: Path) -> None:
    d = make_run(tmp_path, line(HEADER), line(step(0)), line(step(1))[:-9])
    run = load_run(d)
    assert [s["step"] for s in run.steps] == [0]
    assert run.warnings == []


def test_a_corrupt_middle_line_is_skipped_with_a_warning_naming_it(tmp_path: Path) -> None:
    d = make_run(tmp_path, line(HEADER), line(step(0)), b'{"type":"step","t":\n', b"[1, 2]\n", line(step(1)))
    reader = EventReader(d)
    assert [e.get("step") for e in reader.poll()] == [None, 0, 1]
    assert reader.warnings == [
        f"{d / EVENTS}: line 3 is corrupt and was skipped",
        f"{d / EVENTS}: line 4 is not an event and was skipped",
    ]
    run = load_run(d)
    assert [s["step"] for s in run.steps] == [0, 1]
    assert any("line 3 is corrupt" in w for w in run.warnings)


def test_warnings_name_the_right_line_among_many_samples(tmp_path: Path) -> None:
    samples = [line({"type": "sample", "t": i / 10, "rss": 1000 + i}) for i in range(5000)]
    d = make_run(tmp_path, line(HEADER), *samples[:3000], b"\x00\xff garbage\n", *samples[3000:], line(step(0)))
    run = load_run(d)
    assert run.warnings == [f"{d / EVENTS}: line 3002 is corrupt and was skipped"]
    assert len(run.samples) == 5000
    assert run.samples.host_rss[2999:3001] == [3999, 4000]
    assert [s["step"] for s in run.steps] == [0]


def test_blank_lines_are_ignored_silently(tmp_path: Path) -> None:
    d = make_run(tmp_path, line(HEADER), b"\n", b"   \n", line(step(0)))
    run = load_run(d)
    assert run.warnings == [] and len(run.steps) == 1


def test_a_newer_format_version_is_refused_clearly(tmp_path: Path) -> None:
    d = make_run(tmp_path, line({**HEADER, "format_version": FORMAT_VERSION + 1}), line(step(0)))
    with pytest.raises(ProfileError, match=rf"format version {FORMAT_VERSION + 1} is newer than this blipmon reads"):
        load_run(d)
    with pytest.raises(ProfileError, match="upgrade blipmon"):
        EventReader(d).poll()


@pytest.mark.parametrize("version", [None, "1", 1.0, True])
def test_a_header_without_a_valid_version_is_refused(tmp_path: Path, version: Any) -> None:
    d = make_run(tmp_path, line({**HEADER, "format_version": version}))
    with pytest.raises(ProfileError, match="no valid format_version"):
        load_run(d)


def test_an_older_format_version_is_read(tmp_path: Path) -> None:
    d = make_run(tmp_path, line({**HEADER, "format_version": 0}), line(step(0)))
    assert len(load_run(d).steps) == 1


def test_a_file_whose_first_record_is_not_a_header_is_not_a_profile(tmp_path: Path) -> None:
    d = make_run(tmp_path, line(step(0)), line(HEADER))
    with pytest.raises(ProfileError, match="not a blipmon profile"):
        load_run(d)


# -- run directories ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no such run directory"),
        ("file", "not a directory"),
        ("unrelated", "not a blipmon run (no events.jsonl in it)"),
        ("empty", "recorded nothing yet (events.jsonl is empty)"),
        ("partial", "recorded nothing readable yet"),
        ("garbage", "recorded nothing readable yet"),
    ],
)
def test_what_is_not_a_readable_run_is_a_profile_error_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, message: str
) -> None:
    target = tmp_path / "target"
    if setup == "file":
        target.write_text("hello")
    elif setup == "unrelated":
        target.mkdir()
        (target / "README.md").write_text("not a run")
    elif setup == "empty":
        make_run(tmp_path, b"", name="target")
    elif setup == "partial":
        make_run(tmp_path, line(HEADER)[:30], name="target")
    elif setup == "garbage":
        make_run(tmp_path, b"\x89PNG\r\n\x1a\n", name="target")
    with pytest.raises(ProfileError, match=re.escape(message)):
        load_run(target)
    with pytest.raises(ProfileError, match=re.escape(message)):
        read_all(target)
    # and the CLI: one line, exit 2
    assert cli.main(["show", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blipmon: ") and message in err and err.count("\n") == 1


def test_check_run_dir_accepts_a_run(tmp_path: Path) -> None:
    d = make_run(tmp_path, line(HEADER))
    assert check_run_dir(d) == d
    assert read_all(d).events == [HEADER]


def test_a_run_directory_removed_while_followed(tmp_path: Path) -> None:
    d = make_run(tmp_path, line(HEADER))
    reader = EventReader(d)
    reader.poll()
    (d / EVENTS).unlink()
    d.rmdir()
    with pytest.raises(ProfileError, match="no longer exists"):
        reader.poll()


def test_iter_run_dirs_finds_runs_and_sweep_members_newest_first(tmp_path: Path) -> None:
    a = make_run(tmp_path, line(HEADER), name="a")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    b = make_run(sweep, line(HEADER), name="b")
    (tmp_path / "not-a-run").mkdir()
    os.utime(a / EVENTS, (1_000, 1_000))
    os.utime(b / EVENTS, (2_000, 2_000))
    assert list(iter_run_dirs(tmp_path)) == [b, a]
    assert list(iter_run_dirs(tmp_path / "nope")) == []


def test_config_round_trip_and_errors(tmp_path: Path) -> None:
    cfg = {"name": "x", "train": {"batch_size": 2}}
    write_config(tmp_path, cfg)
    assert read_config(tmp_path) == cfg
    assert not (tmp_path / (CONFIG + ".tmp")).exists()
    (tmp_path / CONFIG).write_text("[1, 2]")
    with pytest.raises(ProfileError, match="not a configuration object"):
        read_config(tmp_path)
    (tmp_path / CONFIG).write_text("{nope")
    with pytest.raises(ProfileError, match="cannot read"):
        read_config(tmp_path)
    with pytest.raises(ProfileError, match="no config.json"):
        read_config(tmp_path / "missing")


def test_nothing_in_a_profile_is_executed(tmp_path: Path) -> None:
    """Profiles are data: a record that looks like code or a pickle stays a string."""
    payload = "__import__('os').system('touch PWNED')"
    d = make_run(tmp_path, line(HEADER), line({"type": "note", "t": 1.0, "message": payload}),
                 line({"type": "error", "t": 2.0, "message": "cos\nsystem\n(S'touch PWNED'\ntR."}))  # fmt: skip
    run = load_run(d)
    assert run.notes == [payload]
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


# -- the rank column of bulk-read samples --------------------------------------------------------------


def _sample_lines(n: int) -> list[str]:
    """Two ranks' samplers interleaved as a DDP run writes them: rank 0 without ``rank``, rank 1 with it."""
    out = []
    for i in range(n):
        t = round(1.0 + i * 0.05, 6)
        if i % 2:
            out.append(f'{{"type":"sample","t":{t},"rss":{2000 + i},"rank":1,"alloc":{i},"res":{2 * i},"dev":7}}')
        else:
            out.append(f'{{"type":"sample","t":{t},"rss":{1000 + i},"alloc":{i},"res":{2 * i},"dev":7}}')
    return out


def test_bulk_samples_carry_their_rank_and_a_sample_without_one_is_rank_0(tmp_path: Path) -> None:
    d = make_run(tmp_path, line(HEADER), *(s.encode() + b"\n" for s in _sample_lines(400)))
    events, batch = EventReader(d).poll_batch()
    assert [e["type"] for e in events] == ["header"] and len(batch) == 400
    assert batch.rank.dtype == np.float64
    assert batch.rank.tolist() == [float(i % 2) for i in range(400)]
    assert (batch.rss[batch.rank == 1] >= 2000).all() and (batch.rss[batch.rank == 0] < 2000).all()
    run = load_run(d)
    assert run.samples.rank == [i % 2 for i in range(400)]


@pytest.mark.parametrize(
    ("raw", "rank"),
    [
        ("3", 3),
        ("null", 0),
        ("-1", 0),  # not a rank: a damaged record reads as the single-rank writer's
        ("1.0", 0),
        ("1.5", 0),
        ("true", 0),
        ('"1"', 0),
        ("[1]", 0),
        ("1e0", 0),
    ],
)
def test_an_odd_rank_reads_the_same_in_bulk_and_line_by_line(tmp_path: Path, raw: str, rank: int) -> None:
    odd = f'{{"type":"sample","t":9.5,"rss":5,"rank":{raw}}}'
    lines = [line(HEADER), *(s.encode() + b"\n" for s in _sample_lines(200)), odd.encode() + b"\n"]
    d = make_run(tmp_path, *lines)
    _, batch = EventReader(d).poll_batch()
    assert len(batch) == 201 and batch.rank[-1] == rank and batch.rss[-1] == 5
    slow = RunData()
    slow.extend(EventReader(d).poll())
    assert slow.samples == load_run(d).samples


def test_sample_batch_keeps_the_rank_through_fill_merge_and_concat(tmp_path: Path) -> None:
    # A sample in another key order (read by json, merged back in place) and a corrupt one among ranked samples.
    lines = _sample_lines(50)
    lines.insert(10, '{"rank":2,"type":"sample","t":1.49,"rss":77}')
    lines.insert(20, '{"type":"sample","t":1.9,"rss":12,"rank":2,garbage}')
    d = make_run(tmp_path, line(HEADER), *(s.encode() + b"\n" for s in lines))
    reader = EventReader(d)
    batches = []
    while True:
        _, b = reader.poll_batch(max_bytes=700)
        if not len(b) and reader.offset >= (d / EVENTS).stat().st_size:
            break
        batches.append(b)
    whole = SampleBatch.concat(batches)
    assert len(whole) == 51 and len(whole.rank) == 51
    assert whole.rank[10] == 2 and whole.rss[10] == 77
    assert whole.rank.tolist()[:10] == [float(i % 2) for i in range(10)]
    assert SampleBatch.empty().rank.shape == (0,)
