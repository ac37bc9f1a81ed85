"""The parent side of a run: the run directory, the child process and its exit (preflight: ``runner/preflight.py``).

The child is started with an argument list (never a shell string) and writes its own profile; the
parent only appends the final ``exit`` record, which is what turns a SIGKILLed child into a
``killed`` run with everything before it kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from blipmon.core.config import ConfigError
from blipmon.core.layout import CONFIG, EVENTS, LOG, PROFILES
from blipmon.core.outcomes import EXIT_ERROR, EXIT_OK, EXIT_OOM, EXIT_STOPPED
from blipmon.core.profile import RESERVE, RESERVE_BYTES, is_disk_full, release_reserve, reserve_space, write_config

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def run_dir_name(cfg: dict[str, Any], now: datetime | None = None) -> str:
    """``<UTC timestamp>-<config name>``, with the name flattened so it can never leave the folder.

    A node of a several-machine job adds ``-node<R>``: every node writes its own run, and in a
    shared folder their names must never collide.
    """
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S")
    name = _SAFE.sub("-", str(cfg.get("name", "run"))).strip("-.") or "run"
    nodes = cfg.get("train", {}).get("num_nodes", 1) if isinstance(cfg.get("train"), dict) else 1
    suffix = f"-node{node_rank()}" if isinstance(nodes, int) and nodes > 1 else ""
    return f"{stamp}-{name[:80]}{suffix}"


def node_rank() -> int:
    """This machine's place in a several-machine job: ``NODE_RANK``, as Lightning and torchrun users set it."""
    try:
        return int(os.environ.get("NODE_RANK", "0"))
    except ValueError:
        return -1


def multi_node_env(cfg: dict[str, Any]) -> tuple[int, str, int]:
    """(node rank, master address, master port) for a several-machine job, or a ConfigError saying what to set."""
    nodes = cfg["train"]["num_nodes"]
    rank = node_rank()
    if not 0 <= rank < nodes:
        raise ConfigError(
            f"train.num_nodes = {nodes}: set NODE_RANK to this machine's place, 0 to {nodes - 1} "
            f"(got {os.environ.get('NODE_RANK')!r})"
        )
    addr = os.environ.get("MASTER_ADDR", "")
    if not addr:
        raise ConfigError(
            f"train.num_nodes = {nodes}: set MASTER_ADDR (and MASTER_PORT, default 29500) to node 0's address "
            "on every machine"
        )
    try:
        port = int(os.environ.get("MASTER_PORT", "29500"))
    except ValueError:
        raise ConfigError(f"MASTER_PORT = {os.environ.get('MASTER_PORT')!r}: expected a port number") from None
    return rank, addr, port


def make_run_dir(cfg: dict[str, Any], out: Path | None) -> Path:
    root = Path(out) if out is not None else PROFILES
    root.mkdir(parents=True, exist_ok=True)
    base = root / run_dir_name(cfg)
    path, n = base, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


