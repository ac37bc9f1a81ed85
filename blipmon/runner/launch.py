"""The parent side of a run: preflight checks, the run directory, the child process and its exit.

The child is started with an argument list (never a shell string) and writes its own profile; the
parent only appends the final ``exit`` record, which is what turns a SIGKILLed child into a
``killed`` run with everything before it kept.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from blipmon.core.config import ConfigError
from blipmon.core.profile import CONFIG, EVENTS, LOG, write_config

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
    """bfloat16 on a GPU that has none (before Ampere) fails deep inside the first step: refuse it here."""
    wants = cfg["train"]["precision"].startswith("bf16") if cfg["job"]["kind"] == "train" else False
    wants = wants or cfg["model"]["dtype"] == "bfloat16"
    if not wants or cfg["model"]["device_map"] == "cpu":
        return
    if cuda is None and bf16 is None:
        if not cuda_available():
            return  # bfloat16 runs on the CPU
        import torch

        bf16 = bool(torch.cuda.is_bf16_supported())
    elif cuda is False:
        return
    if bf16 is False:
        raise ConfigError(
            f"train.precision = {cfg['train']['precision']!r} / model.dtype = {cfg['model']['dtype']!r}: this GPU "
            "has no bfloat16 support; use '16-mixed' (fp16 with a gradient scaler) or '32-true'"
        )


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
        self.run_dir = make_run_dir(cfg, out)
        write_config(self.run_dir, cfg)
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

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
            env["PYTORCH_CUDA_ALLOC_CONF"] = alloc
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["PYTHONUNBUFFERED"] = "1"
        log = open(self.run_dir / LOG, "ab")  # noqa: SIM115 - the child owns it from here
        try:
            cmd = self.command()
            if len(cmd) > 4:  # several ranks: the header comes from here, before any rank appends
                self._write_header(env)
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            log.close()

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
        if self.returncode is not None:
            return
        self.returncode = code
        append_exit(self.run_dir, code)

    def exit_code(self) -> int:
        """``blipmon run``'s exit code: 0 ok, 1 error, 3 oom, 4 stopped or killed."""
        code = self.returncode
        if code is None or code < 0:
            return 4
        return code if code in (0, 1, 3, 4) else 1


def append_exit(run_dir: Path, returncode: int) -> None:
    rec: dict[str, Any] = {"type": "exit", "t": None, "code": None, "signal": None, "wall": time.time()}
    if returncode < 0:
        try:
            rec["signal"] = signal.Signals(-returncode).name
        except ValueError:
            rec["signal"] = f"SIG{-returncode}"
    else:
        rec["code"] = returncode
    path = run_dir / EVENTS
    try:
        # A child killed mid-line leaves a partial record: end it so ours is a line of its own.
        needs_newline = path.exists() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(("\n" if needs_newline else "") + json.dumps(rec, separators=(",", ":")) + "\n")
    except OSError as e:
        print(f"blipmon: could not record the exit of {run_dir}: {e}", file=sys.stderr)


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


__all__ = ["CONFIG", "Launch", "append_exit", "make_run_dir", "preflight", "run_dir_name"]
