"""The parent side of a run: preflight checks, the run directory, the child process and its exit.

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
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from blipmon.core.config import ConfigError
from blipmon.core.profile import (
    CONFIG,
    EVENTS,
    LOG,
    RESERVE,
    RESERVE_BYTES,
    is_disk_full,
    release_reserve,
    reserve_space,
    write_config,
)
from blipmon.core.safe_text import one_line

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
    root = Path(out) if out is not None else Path("profiles")
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


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def needs_gpu(cfg: dict[str, Any]) -> str | None:
    """Why this configuration cannot run without a GPU, or None."""
    m = cfg["model"]
    dm = m["device_map"]
    if dm == "cuda":
        return "model.device_map = 'cuda'"
    if isinstance(dm, dict):
        gpu = [k for k, v in dm.items() if isinstance(v, int) or (isinstance(v, str) and v.startswith("cuda"))]
        if gpu:
            return f"model.device_map puts {', '.join(gpu)} on a GPU"
    return None


def preflight(cfg: dict[str, Any], *, cuda: bool | None = None, bf16: bool | None = None) -> None:
    """Everything that can be refused before a child starts and a model loads (exit 2)."""
    t = cfg["train"]
    is_train = cfg["job"]["kind"] == "train"
    unavailable: list[str] = []
    if is_train and (t["strategy"] == "deepspeed_stage_2_offload" or t["optim"] == "deepspeed_cpu"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                "train.strategy = 'deepspeed_stage_2_offload' needs DeepSpeed, which is not installed: "
                "pip install 'blipmon[deepspeed]'"
            )
        if t["devices"] > 1:
            unavailable.append(
                "DeepSpeed ZeRO-2 offload with train.devices > 1 (one rank offloads; use ddp for several)"
            )
    if t["num_nodes"] > 1:
        if cfg["job"]["kind"] != "train":
            unavailable.append(f"train.num_nodes = {t['num_nodes']} for a {cfg['job']['kind']} job")
        else:
            multi_node_env(cfg)
    if t["devices"] > 1 and cfg["job"]["kind"] != "train":
        unavailable.append(f"train.devices = {t['devices']} for a {cfg['job']['kind']} job (several ranks train only)")
    if unavailable:
        raise ConfigError(
            "not available in this version of blipmon yet: "
            + "; ".join(unavailable)
            + ". The preset validates and is listed so you can see it; run the others meanwhile."
        )
    reason = needs_gpu(cfg)
    if reason:
        has_cuda = cuda_available() if cuda is None else cuda
        if not has_cuda:
            raise ConfigError(
                f"this configuration needs an NVIDIA GPU ({reason}), and none is available here. "
                "To run it on the CPU instead: --set model.device_map=cpu"
            )
    _check_model_source(cfg)
    _check_bf16(cfg, cuda, bf16)
    if isinstance(cfg["model"]["device_map"], dict):
        _check_device_map_modules(cfg)
    if is_train and cfg["data"]["source"] != "synthetic":
        from blipmon.runner.data import read_metadata

        try:
            read_metadata(Path(cfg["data"]["source"]))
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _check_model_source(cfg: dict[str, Any]) -> None:
    from blipmon.core.presets import TINY_MODELS

    mid = cfg["model"]["id"]
    if mid in TINY_MODELS or mid.startswith("tiny/"):
        if mid not in TINY_MODELS:
            raise ConfigError(f"model.id = {mid!r}: no such tiny model; expected one of {', '.join(TINY_MODELS)}")
        return
    if Path(mid).exists():
        if not (Path(mid) / "config.json").is_file():
            raise ConfigError(f"model.id = {mid!r}: a local path without config.json")
        return
    # A hub id: transformers resolves it (from the cache, or the network where there is one).


def _check_bf16(cfg: dict[str, Any], cuda: bool | None, bf16: bool | None) -> None:
    """bfloat16 on a GPU that has none (before Ampere) fails deep inside the first step: refuse it here.

    The GPU's compute capability comes from NVML, never from ``torch.cuda``: ``is_bf16_supported()``
    now counts emulation (True on a T4 or V100), and any such call creates a CUDA context in this
    parent, on GPU 0, held for the whole run (and by the dashboard, which runs this preflight too).
    """
    wants = cfg["train"]["precision"].startswith("bf16") if cfg["job"]["kind"] == "train" else False
    wants = wants or cfg["model"]["dtype"] == "bfloat16"
    if not wants or cfg["model"]["device_map"] == "cpu":
        return
    detail = "this GPU has no bfloat16 support"
    if cuda is None and bf16 is None:
        if not cuda_available():
            return  # bfloat16 runs on the CPU
        check = bf16_capability(target_cuda_indices(cfg))
        if check.supported is not False:
            return  # supported, or NVML cannot say (the child then finds out on its own)
        bf16, detail = False, check.reason
    elif cuda is False:
        return
    if bf16 is False:
        raise ConfigError(
            f"train.precision = {cfg['train']['precision']!r} / model.dtype = {cfg['model']['dtype']!r}: {detail}; "
            "use '16-mixed' (fp16 with a gradient scaler) or '32-true'"
        )


BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bfloat16 arithmetic of their own


@dataclass(frozen=True)
class Bf16Check:
    """Whether the GPUs a run will use have bfloat16 (``None``: cannot tell), and why, in the user's terms."""

    supported: bool | None
    reason: str


