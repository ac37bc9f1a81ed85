"""``blipmon watch [--out DIR] -- CMD...``: record any command's process tree without touching its code.

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
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from blipmon.core.config import SCHEMA
from blipmon.core.profile import EVENTS, FORMAT_VERSION, EventWriter, write_config
from blipmon.runner.launch import append_exit, make_run_dir

EXIT_NOT_FOUND, EXIT_NOT_EXECUTABLE = 127, 126
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# Signals a terminal sends to its whole foreground process group: the command already has them.
_FROM_TERMINAL = {signal.SIGINT, signal.SIGQUIT, signal.SIGHUP}
# Exit codes by which programs say "I was interrupted" (128 + SIGHUP / SIGINT / SIGTERM).
_STOP_CODES = {128 + signal.SIGHUP, 128 + signal.SIGINT, 128 + signal.SIGTERM}
_PR_SET_CHILD_SUBREAPER = 36


class UsageError(Exception):
    """Raised for bad arguments; the CLI prints it as one line (exit 2)."""


def _usage_error(message: str) -> Exception:
    # The CLI's own UsageError is what cli.main() turns into "blipmon: ..." + exit 2; fall back to
    # ours only if the CLI is not importable (it always is in an installed package).
    try:
        from blipmon.cli import UsageError as CliUsageError

        return CliUsageError(message)
    except ImportError:  # pragma: no cover
        return UsageError(message)


# -- NVML ------------------------------------------------------------------------------------------
class GpuDevices:
    """All NVIDIA devices NVML sees, or none with the reason (no driver, no library, no device)."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.names: list[str] = []
        self.totals: list[int] = []
        self.reason: str | None = None
        self._nvml: Any = None
        self.per_process_missing = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                self.handles.append(h)
                self.names.append(name.decode() if isinstance(name, bytes) else str(name))
                self.totals.append(int(pynvml.nvmlDeviceGetMemoryInfo(h).total))
            if not self.handles:
                self.reason = "NVML reports no NVIDIA device"
        except Exception as e:  # every machine without an NVIDIA driver ends here: one note, not an error
            self.reason = f"NVML unavailable ({type(e).__name__}: {e})".strip()
            self.handles = []

    def __bool__(self) -> bool:
        return bool(self.handles)

    def used(self) -> list[int]:
        return [int(self._nvml.nvmlDeviceGetMemoryInfo(h).used) for h in self.handles]

    def process_bytes(self, pids: set[int]) -> dict[int, int]:
        """GPU bytes per process of ``pids``, summed over devices (compute and graphics contexts)."""
        nv = self._nvml
        out: dict[int, int] = {}
        for h in self.handles:
            seen: set[int] = set()
            for getter in (nv.nvmlDeviceGetComputeRunningProcesses, nv.nvmlDeviceGetGraphicsRunningProcesses):
                try:
                    procs = getter(h)
                except Exception:
                    continue
                for p in procs:
                    if p.pid not in pids or p.pid in seen:
                        continue
                    seen.add(p.pid)
                    used = p.usedGpuMemory
                    if used is None:  # some drivers (containers, WSL, MIG) do not say
                        self.per_process_missing = True
                        continue
                    out[p.pid] = out.get(p.pid, 0) + int(used)
        return out

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass


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


def environment(gpus: GpuDevices) -> dict[str, Any]:
    """The fixed environment fields, from outside the command: no torch import, never an environment variable."""
    import platform

    import blipmon

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return ""

    env: dict[str, Any] = {
        "device": "cuda" if gpus else "cpu",
        "gpu_name": gpus.names[0] if gpus else None,
        "gpu_total_bytes": gpus.totals[0] if gpus else None,
        "host_total_bytes": psutil.virtual_memory().total,
        "torch": version("torch"),
        "transformers": version("transformers"),
        "world_size": 1,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "blipmon": blipmon.__version__,
        "cpu_count": os.cpu_count(),
        "gpus": [
            {"index": i, "name": n, "total_bytes": t}
            for i, (n, t) in enumerate(zip(gpus.names, gpus.totals, strict=True))
        ],
    }
    if not gpus:
        env["gpu_reason"] = gpus.reason or "no NVIDIA GPU"
    return env


