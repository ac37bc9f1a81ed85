"""Latency as a person feels it: from the command to the first frame, and to the first recorded step.

Each case starts a fresh ``blipmon`` process exactly as a user would, in a real pseudo-terminal
(``pty.fork``, ``TERM=xterm-256color``, a fixed size set on the terminal before the command starts),
and reads its output until the first full frame is on screen: every marker of the view's first
frame (for a run view: the mode tag of the run header, the phase panel's title and the timeline's
legend) found in the output with its escape sequences removed. The markers are all drawn in the
same refresh, so finding them all is the frame, not a part of it.

- ``replay`` / ``attach``: ``blipmon replay RUN`` / ``blipmon attach RUN`` of a finished
  1,000,000-sample profile, built by ``benchmarks/replay_open.py``'s ``write_profile`` (the same file
  its timings use);
- ``run --live``: ``blipmon run tiny/blip2-opt --live`` (the tiny demo), in a temp folder;
- ``launcher``: ``blipmon`` with no arguments, in a temp folder holding a ``profiles/`` folder;
- ``first step``: headless ``blipmon run tiny/blip2-opt``, from the command to the first ``step``
  record in its ``events.jsonl`` (polled every 10 ms).

The two runs are given ``train.max_steps=2`` so they end by themselves; the benchmark waits for each
run's ``end`` record before the next case, so no run competes with the next measurement. Medians over
``--runs`` runs (default 3), printed as a table.

    python benchmarks/latency.py [--runs 3] [--samples 1000000] [--size 120x40] [--only replay attach ...]
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import re
import select
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replay_open import write_profile  # noqa: E402 - the profile its timings use, built the same way

# CSI (colours, cursor moves, modes), OSC (titles, terminated by BEL or ST), and two-byte escapes.
_ESCAPES = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]|\x1b[()][0-9A-B]")
RUN_VIEW = ("phases", "memory")  # the phase panel's title and the timeline's legend
MODE_TAG = {"replay": "[replay]", "attach": "[attached]", "live": "[live]"}
LAUNCHER = ("configurations", "then r to run")  # the launcher's two panels: its list and its settings


def screen_text(raw: bytes) -> str:
    """What a terminal's output says, with every escape sequence removed (text of one cell run stays whole)."""
    return _ESCAPES.sub(b"", raw).decode("utf-8", "replace")


def frame_shown(raw: bytes, markers: Sequence[str]) -> bool:
    """Whether every marker of a view's first frame is in the output so far."""
    text = screen_text(raw)
    return all(m in text for m in markers)


def blipmon_argv() -> list[str]:
    """The ``blipmon`` a user types: the console script beside this interpreter, else ``python -m blipmon``."""
    script = Path(sys.executable).parent / "blipmon"
    return [str(script)] if script.exists() else [sys.executable, "-m", "blipmon"]


@dataclass
class PtyResult:
    seconds: float | None  # None: the frame never came within the timeout
    pid: int
    fd: int
    output: bytes


def time_to_frame(
    argv: Sequence[str], markers: Sequence[str], *, cwd: Path, size: tuple[int, int], timeout: float = 120.0
) -> PtyResult:
    """Seconds from starting ``argv`` in a fresh pty of ``size`` (cols, rows) to all ``markers`` on screen.

    The terminal's size is set in the child before the command starts, so the first frame is
    already drawn at that size. The process is left running: the caller ends it (``end_pty``).
    """
    cols, rows = size
    t0 = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:  # the command, in a real terminal
        try:
            fcntl_winsz(0, cols, rows)
            os.chdir(cwd)
            env = dict(os.environ, TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows))
            os.execvpe(argv[0], list(argv), env)
        finally:
            os._exit(127)
    out = bytearray()
    deadline = t0 + timeout
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return PtyResult(None, pid, fd, bytes(out))
        r, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not r:
            continue
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError:
            chunk = b""
        if not chunk:  # the command ended before drawing the frame
            return PtyResult(None, pid, fd, bytes(out))
        out += chunk
        if frame_shown(bytes(out), markers):
            return PtyResult(time.perf_counter() - t0, pid, fd, bytes(out))