class Launch:
    """One child process recording into ``run_dir``; usable headless (``wait``) or from the dashboard."""

    def __init__(self, cfg: dict[str, Any], out: Path | None = None) -> None:
        self.cfg = cfg
        self.proc: subprocess.Popen[bytes] | None = None
        # Until the child exists, a Ctrl-C removes the run directory (nothing ran) before it interrupts
        # the caller as usual: between here and ``start`` no half-made run can be left behind.
        self._guard = _PreStartGuard.install(self)
        # SIGINT waits while the directory is made: arriving after mkdir but before ``run_dir`` is set, the
        # guard could not know which directory to remove. Held here, it is handled right after, when it can.
        held = (
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            if threading.current_thread() is threading.main_thread()
            else None
        )
        try:
            self.run_dir = make_run_dir(cfg, out)
        finally:
            if held is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        try:
            write_config(self.run_dir, cfg)
            reserve_space(self.run_dir)
        except BaseException as e:
            # Nothing can run here (or the user interrupted): leave no half-made run behind.
            if self._guard is not None:
                self._guard.remove()
                self._guard = None
            _remove_run_dir(self.run_dir)
            if isinstance(e, OSError) and is_disk_full(e):
                raise OSError(
                    e.errno,
                    f"disk full ({e.strerror}): a run needs room for its configuration and "
                    f"{RESERVE_BYTES // 1024} KiB to record how it ends",
                    str(self.run_dir.parent),
                ) from None
            raise
        self.returncode: int | None = None
        self.started = time.time()
        self.interrupted = False  # a Ctrl-C reached this process while it started the child
        self.ended_oom = False  # a rank recorded an out-of-memory ending (torchrun's own code hides it)

    def command(self) -> list[str]:
        """The child's argument list: the child module itself, or torchrun starting one per rank."""
        child = ["-m", "blipmon.runner.child", str(self.run_dir)]
        t = self.cfg["train"]
        if self.cfg["job"]["kind"] != "train" or t["strategy"] != "ddp":
            return [sys.executable, *child]
        run = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={t['devices']}"]
        if t["num_nodes"] > 1:  # static rendezvous at node 0, as torchrun's own multi-node example
            rank, addr, port = multi_node_env(self.cfg)
            return [*run, f"--nnodes={t['num_nodes']}", f"--node-rank={rank}", f"--master-addr={addr}",
                    f"--master-port={port}", *child]  # fmt: skip
        if t["devices"] > 1:
            return [*run, "--standalone", "--nnodes=1", *child]
        return [sys.executable, *child]

    def start(self) -> None:
        env = dict(os.environ)
        env["BLIPMON_T0"] = repr(time.monotonic())
        alloc = self.cfg["runtime"]["alloc_conf"]
        if alloc:
            # Newer torch reads PYTORCH_ALLOC_CONF (and deprecates the other), older torch only the CUDA
            # name: both, so the setting is in effect whichever torch the child imports.
            env["PYTORCH_ALLOC_CONF"] = alloc
            env["PYTORCH_CUDA_ALLOC_CONF"] = alloc
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["PYTHONUNBUFFERED"] = "1"
        # A Ctrl-C while the child is being started is held here and acted on once it exists: the
        # child is asked to stop (and records it), and ``wait`` follows it to its exit code.
        caught: list[int] = []
        previous = _hold_sigint(caught)
        if self._guard is not None and previous is self._guard:
            previous = self._guard.previous  # what the caller had before this Launch existed
        self._guard = None
        log = open(self.run_dir / LOG, "ab")  # noqa: SIM115 - the child owns it from here
        try:
            cmd = self.command()
            single = len(cmd) <= 4
            if not single:  # several ranks: the header comes from here, before any rank appends
                self._write_header(env)
            # The child starts with SIGINT/SIGTERM blocked and unblocks them once its handlers are in
            # place (runner.child.main): a Ctrl-C during its start-up is delivered then, as a recorded
            # stop, instead of killing an interpreter that has not recorded anything. A blocked signal
            # is kept pending, never lost. torchrun keeps its own handling (it never unblocks).
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _CHILD_STOP_SIGNALS) if single else None
            try:
                self.proc = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            finally:
                if blocked is not None:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        finally:
            log.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if caught:
            self._interrupted_while_starting(previous)

    def _interrupted_while_starting(self, previous: Any) -> None:
        """A Ctrl-C came while the child was being started: stop it (it records the stop) as the caller would.

        With Python's default handler that is what ``wait`` does with a KeyboardInterrupt; a caller's
        own handler (the dashboard's supervisor) is called as if the signal had just arrived.
        """
        self.interrupted = True
        if previous is signal.default_int_handler or previous in (signal.SIG_DFL, None):
            self.stop()
        elif callable(previous):
            previous(signal.SIGINT, None)

    def _write_header(self, env: dict[str, str]) -> None:
        import socket

        import blipmon
        from blipmon.core.profile import FORMAT_VERSION, EventWriter

        writer = EventWriter(self.run_dir / EVENTS, t0=float(env["BLIPMON_T0"]))
        writer.write(
            "header",
            format_version=FORMAT_VERSION,
            name=str(self.cfg.get("name", self.run_dir.name)),
            pid=os.getpid(),
            hostname=socket.gethostname(),
            started=time.time(),
            source="blipmon run (torchrun)",
            blipmon=blipmon.__version__,
            world_size=self.cfg["train"]["devices"] * self.cfg["train"]["num_nodes"],
            num_nodes=self.cfg["train"]["num_nodes"],
            node_rank=node_rank(),
        )
        writer.close()

    def poll(self) -> int | None:
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is not None and self.returncode is None:
            self._finish(code)
        return code

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self) -> int:
        assert self.proc is not None
        while True:
            try:
                code = self.proc.wait()
                break
            except KeyboardInterrupt:
                # Ctrl-C reached us too: let the child record the stop, then keep waiting for it.
                self.stop()
        self._finish(code)
        return self.exit_code()

    def _finish(self, code: int) -> None:
        """The child has ended: make its profile a readable run that says how, then free the reserve.

        A child that died before it wrote its header (interrupted while starting, or broken) gets one
        from here, so ``show`` reads the run; a disk that filled before the child could say so gets
        an ``error`` record that does.
        """
        if self.returncode is not None:
            return
        self.returncode = code
        full_before = _disk_nearly_full(self.run_dir)
        release_reserve(self.run_dir)
        pid = self.proc.pid if self.proc is not None else None
        ensure_header(self.run_dir, name=str(self.cfg.get("name", self.run_dir.name)), pid=pid, started=self.started)
        ends = end_statuses(self.run_dir) if code != 0 else []
        if code != 0 and not ends and full_before:
            append_record(self.run_dir, {"type": "error", "t": None, "message": DISK_FULL_MESSAGE,
                                         "reason": "disk_full", "source": "launcher"})  # fmt: skip
        self.ended_oom = "oom" in ends
        append_exit(self.run_dir, code)

    def exit_code(self) -> int:
        """``blipmon run``'s exit code: 0 ok, 1 error, 3 oom, 4 stopped or killed.

        torchrun exits 1 whichever way a rank failed; a rank that ran out of memory recorded an ``end``
        with status ``oom``, and that makes the run's code 3, as for a single process.
        """
        code = self.returncode
        if code is None or code < 0:
            return EXIT_STOPPED
        if code not in (EXIT_OK, EXIT_OOM, EXIT_STOPPED) and self.ended_oom:
            return EXIT_OOM
        return code if code in (EXIT_OK, EXIT_ERROR, EXIT_OOM, EXIT_STOPPED) else EXIT_ERROR


