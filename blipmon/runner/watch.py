"""The recorder behind ``blipmon watch -- CMD``: any command's process tree, recorded without touching its code.

Why a separate recorder rather than the child runner: the command is not ours, so nothing can be
measured from inside it (no phases, no allocator). What can be seen from outside is host RSS per
process (psutil) and GPU memory per process and per device (NVML); that is what seed 002's reader
watched in ``nvtop`` by hand, and it works for any script, framework or language.

The profile has the same layout and events as a ``blipmon run``: header, config, environment, one
``sample`` per tick (the tree's total RSS in ``rss``, the devices' used memory summed in ``dev``, the
tree's own GPU memory in ``proc_gpu``), notes, then ``end`` and ``exit``. Alongside, blipmon-watch's
own records: ``watch`` (the command), ``proc`` (a process first seen: pid, ppid, name) and ``tree``
(per tick: RSS per pid, GPU bytes per pid, used bytes per device). So ``show``, ``compare``, ``replay`` and
``attach`` read it unchanged; its summary simply has ``phases: []`` and ``load: null``.

Signals: in an interactive terminal the command stays in blipmon's process group, so Ctrl-C,
Ctrl-\\ and Ctrl-Z reach it exactly as if blipmon were not there (and a command that reads the
terminal keeps working). Anywhere else (a script, CI, ``nohup``) the command gets a process group of
its own and blipmon forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to that whole group, once. In both
cases blipmon itself keeps recording until the command has exited, then exits with its exit code
(``128 + N`` when it died of signal N, as shells report it).

One module although it is long: ``Watch`` is one sampling loop over one process tree, its signal forwarding and
its records; NVML's device list is ``runner/nvml.py``'s, the environment record ``runner/environment.py``'s.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from blipmon.core.config import SCHEMA
from blipmon.core.errors import UsageError
from blipmon.core.layout import EVENTS, PROFILES
from blipmon.core.outcomes import EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND
from blipmon.core.profile import FORMAT_VERSION, EventWriter, write_config
from blipmon.runner.environment import gpu_fields, watch_environment
from blipmon.runner.launch import append_exit, make_run_dir
from blipmon.runner.nvml import GpuDevices, in_own_pid_namespace
from blipmon.runner.sampler import BUSY_FACTOR, sample_period

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# Signals a terminal sends to its whole foreground process group: the command already has them.
_FROM_TERMINAL = {signal.SIGINT, signal.SIGQUIT, signal.SIGHUP}
# Exit codes by which programs say "I was interrupted" (128 + SIGHUP / SIGINT / SIGTERM).
_STOP_CODES = {128 + signal.SIGHUP, 128 + signal.SIGINT, 128 + signal.SIGTERM}
_PR_SET_CHILD_SUBREAPER = 36
# Longest single wait of the loop (the command's exit ends any wait at once); fallback poll without pidfd.
_MAX_WAIT_S = 1.0
_POLL_S = 0.1


# -- the process tree ------------------------------------------------------------------------------
def _become_subreaper() -> bool:
    """Adopt orphaned descendants (a daemonised worker, ``cmd &`` in a shell script) so they stay in the tree."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _foreground_terminal() -> bool:
    """True when blipmon runs in the terminal's foreground process group (a person is at the keyboard)."""
    try:
        fd = sys.stdin.fileno()
        return os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _status(returncode: int) -> str:
    """The run's status for ``end``; a death by signal is refined by the ``exit`` record (killed/stopped)."""
    if returncode == 0:
        return "ok"
    if returncode < 0:
        if -returncode == signal.SIGKILL:  # nothing can catch it: the OOM killer or `kill -9`
            return "killed"
        return "stopped" if -returncode in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) else "error"
    return "stopped" if returncode in _STOP_CODES else "error"


