"""``blipmon watch`` ends when its command ends, whatever sample rate it was given.

The rate's range is the CLI's business (``--sample-hz``); these call ``blipmon.runner.watch.record`` with
an argument namespace, as the CLI does after parsing, so the recorder itself is held to every value: a
rate of 1e-9 per second once slept 31 years after the first sample, deaf to SIGTERM and SIGINT. Each
test runs the recorder in a process of its own (it adopts orphans and reaps every child) and waits for
it with the suite's usual patience; a hang fails the test, nothing depends on how fast anything is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import PATIENCE_S, read_events, subprocess_env

from blipmon.core.run import load_run

RECORDER = textwrap.dedent(
    """
    import argparse, json, sys
    from blipmon.runner.watch import record as main
    out, hz, cmd = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
    sys.exit(main(argparse.Namespace(cmd=["--", *cmd], sample_hz=hz, out=out)))
    """
)

# Says it is ready, then waits for a signal; SIGTERM's default action ends it.
WAITS = "import pathlib, sys, time\npathlib.Path(sys.argv[1]).write_text('ready')\nwhile True: time.sleep(0.05)"


def start(out: Path, hz: float, cmd: list[str], cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", RECORDER, str(out), repr(hz), json.dumps(cmd)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=subprocess_env(cache),
        start_new_session=True,  # no terminal: blipmon forwards signals to the command's own group
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=PATIENCE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"blipmon watch did not end after its command\n{err}")
    return proc.returncode, err


def only_run(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if (p / "events.jsonl").is_file()]
    return run_dir


@pytest.mark.parametrize("hz", [1e-9, 1e-300])
def test_a_tiny_rate_ends_with_the_command(tmp_path: Path, blipmon_cache: Path, hz: float) -> None:
    proc = start(tmp_path, hz, [sys.executable, "-c", "import time, sys; time.sleep(0.3); sys.exit(3)"], blipmon_cache)
    code, err = finish(proc)
    assert code == 3, err
    run = load_run(only_run(tmp_path))
    assert run.summary()["exit"] == {"code": 3, "signal": None}
    watch = next(e for e in read_events(only_run(tmp_path) / "events.jsonl") if e["type"] == "watch")
    assert watch["sample_hz"] == pytest.approx(1e-9)  # 1e-300 is held to one sample per 1e9 s


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_tiny_rate_still_hears_signals(tmp_path: Path, blipmon_cache: Path, sig: signal.Signals) -> None:
    ready = tmp_path / "ready"
    out = tmp_path / "out"
    proc = start(out, 1e-9, [sys.executable, "-c", WAITS, str(ready)], blipmon_cache)
    deadline = time.monotonic() + PATIENCE_S
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.02)
    os.kill(proc.pid, sig)  # blipmon forwards it to the command's group; the command dies; blipmon ends
    code, err = finish(proc)
    # The command died of the signal (Python re-raises an uncaught KeyboardInterrupt's SIGINT on exit).
    assert code == 128 + sig, err
    assert load_run(only_run(out)).summary()["exit"] == {"code": None, "signal": sig.name}
    assert any(f"{sig.name} forwarded" in n for n in load_run(only_run(out)).notes)


@pytest.mark.parametrize("hz", [1e9, float("inf")])
def test_a_huge_rate_is_capped_and_said(tmp_path: Path, blipmon_cache: Path, hz: float) -> None:
    proc = start(tmp_path, hz, [sys.executable, "-c", "import time; time.sleep(0.3)"], blipmon_cache)
    code, err = finish(proc)
    assert code == 0, err
    run_dir = only_run(tmp_path)
    evs = read_events(run_dir / "events.jsonl")
    assert next(e for e in evs if e["type"] == "watch")["sample_hz"] == 100.0
    assert json.loads((run_dir / "config.json").read_text())["runtime"]["sample_hz"] == 100.0  # finite JSON
    assert sum("sampling capped at 100 per second" in e.get("message", "") for e in evs) == 1