_CHILD_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class _PreStartGuard:
    """SIGINT between a Launch's creation and its child's start: remove the run directory, then interrupt.

    Installed only over Python's default handler (the command line, a sweep), whose KeyboardInterrupt
    it then raises as before; ``start`` puts the default handler back once the child exists.
    """

    def __init__(self, launch: Launch, previous: Any) -> None:
        self.launch = launch
        self.previous = previous

    @classmethod
    def install(cls, launch: Launch) -> _PreStartGuard | None:
        if threading.current_thread() is not threading.main_thread():
            return None
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return None
        guard = cls(launch, signal.default_int_handler)
        signal.signal(signal.SIGINT, guard)
        return guard

    def remove(self) -> None:
        if signal.getsignal(signal.SIGINT) is self:
            signal.signal(signal.SIGINT, self.previous)

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.remove()
        run_dir = getattr(self.launch, "run_dir", None)
        if self.launch.proc is None and run_dir is not None:
            _remove_run_dir(run_dir)
        self.previous(signum, frame)


def _hold_sigint(caught: list[int]) -> Any:
    """Replace SIGINT's handler by one that only notes the signal; returns the previous one (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))


DISK_FULL_MESSAGE = "disk full: the run stopped because its folder's disk had no space left (No space left on device)"


def _remove_run_dir(run_dir: Path) -> None:
    """Remove a run directory that never started (its few files, then the folder); best effort."""
    for name in (CONFIG, CONFIG + ".tmp", RESERVE, EVENTS, LOG):
        with contextlib.suppress(OSError):
            (run_dir / name).unlink()
    with contextlib.suppress(OSError):
        run_dir.rmdir()


def _disk_nearly_full(run_dir: Path) -> bool:
    """Less room left on the run's disk than one reserve: what a run that ended on a full disk leaves."""
    try:
        st = os.statvfs(run_dir)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < RESERVE_BYTES


