"""The child process: ``python -m blipmon.runner.child RUN_DIR`` runs one job and records it.

It writes its own profile, flushing every record, so the run survives the dashboard or the parent
going away. It ends every run it can with an ``end`` record (ok, oom, error, stopped) and the
matching exit code; only a SIGKILL leaves that to the parent.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from blipmon.core.outcomes import EXIT_ERROR, EXIT_OK, EXIT_OOM, EXIT_STOPPED, EXIT_USAGE
from blipmon.runner.allocator import cuda_index
from blipmon.runner.environment import environment
from blipmon.runner.oom import observed_fields

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


class StopRequested(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT; a BaseException so library code cannot swallow it."""


class ProfileWriteError(Exception):
    """The profile cannot be written (a full disk, a file-size limit, a removed directory)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _StopGate:
    """Whether a stop signal may interrupt the job now (``armed``), and a stop that came while it could not.

    A signal raises ``StopRequested`` wherever the main thread happens to be. Before the job's
    ``try`` (interpreter start-up, imports, the header) that would end the child with a traceback and
    no record, and after the first stop a second Ctrl-C would break the recording of the first. So
    the handler raises only while armed, disarms itself when it does, and otherwise keeps the signal
    for the moment the job arms (which then raises it at once).
    """

    def __init__(self) -> None:
        self.armed = False
        self.pending: str | None = None

    def arm(self) -> None:
        if self.pending is not None:
            name, self.pending = self.pending, None
            raise StopRequested(name)
        self.armed = True

    def disarm(self) -> None:
        self.armed = False


_GATE = _StopGate()


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _GATE.armed:
        _GATE.armed = False  # one stop per run: what follows records it and must not be interrupted
        raise StopRequested(name)
    if _GATE.pending is None:
        _GATE.pending = name


class OomObserver:
    """The CUDA allocator's own figures for the allocation that failed, from torch's out-of-memory observer.

    torch's message prints the size it tried to allocate rounded to two decimals of its unit (±5 MiB
    at GiB scale); the allocator calls its observers with the exact byte count, the torch device
    index, the device's capacity (or the limit a memory fraction set) and what CUDA reported free.
    The callback runs inside the allocator with the GIL held and must never raise.
    """

    def __init__(self) -> None:
        self.last: dict[str, int] | None = None
        self.attached = False

    def __call__(self, device: int, alloc: int, device_limit: int, device_free: int) -> None:
        try:
            self.last = {
                "device": int(device),
                "requested_bytes": int(alloc),
                "device_limit": int(device_limit),
                "device_free": int(device_free),
            }
        except Exception:  # noqa: BLE001 - an exception here would replace the OOM itself
            pass

    def attach(self, torch_mod: Any) -> bool:
        """Register with the CUDA allocator once per process (it has no way to detach); False where it cannot."""
        if self.attached:
            return True
        attach = getattr(torch_mod._C, "_cuda_attach_out_of_memory_observer", None)
        if attach is None:  # a CPU build
            return False
        try:
            torch_mod.cuda.init()  # the allocator attaches observers to the devices it has initialised
            attach(self)
        except Exception:  # noqa: BLE001 - the message remains to read the size from
            return False
        self.attached = True
        return True

    def take(self) -> dict[str, int] | None:
        last, self.last = self.last, None
        return last


OOM_OBSERVER = OomObserver()


def expected_cuda_device(cfg: dict[str, Any], local_rank: int) -> int:
    """The torch index of this process's own GPU, known before the model loads.

    It is where ``runner.models.load_model`` puts the model: ``{"": local_rank}`` for ``"cuda"``,
    ``"cpu-first"``, quantized loads and (in a train job) ``"auto"``, and accelerate's "auto" fills
    the lowest visible GPU first. Under ``CUDA_VISIBLE_DEVICES`` torch numbers the visible GPUs from 0,
    so a single process is on torch index 0 and torchrun's rank ``r`` on index ``local_rank = r``.
    Only an explicit device map can name another GPU: its lowest CUDA index is the model's first.
    The sampler is started on this device before loading and moved if the model lands elsewhere.
    """
    dm = cfg["model"]["device_map"]
    if isinstance(dm, dict):
        named = [i for i in (cuda_index(v) for v in dm.values()) if i is not None]
        if named:
            return min(named)
    return local_rank


def _say(text: str, *, err: bool = False) -> None:
    """Print to child.log, which may sit on the disk that just filled: a failed print must not end the child."""
    try:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m blipmon.runner.child RUN_DIR", file=sys.stderr)
        return EXIT_USAGE
    run_dir = Path(argv[0])
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    # The launcher starts the child with both blocked, so a Ctrl-C during interpreter start-up waits
    # here instead of killing it before it has recorded anything; pending ones arrive now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    from blipmon.core.errors import ProfileError
    from blipmon.core.profile import read_config

    try:
        cfg_raw = read_config(run_dir)
    except ProfileError as e:
        print(f"blipmon child: {e}", file=sys.stderr)
        return EXIT_USAGE
    code = record(cfg_raw, run_dir, source="blipmon run")
    _ignore_stops_from_now_on()  # the child process only: record() also runs inside other processes (tests)
    return code


def record(cfg_raw: dict[str, Any], run_dir: Path, *, source: str = "blipmon run") -> int:
    """Run one job and record it into ``run_dir``; returns the exit code. Also usable in-process."""
    import blipmon
    from blipmon.core import config as config_mod
    from blipmon.core.layout import EVENTS
    from blipmon.core.profile import FORMAT_VERSION, EventWriter
    from blipmon.runner.distributed import Dist

    dist = Dist.from_env()
    writer = EventWriter(run_dir / EVENTS, reserve_dir=run_dir)
    emit = writer.write
    if not dist.multi:  # under torchrun the launcher wrote the header before any rank started
        emit(
            "header",
            format_version=FORMAT_VERSION,
            name=str(cfg_raw.get("name", run_dir.name)),
            pid=os.getpid(),
            hostname=socket.gethostname(),
            started=time.time(),
            source=source,
            blipmon=blipmon.__version__,
        )
    else:
        emit("rank_start", rank=dist.rank, local_rank=dist.local_rank, pid=os.getpid())
    try:
        cfg = config_mod.validate(cfg_raw)
    except config_mod.ConfigError as e:
        emit("error", message=str(e), rank=dist.rank)
        writer.write_final("end", status="error", code=EXIT_ERROR, rank=dist.rank)
        writer.close()
        _say(str(e), err=True)
        return EXIT_ERROR
    if dist.writes_run:
        emit("config", config=cfg)
    return _run(cfg, writer, dist)


def _ignore_stops_from_now_on() -> None:
    """The run is recorded (its ``end`` is written): a stop arriving now has nothing left to stop.

    Without this, a SIGTERM that ``blipmon run`` forwards on the same Ctrl-C (it got the SIGINT too) can
    land while the interpreter shuts down, after Python has put the default handlers back, and the
    child dies of it: the exit record then says SIGTERM instead of the exit 4 the child recorded. An
    ignored signal stays ignored through the interpreter's shutdown.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class _Gpus:
    """The GPUs this process records: its own (``device``, what the sampler reads) and every one the model
    occupies (``devices``, what load and OOM figures sum over); empty on the CPU."""

    def __init__(self) -> None:
        self.cuda = False
        self.device = 0
        self.devices: list[int] = []


