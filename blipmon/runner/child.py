"""The child process: ``python -m blipmon.runner.child RUN_DIR`` runs one job and records it.

It writes its own profile, flushing every record, so the run survives the dashboard or the parent
going away. It ends every run it can with an ``end`` record (ok, oom, error, stopped) and the
matching exit code; only a SIGKILL leaves that to the parent.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_OOM, EXIT_STOPPED = 0, 1, 2, 3, 4


class StopRequested(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT; a BaseException so library code cannot swallow it."""


class ProfileWriteError(Exception):
    """The profile cannot be written (a full disk, a file-size limit, a removed directory)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise StopRequested(signal.Signals(signum).name)


def environment(cuda: bool, weights: str | None = None, device: int = 0) -> dict[str, Any]:
    """An allow-list of facts about the machine: never the environment variables themselves.

    The two allocator variables are the exception (``allocator_settings``): they are configuration
    (``runtime.alloc_conf``), and what the allocator actually ran with decides fragmentation.
    ``device`` is the process's own GPU (torch index), whose name and size are recorded.
    """
    import psutil
    import torch
    import transformers

    import blipmon

    env: dict[str, Any] = {
        "device": "cuda" if cuda else "cpu",
        "gpu_name": None,
        "gpu_total_bytes": None,
        "host_total_bytes": psutil.virtual_memory().total,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "blipmon": blipmon.__version__,
        "cpu_count": os.cpu_count(),
        "allocator_settings": allocator_settings(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        env["gpu_name"] = props.name
        env["gpu_total_bytes"] = int(props.total_memory)
        env["cuda"] = torch.version.cuda
    else:
        env["gpu_reason"] = "no NVIDIA GPU visible to torch (CPU build or no driver)"
    return env


ALLOC_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def allocator_settings() -> dict[str, str | None]:
    """The allocator settings this process runs with: both variables as it saw them, and torch's own view.

    Newer torch reads ``PYTORCH_ALLOC_CONF`` and deprecates ``PYTORCH_CUDA_ALLOC_CONF``; older torch
    reads only the latter. ``torch`` is the settings string torch parsed (``None`` where this torch
    cannot say), so a run records what was in effect, not only what was asked for.
    """
    import torch

    out: dict[str, str | None] = {name: os.environ.get(name) for name in ALLOC_ENV}
    try:
        out["torch"] = str(torch._C._accelerator_getAllocatorSettings())
    except Exception:  # an older torch, or a build without it
        out["torch"] = None
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m blipmon.runner.child RUN_DIR", file=sys.stderr)
        return EXIT_USAGE
    run_dir = Path(argv[0])
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    from blipmon.core.profile import ProfileError, read_config

    try:
        cfg_raw = read_config(run_dir)
    except ProfileError as e:
        print(f"blipmon child: {e}", file=sys.stderr)
        return EXIT_USAGE
    return record(cfg_raw, run_dir, source="blipmon run")


def record(cfg_raw: dict[str, Any], run_dir: Path, *, source: str = "blipmon run") -> int:
    """Run one job and record it into ``run_dir``; returns the exit code. Also usable in-process."""
    import blipmon
    from blipmon.core import config as config_mod
    from blipmon.core.profile import EVENTS, FORMAT_VERSION, EventWriter
    from blipmon.runner.distributed import Dist

    dist = Dist.from_env()
    writer = EventWriter(run_dir / EVENTS)
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
        emit("end", status="error", code=EXIT_ERROR, rank=dist.rank)
        writer.close()
        print(e, file=sys.stderr)
        return EXIT_ERROR
    if dist.writes_run:
        emit("config", config=cfg)
    return _run(cfg, writer, dist)


def _run(cfg: dict[str, Any], writer: Any, dist: Any) -> int:
    from blipmon.runner.train import Cursor

    emit = writer.write
    cursor = Cursor()
    sampler = None
    status, code = "ok", EXIT_OK
    try:
        import psutil
        import torch

        from blipmon.runner.models import load_model, placement, prepare_files
        from blipmon.runner.sampler import Sampler

        cuda = torch.cuda.is_available() and cfg["model"]["device_map"] != "cpu"
        prepare_files(cfg)  # before the process group: transformers saves on global rank 0 only
        dist.init(cuda)
        if dist.writes_run:
            emit("environment", **environment(cuda))
        sampler = Sampler(emit, cfg["runtime"]["sample_hz"], cuda=cuda, cuda_device=dist.local_rank, rank=dist.rank)
        sampler.start()
        # BLIPMON_PREDICT=0 turns the estimate off for a whole session (the test suite uses it).
        predict = cfg["runtime"]["predict"] and os.environ.get("BLIPMON_PREDICT", "1") != "0"
        if dist.writes_run and predict and cfg["job"]["kind"] == "train":
            from blipmon.estimate import predict_for_run

            print("[blipmon] estimating memory before loading (runtime.predict = false skips it) ...", flush=True)
            prediction = predict_for_run(cfg)  # never raises; None when no estimate can be made
            if prediction is not None:
                emit("prediction", **prediction)
        print(f"[blipmon] loading {cfg['model']['id']} ...", flush=True)
        loaded = load_model(cfg, cuda=cuda, cuda_index=dist.local_rank)
        place = placement(loaded.model)
        emit(
            "load" if dist.writes_run else "rank_load",
            rank=dist.rank,
            seconds=round(loaded.seconds, 6),
            params_bytes=sum(place.values()),
            placement=place,
            weights=loaded.weights,
            peak=torch.cuda.max_memory_allocated() if cuda else None,
            host_rss=psutil.Process().memory_info().rss,
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
    except ProfileWriteError as e:
        status, code = "error", EXIT_ERROR
        print(
            f"[blipmon] stopped: cannot write the profile any more ({e.cause}); everything recorded before is kept",
            file=sys.stderr,
            flush=True,
        )
    except StopRequested as e:
        status, code = "stopped", EXIT_STOPPED
        emit("note", message=f"stopped by {e}")
        print(f"[blipmon] stopped by {e}", flush=True)
    except BaseException as e:  # noqa: BLE001 - every ending must be recorded
        status, code = _record_failure(e, cursor, emit, dist.rank)
    finally:
        if sampler is not None:
            sampler.stop()
        dist.close()
    emit("end", status=status, code=code, rank=dist.rank)
    writer.close()
    return code


def _record_failure(e: BaseException, cursor: Any, emit: Any, rank: int = 0) -> tuple[str, int]:
    import torch

    from blipmon.core.units import requested_bytes_from_message

    message = f"{type(e).__name__}: {e}".strip()
    requested = requested_bytes_from_message(str(e))
    # The CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory:
    # you tried to allocate N bytes"): the size in the message is what marks it as an OOM.
    is_oom = (
        isinstance(e, (torch.OutOfMemoryError, MemoryError))
        or "out of memory" in str(e).lower()
        or requested is not None
    )
    if is_oom:
        state: dict[str, Any] = {}
        if torch.cuda.is_available():
            state = {
                "allocated": torch.cuda.memory_allocated(),
                "reserved": torch.cuda.memory_reserved(),
                "peak": torch.cuda.max_memory_allocated(),
            }
        emit(
            "oom",
            step=cursor.step,
            micro_step=cursor.micro_step,
            phase=cursor.phase,
            requested_bytes=requested,
            message=message[:2000],
            rank=rank,
            **state,
        )
        print(f"[blipmon] out of memory at step {cursor.step}, {cursor.phase}: {message[:300]}", flush=True)
        return "oom", EXIT_OOM
    if isinstance(e, KeyboardInterrupt):
        return "stopped", EXIT_STOPPED
    tb = "".join(traceback.format_exception(e))
    emit("error", message=message[:2000], traceback=tb[-8000:], phase=cursor.phase, step=cursor.step, rank=rank)
    print(tb, file=sys.stderr, flush=True)
    return "error", EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