def ensure_header(run_dir: Path, *, name: str, pid: int | None, started: float) -> bool:
    """Put a header first in ``events.jsonl`` when the child never wrote one; True when one was added.

    A child stopped or broken before its first record leaves an empty stream (or one with no header
    before the parent's records), which readers refuse. The file is rewritten whole (temporary file,
    then rename) so a reader never sees half of it; on failure nothing changes and nothing is left.
    """
    import socket

    import blipmon
    from blipmon.core.profile import FORMAT_VERSION

    path = run_dir / EVENTS
    try:
        with open(path, "rb") as fh:
            first = fh.readline()
    except FileNotFoundError:
        first = b""
    except OSError:
        return False
    if first.strip():
        try:
            rec = json.loads(first)
        except ValueError:
            rec = None
        if isinstance(rec, dict) and rec.get("type") == "header":
            return False
    header = {"type": "header", "t": 0.0, "format_version": FORMAT_VERSION, "name": name, "pid": pid,
              "hostname": socket.gethostname(), "started": started, "source": "blipmon run",
              "blipmon": blipmon.__version__, "written_by": "launcher"}  # fmt: skip
    tmp = run_dir / (EVENTS + ".tmp")
    try:
        with open(tmp, "wb") as out:
            out.write((json.dumps(header, separators=(",", ":")) + "\n").encode())
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as src:
                shutil.copyfileobj(src, out)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    return True


def end_statuses(run_dir: Path) -> list[str]:
    """The statuses of every ``end`` record in the run (one per rank), read line by line, never all at once."""
    out: list[str] = []
    try:
        with open(run_dir / EVENTS, "rb") as fh:
            for line in fh:
                if b'"end"' not in line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("type") == "end" and isinstance(rec.get("status"), str):
                    out.append(rec["status"])
    except OSError:
        pass
    return out


def append_exit(run_dir: Path, returncode: int) -> None:
    rec: dict[str, Any] = {"type": "exit", "t": None, "code": None, "signal": None, "wall": time.time()}
    if returncode < 0:
        try:
            rec["signal"] = signal.Signals(-returncode).name
        except ValueError:
            rec["signal"] = f"SIG{-returncode}"
    else:
        rec["code"] = returncode
    append_record(run_dir, rec, what="the exit")


def append_record(run_dir: Path, rec: dict[str, Any], *, what: str = "how the run ended") -> bool:
    """Append one record from the parent, on a line of its own; says so (never raises) when it cannot."""
    path = run_dir / EVENTS
    try:
        # A child killed mid-line leaves a partial record: end it so ours is a line of its own.
        needs_newline = path.exists() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(("\n" if needs_newline else "") + json.dumps(rec, separators=(",", ":")) + "\n")
    except OSError as e:
        lead = "disk full: " if is_disk_full(e) else ""
        print(f"blipmon: {lead}could not record {what} of {run_dir}: {e.strerror or e}", file=sys.stderr)
        return False
    return True


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


STOP_SIGNALS_FROM_OUTSIDE = (signal.SIGTERM, signal.SIGHUP)  # a scheduler's kill, `timeout`, a closed ssh session


@contextlib.contextmanager
def signals_handled(signals: tuple[int, ...], handler: Any) -> Iterator[None]:
    """``handler`` for ``signals`` while the block runs, the previous handlers after; nothing off the main thread
    (Python only delivers signals there, and ``signal.signal`` refuses elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stop_signals_forwarded_to(launch: Launch) -> contextlib.AbstractContextManager[None]:
    """While ``blipmon run`` waits, SIGTERM or SIGHUP to it stops the child, which records the stop.

    Without this a ``kill`` of the headless parent (a scheduler, ``timeout``, a closed ssh session)
    killed only the parent and left the child training, unrecorded and holding the GPU.
    """
    return signals_handled(STOP_SIGNALS_FROM_OUTSIDE, lambda _signum, _frame: launch.stop(signal.SIGTERM))


__all__ = ["Launch", "append_exit", "make_run_dir", "run_dir_name", "signals_handled", "stop_signals_forwarded_to"]