def fcntl_winsz(fd: int, cols: int, rows: int) -> None:
    """Set a terminal's size (what ``stty cols rows`` does)."""
    import fcntl

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def end_pty(res: PtyResult) -> None:
    """End a dashboard this benchmark started (its pid only) and reap it."""
    try:
        os.kill(res.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            if select.select([res.fd], [], [], 0.1)[0] and not os.read(res.fd, 1 << 16):
                break
        except OSError:
            break
        done, _ = os.waitpid(res.pid, os.WNOHANG)
        if done:
            break
    else:
        try:
            os.kill(res.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.waitpid(res.pid, 0)
    except ChildProcessError:
        pass
    os.close(res.fd)


def events_of(root: Path) -> list[Path]:
    """Every run's ``events.jsonl`` under a folder (a run directory's name is the runner's to choose)."""
    return sorted(root.rglob("events.jsonl"))


def has_record(events: Path, kind: str) -> bool:
    """Whether a profile holds a record of ``kind`` yet (a cheap text search; a partial last line never counts)."""
    try:
        data = events.read_bytes()
    except OSError:
        return False
    needle = f'"type": "{kind}"'.encode(), f'"type":"{kind}"'.encode()
    for line in data.split(b"\n")[:-1]:
        if needle[0] in line or needle[1] in line:
            try:
                if json.loads(line).get("type") == kind:
                    return True
            except ValueError:
                continue
    return False


def wait_for(cond: Callable[[], bool], timeout: float, every: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return cond()


def wait_run_ended(root: Path, timeout: float = 300.0) -> None:
    """Wait until every run under ``root`` has written ``end`` (the demo takes 2 steps and ends)."""
    wait_for(lambda: bool(events_of(root)) and all(has_record(e, "end") for e in events_of(root)), timeout, 0.2)


RUN_ARGS = ("run", "tiny/blip2-opt", "--set", "train.max_steps=2")


def case_view(mode: str, run_dir: Path, size: tuple[int, int]) -> float | None:
    res = time_to_frame([*blipmon_argv(), mode, str(run_dir)], (MODE_TAG[mode], *RUN_VIEW), cwd=run_dir, size=size)
    end_pty(res)
    return res.seconds


def case_live(size: tuple[int, int]) -> float | None:
    with tempfile.TemporaryDirectory(prefix="blipmon-latency-") as d:
        res = time_to_frame([*blipmon_argv(), *RUN_ARGS, "--live"], (MODE_TAG["live"], *RUN_VIEW), cwd=Path(d),
                            size=size)  # fmt: skip
        end_pty(res)  # leaving the view never stops the run: it ends after its two steps
        wait_run_ended(Path(d))
    return res.seconds


def case_launcher(size: tuple[int, int]) -> float | None:
    with tempfile.TemporaryDirectory(prefix="blipmon-latency-") as d:
        (Path(d) / "profiles").mkdir()
        res = time_to_frame(blipmon_argv(), LAUNCHER, cwd=Path(d), size=size)
        end_pty(res)
    return res.seconds


def case_first_step() -> float | None:
    with tempfile.TemporaryDirectory(prefix="blipmon-latency-") as d:
        t0 = time.perf_counter()
        proc = subprocess.Popen(  # noqa: S603 - our own command, an argument list
            [*blipmon_argv(), *RUN_ARGS], cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        found = wait_for(lambda: any(has_record(e, "step") for e in events_of(Path(d))), 300.0)
        seconds = time.perf_counter() - t0 if found else None
        proc.wait(timeout=300)
    return seconds


CASES = ("replay", "attach", "live", "launcher", "first-step")
LABELS = {
    "replay": "blipmon replay RUN (1M samples)",
    "attach": "blipmon attach RUN (1M samples, finished)",
    "live": "blipmon run tiny/blip2-opt --live",
    "launcher": "blipmon (launcher)",
    "first-step": "blipmon run tiny/blip2-opt: first step",
}


def table(results: dict[str, list[float | None]]) -> str:
    """The medians as a table; a case whose frame never came says so instead of a figure."""
    lines = [f"{'command':<44}{'median s':>10}  runs"]
    for name, vals in results.items():
        got = [v for v in vals if v is not None]
        med = f"{statistics.median(got):>10.3f}" if got else f"{'-':>10}"
        runs = " ".join("-" if v is None else f"{v:.3f}" for v in vals)
        lines.append(f"{LABELS[name]:<44}{med}  {runs}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "blipmon-bench-replay")
    ap.add_argument("--size", default="120x40")
    ap.add_argument("--only", nargs="+", choices=CASES, default=list(CASES))
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs: at least 1")
    try:
        cols, rows = (int(x) for x in args.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size {args.size!r}: COLSxROWS, e.g. 120x40")
    size = (cols, rows)
    run_dir = None
    if {"replay", "attach"} & set(args.only):
        run_dir = write_profile(args.dir, args.samples)
        print(f"profile: {run_dir} ({args.samples:,} samples)")
    results: dict[str, list[float | None]] = {name: [] for name in CASES if name in args.only}
    for _ in range(args.runs):
        for name in results:
            if name in ("replay", "attach"):
                assert run_dir is not None
                results[name].append(case_view(name, run_dir, size))
            elif name == "live":
                results[name].append(case_live(size))
            elif name == "launcher":
                results[name].append(case_launcher(size))
            else:
                results[name].append(case_first_step())
    print(f"terminal {cols}x{rows}, {args.runs} run(s) each, load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cores")  # fmt: skip
    print(table(results))
    return 0 if all(v is not None for vals in results.values() for v in vals) else 1


if __name__ == "__main__":
    sys.exit(main())