def _run(cfg: dict[str, Any], writer: Any, dist: Any) -> int:
    from blipmon.runner.train import Cursor

    emit = writer.write
    cursor = Cursor()
    sampler = None
    predicting: threading.Thread | None = None
    gpus = _Gpus()
    status, code = "ok", EXIT_OK
    try:
        _GATE.arm()  # from here a stop signal ends the job as "stopped"; one that came earlier does so now
        import psutil
        import torch

        from blipmon.runner.models import load_model, placement, prepare_files

        cuda = torch.cuda.is_available() and cfg["model"]["device_map"] != "cpu"
        prepare_files(cfg)  # before the process group: transformers saves on global rank 0 only
        dist.init(cuda)
        if cuda:
            gpus.cuda, gpus.device = True, expected_cuda_device(cfg, dist.local_rank)
            gpus.devices = [gpus.device]
            OOM_OBSERVER.attach(torch)
        if dist.writes_run:
            emit("environment", **environment(cuda, device=gpus.device))
        sampler = _start_sampler(emit, cfg, cuda=cuda, device=gpus.device, rank=dist.rank)
        # BLIPMON_PREDICT=0 turns the estimate off for a whole session (the test suite uses it).
        predict = cfg["runtime"]["predict"] and os.environ.get("BLIPMON_PREDICT", "1") != "0"
        if dist.writes_run and predict and cfg["job"]["kind"] == "train":
            predicting = start_prediction(cfg, emit)
        print(f"[blipmon] loading {cfg['model']['id']} ...", flush=True)
        loaded = load_model(cfg, cuda=cuda, cuda_index=dist.local_rank)
        if cuda:
            sampler = _follow_model(loaded.model, gpus, sampler, emit, cfg, rank=dist.rank)
        place = placement(loaded.model)
        emit(
            "load" if dist.writes_run else "rank_load",
            rank=dist.rank,
            seconds=round(loaded.seconds, 6),
            params_bytes=sum(place.values()),
            placement=place,
            weights=loaded.weights,
            host_rss=psutil.Process().memory_info().rss,
            **load_memory(gpus.devices if cuda else []),
        )
        print(f"[blipmon] loaded in {loaded.seconds:.2f} s ({loaded.weights} weights)", flush=True)
        kind = cfg["job"]["kind"]
        if kind == "train":
            from blipmon.runner.train import run_train

            run_train(loaded, cfg, emit, cursor, cuda=cuda, dist=dist, should_stop=lambda: writer.failed is not None)
        elif kind == "generate":
            from blipmon.runner.generate import run_generate

            run_generate(loaded, cfg, emit, cursor, cuda=cuda)
        if writer.failed is not None:
            raise ProfileWriteError(writer.failed)
    except BaseException as e:  # noqa: BLE001 - every ending must be recorded
        _GATE.disarm()
        status, code = _ending(e, cursor, writer, dist.rank, gpus)
    finally:
        _GATE.disarm()
        if sampler is not None:
            sampler.stop()
        dist.close()
        finish_prediction(predicting)  # a run shorter than its estimate: the prediction still lands before `end`
    if dist.rank == 0 and writer.failed is None:
        _write_index(writer, Path(writer.path).parent)
    writer.write_final("end", status=status, code=code, rank=dist.rank)
    writer.close()
    return code