def target_cuda_indices(cfg: dict[str, Any]) -> list[int] | None:
    """The torch CUDA indices a run will use (``None``: every visible GPU, as a load job's ``"auto"`` may).

    Mirrors ``runner.models.load_model``: one process loads onto its own device (torch index 0, or
    the local rank under torchrun; a train job's ``"auto"`` means that too), an explicit map onto the
    indices it names, a load or generate job's ``"auto"`` onto every visible GPU.
    """
    t = cfg["train"]
    if cfg["job"]["kind"] == "train" and t["strategy"] == "ddp" and t["devices"] > 1:
        return list(range(t["devices"]))
    dm = cfg["model"]["device_map"]
    if isinstance(dm, dict):
        found: set[int] = set()
        for where in dm.values():
            if isinstance(where, int) and not isinstance(where, bool):
                found.add(where)
            elif isinstance(where, str) and (where == "cuda" or where.startswith("cuda:")):
                found.add(int(where[5:]) if where[5:].isdigit() else 0)
        return sorted(found)
    if dm == "auto" and cfg["job"]["kind"] != "train":
        return None  # accelerate's "auto": every visible GPU, then the CPU
    return [0]  # "auto" in a train job is the process's own GPU, as "cuda" is


def bf16_capability(
    targets: list[int] | None, *, nvml: Any = None, environ: Mapping[str, str] | None = None
) -> Bf16Check:
    """Compute capability of the GPUs ``targets`` (torch indices) name, read from NVML without touching CUDA.

    NVML numbers GPUs in PCI bus order and ignores ``CUDA_VISIBLE_DEVICES``; torch index ``i`` is the
    ``i``-th entry of that variable (a number, a ``GPU-``/``MIG-`` UUID or a prefix of one), and a
    number is an NVML index only under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (CUDA's default order is
    "fastest first", which NVML cannot reproduce). A GPU whose identity is not known that way could be
    any of the host's others: the answer is still certain when they all agree, else it is ``None``
    and nothing is refused. ``nvml`` and ``environ`` replace ``pynvml`` and ``os.environ`` in tests.
    """
    env = os.environ if environ is None else environ
    try:
        if nvml is None:
            import pynvml as nvml  # type: ignore[no-redef]
        nvml.nvmlInit()
    except Exception as e:  # no driver, no library: say nothing rather than guess
        return Bf16Check(None, f"NVML unavailable ({type(e).__name__})")
    try:
        gpus: list[_Gpu] = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            gpus.append(_Gpu(i, _text(nvml.nvmlDeviceGetName(h)), _text(nvml.nvmlDeviceGetUUID(h)), h))
        visible = _visible_gpus(gpus, env, nvml)
        if visible is None:
            return Bf16Check(None, "CUDA_VISIBLE_DEVICES names a GPU NVML does not list")
        wanted = range(len(visible)) if targets is None else targets
        if any(t >= len(visible) for t in wanted):
            return Bf16Check(None, "the run names more GPUs than are visible")
        named = {id(g) for g in visible if g is not None}
        unknown = [g for g in gpus if id(g) not in named]  # what a position CUDA orders itself could be
        chosen: list[_Gpu] = []
        for t in wanted:
            chosen.extend([visible[t]] if visible[t] is not None else unknown)  # type: ignore[list-item]
        known = {id(g) for t in wanted if (g := visible[t]) is not None}
        caps = {id(g): tuple(nvml.nvmlDeviceGetCudaComputeCapability(g.handle)) for g in chosen}
    except Exception as e:  # one NVML error (a MIG parent without permission, a driver mismatch)
        return Bf16Check(None, f"NVML could not say ({type(e).__name__}: {e})")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down is best effort
            pass
    if not chosen:
        return Bf16Check(None, "no GPU visible")
    lacking = [g for g in chosen if caps[id(g)] < BF16_MIN_CAPABILITY]
    if not lacking:
        return Bf16Check(True, "every GPU the run uses has compute capability 8.0 or more")
    certain = [g for g in lacking if id(g) in known]
    if not certain and len(lacking) < len(chosen):
        return Bf16Check(None, "the GPUs CUDA may pick differ, and CUDA's order is not known without CUDA")
    g = (certain or lacking)[0]
    major, minor = caps[id(g)]
    where = f"NVML GPU {g.index}, " if g.index >= 0 else ""
    return Bf16Check(
        False,
        f"{one_line(g.name)} ({where}compute capability {major}.{minor}) has no bfloat16 support "
        f"(it needs {BF16_MIN_CAPABILITY[0]}.{BF16_MIN_CAPABILITY[1]}, Ampere or newer)",
    )