class Watch:
    """Starts the command, samples its tree at ``hz`` until it exits, and writes the profile."""

    def __init__(self, cmd: list[str], run_dir: Path, hz: float, config: dict[str, Any]) -> None:
        self.cmd = cmd
        self.run_dir = run_dir
        self.period = 1.0 / hz
        self.config = config
        self.writer = EventWriter(run_dir / EVENTS)
        self.proc: subprocess.Popen[bytes] | None = None
        self.own_group = True
        self.returncode: int | None = None
        self.gpus = GpuDevices()
        self._me = psutil.Process()
        self._known: set[tuple[int, float]] = set()
        self._pending_notes: list[str] = []  # filled by signal handlers, written by the loop (no lock re-entry)
        self._noted: set[str] = set()
        self.peak_rss = 0
        self.peak_gpu: int | None = None
        self.max_procs = 0
        self._write_failure_told = False

    # -- events ---------------------------------------------------------------------------------
    def _note_once(self, key: str, message: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            self.writer.write("note", message=message)

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
        emit("environment", **environment(self.gpus))
        emit("watch", command=self.cmd, sample_hz=1.0 / self.period)
        if not self.gpus:
            emit("note", message=f"{self.gpus.reason or 'no NVIDIA GPU'}: no GPU memory is recorded, host RSS only")

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
            used = self.gpus.used()
            per_proc = self.gpus.process_bytes({int(pid) for pid in procs})
            flat["dev"] = sum(used)
            flat["proc_gpu"] = sum(per_proc.values())
            tree["devs"] = used
            tree["gpu"] = {str(pid): b for pid, b in per_proc.items()}
            self.peak_gpu = max(self.peak_gpu or 0, flat["proc_gpu"])
            if self.gpus.per_process_missing:
                self._note_once(
                    "nvml-procs", "this driver does not report per-process GPU memory (containers, WSL, MIG)"
                )
        self.peak_rss = max(self.peak_rss, total)
        self.max_procs = max(self.max_procs, len(procs))
        return flat, tree

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
            print(f"blipmon: watching pid {self.proc.pid}, recording into {self.run_dir}", file=sys.stderr)
            self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.gpus.close()
        assert self.returncode is not None
        for note in self._pending_notes:
            self.writer.write("note", message=note)
        self.writer.write("end", status=_status(self.returncode), code=_exit_code(self.returncode))
        self.writer.close()
        append_exit(self.run_dir, self.returncode)
        self._report()
        return _exit_code(self.returncode)

    def _loop(self) -> None:
        next_tick = time.monotonic()
        while self._reap() is None:
            try:
                flat, tree = self.sample()
                t = self.writer.now()
                self.writer.write("sample", t=t, **flat)
                self.writer.write("tree", t=t, **tree)
            except Exception as e:  # a sample must never be what stops the recording
                self._note_once(type(e).__name__, f"sampler: {type(e).__name__}: {e}")
            while self._pending_notes:
                self.writer.write("note", message=self._pending_notes.pop(0))
            if self.writer.failed is not None and not self._write_failure_told:
                self._write_failure_told = True
                print(
                    f"blipmon: cannot write the profile any more ({self.writer.failed}); the command goes on, "
                    "what was recorded so far is kept",
                    file=sys.stderr,
                )
            next_tick += self.period
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:  # fell behind (a slow /proc scan): skip ahead rather than burst
                next_tick = time.monotonic()

    def _report(self) -> None:
        from blipmon.core.units import fmt_bytes

        assert self.returncode is not None
        how = (
            f"died of {signal.Signals(-self.returncode).name}"
            if self.returncode < 0
            else f"exited with code {self.returncode}"
        )
        gpu = f", peak GPU {fmt_bytes(self.peak_gpu)}" if self.peak_gpu is not None else ""
        print(
            f"blipmon: the command {how}; peak host RSS {fmt_bytes(self.peak_rss)} "
            f"(up to {self.max_procs} process{'es' if self.max_procs != 1 else ''}){gpu}; see `blipmon show {self.run_dir}`",
            file=sys.stderr,
        )


def _command(raw: Iterable[str]) -> list[str]:
    cmd = list(raw)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return cmd


def _resolve_executable(prog: str) -> str | None:
    if os.sep in prog or (os.altsep and os.altsep in prog):
        return prog if os.path.exists(prog) else None
    return shutil.which(prog)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``blipmon watch``; returns the command's exit code."""
    cmd = _command(getattr(args, "cmd", None) or [])
    if not cmd:
        raise _usage_error("watch needs a command: blipmon watch [--out DIR] -- CMD [ARGS...]")
    if _resolve_executable(cmd[0]) is None:
        print(f"blipmon: {cmd[0]}: command not found", file=sys.stderr)
        return EXIT_NOT_FOUND
    hz_arg = getattr(args, "sample_hz", None)
    hz = float(hz_arg) if hz_arg is not None else float(SCHEMA["runtime.sample_hz"].default)
    if not hz > 0:
        raise _usage_error(f"--sample-hz {hz_arg}: expected a number > 0")
    name = run_name(cmd)
    config = {
        "name": name,
        "description": "blipmon watch: " + " ".join(cmd)[:300],
        "runtime": {"sample_hz": hz},
    }
    out = getattr(args, "out", None)
    try:
        run_dir = make_run_dir(config, out)
        write_config(run_dir, config)
    except OSError as e:
        where = out if out is not None else Path("profiles")
        raise _usage_error(f"--out {where}: cannot create the run directory there ({e.strerror or e})") from None
    return Watch(cmd, run_dir, hz, config).run()


__all__ = ["GpuDevices", "Watch", "environment", "main", "run_name"]