def _write_index(writer: Any, run_dir: Path) -> None:
    """The run's index, so ``show`` and ``compare`` need not parse every sample (docs/profile-format.md).

    Written once the job and the sampler are over, before ``end``: it summarises everything before it.
    Never fails a run: a profile without its index is still read in full, as before.
    """
    from blipmon.core.run import index_fields

    try:
        writer.write("index", **index_fields(run_dir))
    except Exception as e:  # noqa: BLE001 - an index is an optimisation; the run's outcome comes first
        _say(f"run index not written: {e}")


# How long the end of a run waits for a prediction still being made (the estimator takes 5-11 s for the seed
# lab's models on 2 cores): only a run shorter than its own estimate ever waits, and only at its end.
PREDICTION_WAIT_S = 120.0


def start_prediction(cfg: dict[str, Any], emit: Any, *, command: list[str] | None = None) -> threading.Thread:
    """Estimate the run's memory beside the loading: the prediction never delays the run.

    The estimate runs in a process of its own (``blipmon.estimate.predict``), followed by a thread here:
    building a model is not thread-safe (accelerate's and transformers' empty-weight contexts patch
    ``torch.nn.Module`` process-wide), so tracing the estimate's model in a thread while the real one loads
    could change either. The ``prediction`` record is written whenever it is ready; the dashboard shows it
    when it arrives. ``command`` replaces the estimator's command line in tests.
    """
    import json
    import subprocess
    import tempfile

    fd, path = tempfile.mkstemp(prefix="blipmon-predict-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    argv = command or [sys.executable, "-m", "blipmon.estimate.predict", path]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    def work() -> None:
        try:
            out, _ = proc.communicate()
            prediction = json.loads(out) if proc.returncode == 0 and out.strip() else None
        except (ValueError, OSError):
            prediction = None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if isinstance(prediction, dict):
            emit("prediction", **prediction)
            print("[blipmon] memory estimate recorded", flush=True)

    print("[blipmon] estimating memory beside the loading (runtime.predict = false skips it) ...", flush=True)
    thread = threading.Thread(target=work, name="blipmon-predict", daemon=True)
    thread.process = proc  # type: ignore[attr-defined]  # so the run's end can stop an estimate it outlived
    thread.start()
    return thread


def finish_prediction(thread: threading.Thread | None) -> None:
    """At the run's end: wait for a prediction still being made (up to ``PREDICTION_WAIT_S``), then stop it."""
    if thread is None:
        return
    thread.join(timeout=PREDICTION_WAIT_S)
    proc = getattr(thread, "process", None)
    if proc is not None and proc.poll() is None:
        proc.kill()
        thread.join(timeout=5)


def _start_sampler(emit: Any, cfg: dict[str, Any], *, cuda: bool, device: int, rank: int) -> Any:
    from blipmon.runner.sampler import Sampler

    sampler = Sampler(emit, cfg["runtime"]["sample_hz"], cuda=cuda, cuda_device=device, rank=rank)
    sampler.start()
    return sampler


def _follow_model(model: Any, gpus: _Gpus, sampler: Any, emit: Any, cfg: dict[str, Any], *, rank: int) -> Any:
    """Once loaded: the GPUs the model occupies; the sampler moves to the model's first GPU if it is not its own.

    Sampling ran through the load on the device the model was expected on (``expected_cuda_device``),
    so nothing of the load is missed; only a model that landed elsewhere moves it.
    """
    from blipmon.runner.allocator import model_cuda_devices

    gpus.devices = model_cuda_devices(model, default=gpus.device) or [gpus.device]
    first = gpus.devices[0]
    if first != gpus.device:
        gpus.device = first
        if sampler is not None:
            sampler.stop()
        sampler = _start_sampler(emit, cfg, cuda=True, device=first, rank=rank)
    if sampler is not None:
        # A model split over GPUs: the timeline sums every one of them (and records each), as the phases do.
        sampler.set_cuda_devices(gpus.devices)
    return sampler


def load_memory(devices: list[int], *, stats: Any = None) -> dict[str, Any]:
    """The load record's allocator figures: summed over every GPU the model occupies, each GPU's own kept.

    ``peak`` is the allocator's peak since the process started, i.e. the load's (nothing resets it
    before the first training boundary). ``None`` on the CPU, where there is no allocator to read.
    """
    if not devices:
        return {"peak": None}
    from blipmon.runner.allocator import read

    return read(devices, stats=stats).as_record()


def _ending(e: BaseException, cursor: Any, writer: Any, rank: int, gpus: _Gpus) -> tuple[str, int]:
    """Record how the job ended from the exception that ended it; returns (status, exit code)."""
    if isinstance(e, ProfileWriteError):
        message = profile_write_message(e.cause)
        writer.write_final("error", message=message, phase=cursor.phase, step=cursor.step, rank=rank,
                           reason=_reason(e.cause))  # fmt: skip
        _say(f"[blipmon] stopped: {message}", err=True)
        return "error", EXIT_ERROR
    if isinstance(e, StopRequested):
        writer.write("note", message=f"stopped by {e}")
        _say(f"[blipmon] stopped by {e}")
        return "stopped", EXIT_STOPPED
    # write_final: the record that says how the job ended is written even when the profile has failed
    # (it was a full disk that ended it), into the space the run's reserve held.
    return _record_failure(
        e, cursor, writer.write_final, rank, devices=gpus.devices if gpus.cuda else [], observer=OOM_OBSERVER
    )


def profile_write_message(cause: OSError) -> str:
    """Why the profile stopped growing, in the user's terms: a full disk (or quota) says "disk full"."""
    from blipmon.core.profile import is_disk_full

    lead = "disk full: " if is_disk_full(cause) else ""
    return f"{lead}cannot write the profile any more ({cause.strerror or cause}); everything recorded before is kept"


def _reason(cause: BaseException) -> str | None:
    from blipmon.core.profile import is_disk_full

    return "disk_full" if is_disk_full(cause) else None


_ALLOC_FAILED = re.compile(r"CU(?:BLAS|DNN)_STATUS_ALLOC_FAILED")
_GPU_IN_MESSAGE = re.compile(r"\bGPU (\d+) has a total capacity")


def _record_failure(
    e: BaseException,
    cursor: Any,
    emit: Any,
    rank: int = 0,
    *,
    devices: list[int] | tuple[int, ...] = (),
    observer: OomObserver | None = None,
    stats: Any = None,
) -> tuple[str, int]:
    """Record an exception that ended the job: an ``oom`` record (exit 3) for any out-of-memory, else ``error``.

    Out of memory: torch's ``OutOfMemoryError``, Python's ``MemoryError``, a message with a size to
    allocate (the CPU allocator raises a plain RuntimeError), and cuBLAS/cuDNN failing to allocate
    their workspaces (``CUBLAS_STATUS_ALLOC_FAILED``: the GPU ran out inside the library). The size
    is the allocator observer's exact figure when it fired for this error, else the message's.
    Allocator figures sum over ``devices`` (the model's GPUs), per GPU when there are several;
    ``stats`` replaces ``torch.cuda.memory_stats`` in tests.
    """
    import torch

    from blipmon.core.profile import is_disk_full
    from blipmon.core.units import requested_bytes_from_message

    text = str(e)
    message = f"{type(e).__name__}: {text}".strip()
    parsed = requested_bytes_from_message(text)
    allocator_oom = isinstance(e, torch.OutOfMemoryError)
    is_oom = (
        allocator_oom
        or isinstance(e, MemoryError)
        or "out of memory" in text.lower()
        or parsed is not None
        or _ALLOC_FAILED.search(text) is not None
    )
    observed = observer.take() if observer is not None else None
    if is_oom:
        rec = observed_fields(observed, parsed, allocator_oom)
        if "device" not in rec and (m := _GPU_IN_MESSAGE.search(text)) is not None:
            rec["device"] = f"cuda:{m.group(1)}"
        if devices:
            try:
                from blipmon.runner.allocator import read

                rec.update(read(list(devices), stats=stats).as_record())
            except Exception as err:  # noqa: BLE001 - the OOM itself must still be recorded
                rec["state_error"] = f"{type(err).__name__}: {err}"[:300]
        where = getattr(cursor, "where", None)
        if callable(where):  # which module ran, in which pass (the probe's module map, or e's traceback; issue 12)
            rec.update(where(e))
        emit(
            "oom",
            step=cursor.step,
            micro_step=cursor.micro_step,
            phase=cursor.phase,
            message=message[:2000],
            rank=rank,
            **rec,
        )
        _say(f"[blipmon] out of memory at step {cursor.step}, {cursor.phase}: {message[:300]}")
        return "oom", EXIT_OOM
    if isinstance(e, KeyboardInterrupt):
        return "stopped", EXIT_STOPPED
    tb = "".join(traceback.format_exception(e))
    fields: dict[str, Any] = {}
    if is_disk_full(e):
        message = f"disk full: {message}"
        fields["reason"] = "disk_full"
    emit("error", message=message[:2000], traceback=tb[-8000:], phase=cursor.phase, step=cursor.step, rank=rank,
         **fields)  # fmt: skip
    _say(tb, err=True)
    return "error", EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