def run_name(cmd: list[str]) -> str:
    """``watch/<program>``, or ``watch/<script>`` for ``python script.py`` / ``python -m module``."""
    prog = Path(cmd[0]).name
    label = prog
    if prog.startswith("python") and len(cmd) > 1:
        rest = cmd[1:]
        if rest[0] == "-m" and len(rest) > 1:
            label = rest[1]
        elif not rest[0].startswith("-"):
            label = Path(rest[0]).name
    safe = "".join(c if c.isalnum() or c in "_.-" else "-" for c in label).strip("-.") or "command"
    return f"watch/{safe[:100]}"


class Watch:
    """Starts the command, samples its tree at ``hz`` until it exits, and writes the profile.

    The command's GPUs are the devices where NVML lists one of its processes (kept for the rest of the
    run once seen), so ``dev`` sums those only, never other users' GPUs. Inside a container (a PID
    namespace of its own) NVML lists host PIDs that never match: the command's GPUs are then those
    ``CUDA_VISIBLE_DEVICES`` names, or every device the container sees, its own GPU memory is unknown,
    and a note says so. ``gpu_module`` and ``own_pid_namespace`` are seams for tests.
    """

    def __init__(
        self,
        cmd: list[str],
        run_dir: Path,
        hz: float,
        config: dict[str, Any],
        *,
        gpu_module: Any = None,
        own_pid_namespace: bool | None = None,
    ) -> None:
        self.cmd = cmd
        self.run_dir = run_dir
        self.hz = hz
        self.period = sample_period(hz)
        self.config = config
        self.writer = EventWriter(run_dir / EVENTS)
        self.proc: subprocess.Popen[bytes] | None = None
        self.own_group = True
        self.returncode: int | None = None
        self._started = False
        self._early_notes: list[tuple[str, str]] = []
        self._noted: set[str] = set()
        self.gpus = GpuDevices(gpu_module, note=self._note_once)
        self._me = psutil.Process()
        self._known: set[tuple[int, float]] = set()
        self._pending_notes: list[str] = []  # filled by signal handlers, written by the loop (no lock re-entry)
        self.peak_rss = 0
        self.peak_gpu: int | None = None  # the tree's own GPU memory (None: never known)
        self.peak_dev: int | None = None  # used memory of the command's GPUs
        self.max_procs = 0
        self._write_failure_told = False
        self._pidfd: int | None = None
        self.own_ns = in_own_pid_namespace() if own_pid_namespace is None else own_pid_namespace
        # Indices into gpus.units: where NVML listed the command's processes (host), or what it may use (container).
        self.command_gpus: set[int] = set()
        if self.gpus and self.own_ns:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # what the command inherits
            self.command_gpus = set(range(len(self.gpus.units))) if visible is None else self.gpus.named_by(visible)
        self._told_gpus: set[int] = set(self.command_gpus)
        self._own_unknown = False  # some tick could not tell the tree's own GPU memory

    # -- events ---------------------------------------------------------------------------------
    def _note_once(self, key: str, message: str) -> None:
        if key in self._noted:
            return
        self._noted.add(key)
        if self._started:
            self.writer.write("note", message=message)
        else:  # before the header: kept until the profile has one
            self._early_notes.append((key, message))

    def _start_record(self) -> None:
        import blipmon

        emit = self.writer.write
        emit(
            "header",
            format_version=FORMAT_VERSION,
            name=self.config["name"],
            pid=os.getpid(),
            hostname=socket.gethostname(),
            started=time.time(),
            source="blipmon watch",
            blipmon=blipmon.__version__,
        )
        emit("config", config=self.config)
        emit("environment", **watch_environment(self.gpus, self.command_gpus))
        emit("watch", command=self.cmd, sample_hz=1.0 / self.period)
        self._started = True
        for _key, message in self._early_notes:
            emit("note", message=message)
        if not self.gpus:
            emit("note", message=f"{self.gpus.reason or 'no NVIDIA GPU'}: no GPU memory is recorded, host RSS only")
        elif self.own_ns:
            labels = ", ".join(self.gpus.units[i].label for i in sorted(self.command_gpus))
            which = (
                f"device used sums the GPUs it can use ({labels}; other processes on them included)"
                if labels
                else "CUDA_VISIBLE_DEVICES leaves it no GPU, so no device used is recorded"
            )
            emit(
                "note",
                message="blipmon runs in a PID namespace of its own (a container), where NVML lists host PIDs: "
                f"the command's processes cannot be matched to a GPU, so {which}, and its own GPU memory is unknown",
            )
        if not self.hz > 0 or self.period > 1.0 / self.hz:  # inf, 1e9: capped, said once
            emit("note", message=f"sampling capped at {1.0 / self.period:g} per second (asked for {self.hz:g})")

    # -- signals --------------------------------------------------------------------------------
    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        proc = self.proc
        if proc is None or self.returncode is not None:
            return
        name = signal.Signals(signum).name
        if not self.own_group and signum in _FROM_TERMINAL:
            # Same foreground group: the terminal delivered it to the command as well.
            self._pending_notes.append(f"{name}: delivered by the terminal to the command")
            return
        try:
            if self.own_group:
                os.killpg(proc.pid, signum)
            else:
                os.kill(proc.pid, signum)
            self._pending_notes.append(f"{name} forwarded to the command")
        except ProcessLookupError:
            pass

    def _install_handlers(self) -> dict[int, Any]:
        previous = {}
        for sig in _FORWARDED:
            try:
                previous[sig] = signal.signal(sig, self._forward)
            except (ValueError, OSError):  # not the main thread, or not allowed here
                pass
        return previous

    # -- sampling -------------------------------------------------------------------------------
    def _tree(self) -> list[psutil.Process]:
        try:
            children = self._me.children(recursive=True)
        except psutil.Error:
            return []
        for p in children:
            try:
                key = (p.pid, p.create_time())  # psutil caches it: cheap, and tells a reused pid apart
                if key not in self._known:
                    self._known.add(key)
                    self.writer.write("proc", pid=p.pid, ppid=p.ppid(), name=p.name())
            except psutil.Error:
                continue
        return children

    def sample(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """One tick: the flat ``sample`` record (totals) and the ``tree`` record (per process, per device).

        Two records rather than one nested one: ``sample`` lines stay plain numbers, which is what
        lets a reader load a million of them in a second; the per-process detail rides alongside.
        A figure NVML could not give is absent (unknown), never 0.
        """
        procs: dict[str, int] = {}
        total = 0
        for p in self._tree():
            try:
                rss = int(p.memory_info().rss)
            except psutil.Error:  # exited between listing and reading
                continue
            procs[str(p.pid)] = rss
            total += rss
        flat: dict[str, Any] = {"rss": total, "nproc": len(procs)}
        tree: dict[str, Any] = {"rss": procs}
        if self.gpus:
            self._sample_gpus({int(pid) for pid in procs}, flat, tree)
        self.peak_rss = max(self.peak_rss, total)
        self.max_procs = max(self.max_procs, len(procs))
        return flat, tree

    def _sample_gpus(self, pids: set[int], flat: dict[str, Any], tree: dict[str, Any]) -> None:
        used = self.gpus.used()
        lists = self.gpus.processes()
        per_pid: dict[int, int] = {}
        own_known = not self.own_ns  # in a container NVML's PIDs are host PIDs: never ours
        for i, plist in enumerate(lists):
            if plist is None:  # refused (noted once by the guard): membership and memory unknown there
                own_known = False
                continue
            mine = [p for p in plist if p.pid in pids]
            if mine:
                self.command_gpus.add(i)
            for p in mine:
                if p.used is None:
                    own_known = False
                    self._note_once(
                        "nvml-withheld",
                        f"NVML lists the command's processes on {self.gpus.units[i].label} but withholds their "
                        "memory (usedGpuMemory not available: MIG, WSL or some containers); their GPU memory is unknown",
                    )
                else:
                    per_pid[p.pid] = per_pid.get(p.pid, 0) + p.used
        tree["devs"] = used
        if per_pid:
            tree["gpu"] = {str(pid): b for pid, b in per_pid.items()}
        if own_known:
            flat["proc_gpu"] = sum(per_pid.values())
            self.peak_gpu = max(self.peak_gpu or 0, flat["proc_gpu"])
        else:
            self._own_unknown = True
        mine_gpus = sorted(self.command_gpus)
        if mine_gpus:
            tree["gpus"] = {
                self.gpus.units[i].label: {"used": used[i], "total": self.gpus.units[i].total} for i in mine_gpus
            }
            figures = [used[i] for i in mine_gpus]
            if all(u is not None for u in figures):
                flat["dev"] = sum(u for u in figures if u is not None)
                self.peak_dev = max(self.peak_dev or 0, flat["dev"])
        if self.command_gpus - self._told_gpus:
            # The command reached another GPU: the environment names the GPUs device-used is measured on.
            self._told_gpus = set(self.command_gpus)
            self.writer.write("environment", **watch_environment(self.gpus, self.command_gpus))

    def _reap(self) -> int | None:
        """Collect every exited child (adopted orphans too); the command's own status when it is among them."""
        assert self.proc is not None
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return self.returncode
            if pid == 0:
                return self.returncode
            if pid == self.proc.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                self.proc.returncode = self.returncode

    def _wait_for_command(self, timeout: float) -> None:
        """Wait up to ``timeout`` s, returning as soon as the command exits.

        The wait is on the command (a pidfd), never a plain sleep of one sample period: with
        ``--sample-hz 1e-9`` that sleep would outlive the command by 30 years, deaf to signals (Python
        resumes an interrupted sleep). Each wait is also cut to :data:`_MAX_WAIT_S` so notes from signal
        handlers are written while the command runs.
        """
        timeout = max(0.0, min(timeout, _MAX_WAIT_S))
        if self._pidfd is not None:
            try:
                select.select([self._pidfd], [], [], timeout)
                return
            except (OSError, ValueError):
                self._pidfd = None
        time.sleep(min(timeout, _POLL_S))

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> int:
        self._start_record()
        _become_subreaper()
        self.own_group = not _foreground_terminal()
        previous = self._install_handlers()
        try:
            try:
                self.proc = subprocess.Popen(self.cmd, process_group=0 if self.own_group else None)
            except OSError as e:
                code = EXIT_NOT_FOUND if isinstance(e, FileNotFoundError) else EXIT_NOT_EXECUTABLE
                self.writer.write("error", message=f"cannot start {self.cmd[0]}: {e}")
                self.writer.write("end", status="error", code=code)
                self.writer.close()
                append_exit(self.run_dir, code)
                print(f"blipmon: cannot start {self.cmd[0]}: {e.strerror or e}", file=sys.stderr)
                return code
            self._pidfd = _open_pidfd(self.proc.pid)
            print(f"blipmon: watching pid {self.proc.pid}, recording into {self.run_dir}", file=sys.stderr)
            self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
            self.gpus.close()
        assert self.returncode is not None
        for note in self._pending_notes:
            self.writer.write("note", message=note)
        self._final_notes()
        self.writer.write("end", status=_status(self.returncode), code=_exit_code(self.returncode))
        self.writer.close()
        append_exit(self.run_dir, self.returncode)
        self._report()
        return _exit_code(self.returncode)

    def _loop(self) -> None:
        next_tick = time.monotonic()
        while self._reap() is None:
            now = time.monotonic()
            if now < next_tick:
                self._wait_for_command(next_tick - now)
                self._flush_signal_notes()
                continue
            try:
                flat, tree = self.sample()
                t = self.writer.now()
                self.writer.write("sample", t=t, **flat)
                self.writer.write("tree", t=t, **tree)
            except Exception as e:  # a sample must never be what stops the recording
                self._note_once(type(e).__name__, f"sampler: {type(e).__name__}: {e}")
            self._flush_signal_notes()
            if self.writer.failed is not None and not self._write_failure_told:
                self._write_failure_told = True
                print(
                    f"blipmon: cannot write the profile any more ({self.writer.failed}); the command goes on, "
                    "what was recorded so far is kept",
                    file=sys.stderr,
                )
            # The next tick: one period on, but never sooner than BUSY_FACTOR x what this sample cost,
            # and never a burst to catch up after falling behind.
            done = time.monotonic()
            next_tick = max(next_tick + self.period, done + BUSY_FACTOR * (done - now))

    def _flush_signal_notes(self) -> None:
        while self._pending_notes:
            self.writer.write("note", message=self._pending_notes.pop(0))

    def _final_notes(self) -> None:
        """Say, once, why a GPU figure is missing from a run on a machine with GPUs."""
        if not self.gpus or self.own_ns:  # the container case was said at the start
            return
        if not self.command_gpus and self._own_unknown:
            self._note_once(
                "nvml-unmatched",
                "the command's processes were not found in NVML's process lists (a refused query, see the notes "
                "above): its GPUs and its GPU memory are unknown",
            )

    def _report(self) -> None:
        from blipmon.core.units import fmt_bytes

        assert self.returncode is not None
        how = (
            f"died of {signal.Signals(-self.returncode).name}"
            if self.returncode < 0
            else f"exited with code {self.returncode}"
        )
        gpu = ""
        if self.gpus:
            if self.peak_gpu is not None and not self._own_unknown:
                gpu = f", peak GPU {fmt_bytes(self.peak_gpu)}"
            else:
                gpu = ", GPU memory of its processes unknown (see the run's notes)"
            if self.command_gpus and self.peak_dev is not None:
                units = [self.gpus.units[i] for i in sorted(self.command_gpus)]
                cap = gpu_fields(self.gpus, sorted(self.command_gpus))["gpu_total_bytes"]
                gpu += (
                    f"; device used peaked at {fmt_bytes(self.peak_dev)}"
                    + (f" of {fmt_bytes(cap)}" if cap else "")
                    + f" on {', '.join(u.label for u in units)}"
                )
        print(
            f"blipmon: the command {how}; peak host RSS {fmt_bytes(self.peak_rss)} "
            f"(up to {self.max_procs} process{'es' if self.max_procs != 1 else ''}){gpu}; see `blipmon show {self.run_dir}`",
            file=sys.stderr,
        )


def _open_pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when ``pid`` exits (Linux 5.3+), or None where there is none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def record(args: argparse.Namespace) -> int:
    """Record ``args.cmd`` into a new run directory at ``args.sample_hz`` (any positive rate: a huge one is
    capped, see ``sample_period``); returns the command's exit code. ``blipmon watch`` checks the rate's range
    before it calls this."""
    cmd = _command(getattr(args, "cmd", None) or [])
    if not cmd:
        raise UsageError("watch needs a command: blipmon watch [--out DIR] -- CMD [ARGS...]")
    if _resolve_executable(cmd[0]) is None:
        print(f"blipmon: {cmd[0]}: command not found", file=sys.stderr)
        return EXIT_NOT_FOUND
    hz_arg = getattr(args, "sample_hz", None)
    hz = float(hz_arg) if hz_arg is not None else float(SCHEMA["runtime.sample_hz"].default)
    if not hz > 0:
        raise UsageError(f"--sample-hz {hz_arg}: expected a number > 0")
    name = run_name(cmd)
    # The rate actually used: an infinite or huge one is capped (config.json must stay finite JSON).
    period = sample_period(hz)
    config = {
        "name": name,
        "description": "blipmon watch: " + " ".join(cmd)[:300],
        "runtime": {"sample_hz": hz if period == 1.0 / hz else 1.0 / period},
    }
    out = getattr(args, "out", None)
    try:
        run_dir = make_run_dir(config, out)
        write_config(run_dir, config)
    except OSError as e:
        where = out if out is not None else PROFILES
        raise UsageError(f"--out {where}: cannot create the run directory there ({e.strerror or e})") from None
    return Watch(cmd, run_dir, hz, config).run()


def _command(raw: Iterable[str]) -> list[str]:
    cmd = list(raw)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return cmd


def _resolve_executable(prog: str) -> str | None:
    if os.sep in prog or (os.altsep and os.altsep in prog):
        return prog if os.path.exists(prog) else None
    return shutil.which(prog)


__all__ = ["Watch", "record", "run_name"]