@dataclass(frozen=True, eq=False)
class _Gpu:
    index: int  # NVML's index (PCI bus order); -1 for a MIG instance named by its UUID
    name: str
    uuid: str
    handle: Any


def _visible_gpus(gpus: list[_Gpu], env: Mapping[str, str], nvml: Any) -> list[_Gpu | None] | None:
    """Torch's GPUs in torch's order: each one NVML identifies, or ``None`` where CUDA's own order decides.

    ``None`` as a whole when a UUID names no GPU (or several): then nothing is certain.
    """
    pci_order = env.get("CUDA_DEVICE_ORDER", "") == "PCI_BUS_ID"
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return list(gpus) if pci_order else [None] * len(gpus)
    out: list[_Gpu | None] = []
    for entry in (e.strip() for e in raw.split(",")):
        if entry.isdigit():
            if int(entry) >= len(gpus):
                break  # CUDA stops at the first entry that names no device
            out.append(gpus[int(entry)] if pci_order else None)
        elif entry.startswith("MIG-"):
            try:
                h = nvml.nvmlDeviceGetHandleByUUID(entry)
            except Exception:  # noqa: BLE001 - an unknown MIG instance: CUDA stops there too
                break
            out.append(_Gpu(-1, f"MIG instance {entry}", entry, h))
        elif entry.startswith("GPU-"):
            match = [g for g in gpus if g.uuid.startswith(entry)]
            if len(match) != 1:
                return None
            out.append(match[0])
        else:
            break
    return out


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _check_device_map_modules(cfg: dict[str, Any]) -> None:
    """Every module an explicit device map names must exist in the model (checked on the meta device)."""
    from blipmon.architectures.catalog import meta_model
    from blipmon.runner.models import architecture, resolve_source

    source, weights = resolve_source(cfg)
    try:
        arch = architecture(source, weights, bool(cfg["model"]["trust_remote_code"]))
    except Exception:  # the architecture is not available offline: transformers will say so at load time
        return
    model = meta_model(arch)
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    missing = [k for k in cfg["model"]["device_map"] if k not in names and k != ""]
    if missing:
        top = sorted({n.split(".")[0] for n in names if n})
        raise ConfigError(
            f"model.device_map names {', '.join(map(repr, missing))}, which {cfg['model']['id']} does not have; "
            f"its top-level modules are: {', '.join(top)}"
        )


class Launch:
    """One child process recording into ``run_dir``; usable headless (``wait``) or from the dashboard."""

    def __init__(self, cfg: dict[str, Any], out: Path | None = None) -> None:
        self.cfg = cfg
        self.proc: subprocess.Popen[bytes] | None = None
        # Until the child exists, a Ctrl-C removes the run directory (nothing ran) before it interrupts
        # the caller as usual: between here and ``start`` no half-made run can be left behind.
        self._guard = _PreStartGuard.install(self)
        self.run_dir = make_run_dir(cfg, out)
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
            return 4
        if code not in (0, 3, 4) and self.ended_oom:
            return 3
        return code if code in (0, 1, 3, 4) else 1


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


__all__ = ["CONFIG", "Launch", "append_exit", "make_run_dir", "preflight", "run_dir_name"]
