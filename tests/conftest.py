"""Shared test infrastructure: an isolated model cache, real ``blipmon run`` processes, loading runs.

Nothing here mocks blipmon. ``blipmon run`` is started exactly as a user starts it
(``python -m blipmon run CONFIG --set ...``, an argument list, never a shell string), its child
trains a real tiny model, and the tests read the profile it wrote.

- ``blipmon_cache`` (session, autouse): ``BLIPMON_CACHE`` points at a temporary folder for the whole
  session, so no test reads or writes the user's cache.
- ``tiny_models`` (session): the three tiny models, built once into that cache; every child then
  loads them back through ``from_pretrained`` like a hub checkpoint.
- ``tiny_facts`` (session): what the tiny models *should* weigh, computed independently in this
  process from the models themselves (parameter bytes and elements, tensor counts, buffers, and the
  state torch's own AdamW allocates after a real step).
- ``start_run`` (session): starts ``blipmon run`` in a subprocess into an empty folder of its own;
  returns a ``RunProcess`` to wait on, poll, signal or finish. Leftover processes are ended at the
  end of the session, each by its own id.
- ``run_cli``: any other ``blipmon`` command as a subprocess (``show``, ``compare``, usage errors).
- ``load_run``: ``blipmon.core.run.load_run``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from recorded import DATA, TINY_DDP, FrozenClock, ddp_gpu_events, gpu_events, write_run
from support import PATIENCE_S, adamw_state_after_one_step, adamw_step_counter_bytes, read_events, subprocess_env

from blipmon.core.run import RunData
from blipmon.core.run import load_run as _load_run

# Small enough that a child spends its time starting up, not training; tests pass their own
# ``--set`` values on top where the shape of the run matters.
FAST = ("train.num_train_samples=16", "train.max_epochs=1", "train.batch_size=4", "runtime.sample_hz=5")


@pytest.fixture(scope="session", autouse=True)
def blipmon_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("blipmon-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("BLIPMON_CACHE", str(path))
    mp.setenv("BLIPMON_PREDICT", "0")
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def tiny_models(blipmon_cache: Path) -> dict[str, Path]:
    from blipmon.runner.models import TINY_MODELS, ensure_tiny

    return {name: ensure_tiny(name) for name in TINY_MODELS}


@dataclass(frozen=True)
class TinyFacts:
    """What a tiny model weighs, counted in the test process from the model itself (never from blipmon's code)."""

    params_bytes: int  # sum of numel * element_size over model.parameters() (shared ones once), as saved: fp32
    param_numel: int  # elements of those parameters: ``param_numel * 2`` is the model in bf16
    param_tensors: int
    buffers_bytes: int  # registered buffers (position ids, ...): on the device with the parameters
    adamw_step_bytes: int  # bytes of the ``step`` counter torch's AdamW keeps per parameter tensor
    adamw_state_bytes: int  # unique storages of torch's AdamW state after one real step on this model

    def bytes_as(self, dtype_size: int) -> int:
        """The parameters cast to a dtype of ``dtype_size`` bytes (bf16-true casts every one of them)."""
        return self.param_numel * dtype_size


@pytest.fixture(scope="session")
def tiny_facts(tiny_models: dict[str, Path]) -> dict[str, TinyFacts]:
    from transformers import AutoConfig

    from blipmon.runner.models import model_class

    facts = {}
    for name, path in tiny_models.items():
        model = model_class(AutoConfig.from_pretrained(path)).from_pretrained(path)
        params = list(model.parameters())
        state_bytes = adamw_state_after_one_step(params)
        facts[name] = TinyFacts(
            params_bytes=sum(q.numel() * q.element_size() for q in params),
            param_numel=sum(q.numel() for q in params),
            param_tensors=len(params),
            buffers_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
            adamw_step_bytes=adamw_step_counter_bytes(),
            adamw_state_bytes=state_bytes,
        )
    return facts


# -- subprocesses -------------------------------------------------------------------------------


def has(kind: str, **fields: Any) -> Callable[[list[dict[str, Any]]], bool]:
    """A wait condition: some record of ``kind`` with these field values has been written."""

    def check(events: list[dict[str, Any]]) -> bool:
        return any(e.get("type") == kind and all(e.get(k) == v for k, v in fields.items()) for e in events)

    check.__name__ = f"has({kind!r}, {fields})"
    return check


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path | None

    def run(self) -> RunData:
        assert self.run_dir is not None, f"no run directory was created\nstderr:\n{self.stderr}"
        return _load_run(self.run_dir)


class RunProcess:
    """One ``blipmon run`` subprocess recording into ``root`` (its ``--out``, or ``cwd/profiles``)."""

    def __init__(
        self,
        config: str,
        sets: Sequence[str],
        *,
        root: Path,
        env: dict[str, str],
        use_out: bool = True,
        cwd: Path | None = None,
    ) -> None:
        cmd = [sys.executable, "-m", "blipmon", "run", config]
        for s in sets:
            cmd += ["--set", s]
        if use_out:
            cmd += ["--out", str(root)]
        self.cmd = cmd
        self.config = config
        self.sets = list(sets)
        self.root = root
        self._finished: Finished | None = None
        # Its own session: a signal the test sends to this process reaches it alone, never pytest.
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )

    # -- where it records -----------------------------------------------------------------------
    def find_run_dir(self) -> Path | None:
        if not self.root.is_dir():
            return None
        dirs = [p for p in self.root.iterdir() if (p / "config.json").is_file()]
        assert len(dirs) <= 1, f"expected one run directory in {self.root}, found {dirs}"
        return dirs[0] if dirs else None

    @property
    def events_path(self) -> Path:
        d = self.find_run_dir()
        assert d is not None, "the run directory does not exist yet"
        return d / "events.jsonl"

    def events(self) -> list[dict[str, Any]]:
        d = self.find_run_dir()
        return [] if d is None else read_events(d / "events.jsonl")

    def wait_for(
        self, condition: Callable[[list[dict[str, Any]]], bool], timeout: float = PATIENCE_S
    ) -> list[dict[str, Any]]:
        """Poll the profile until ``condition(events)`` holds; fail with the logs if the run ends first."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.events()
            if condition(events):
                return events
            if self.proc.poll() is not None:
                events = self.events()
                if condition(events):
                    return events
                pytest.fail(f"the run ended before {getattr(condition, '__name__', condition)}\n{self.describe()}")
            if time.monotonic() > deadline:
                pytest.fail(f"gave up waiting for {getattr(condition, '__name__', condition)}\n{self.describe()}")
            time.sleep(0.02)

    def wait_for_record(self, kind: str, timeout: float = PATIENCE_S, **fields: Any) -> list[dict[str, Any]]:
        """Poll until a record of ``kind`` (with these field values) has been written; all records so far."""
        return self.wait_for(has(kind, **fields), timeout)

    def child_pid(self) -> int:
        header = self.wait_for_record("header")[0]
        assert header["type"] == "header"
        return int(header["pid"])

    def wait_child_exited(self, timeout: float = PATIENCE_S) -> None:
        """Wait until the child process has exited (also when it is no longer this run's child)."""
        pid = self.child_pid()
        deadline = time.monotonic() + timeout
        while not pid_gone(pid):
            if time.monotonic() > deadline:
                pytest.fail(f"the child {pid} did not exit\n{self.describe()}")
            time.sleep(0.05)

    def finish(self, timeout: float = PATIENCE_S) -> Finished:
        if self._finished is None:
            try:
                out, err = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                out, err = self.proc.communicate()
                pytest.fail(f"blipmon run did not finish\n{self.describe()}\n{err}")
            self._finished = Finished(self.proc.returncode, out, err, self.find_run_dir())
        return self._finished

    # -- diagnostics and cleanup ----------------------------------------------------------------
    def describe(self) -> str:
        d = self.find_run_dir()
        log = ""
        if d is not None and (d / "child.log").is_file():
            log = (d / "child.log").read_text(errors="replace")[-4000:]
        kinds = [e.get("type") for e in self.events() if e.get("type") != "sample"]
        return f"command: {self.cmd}\nrecords: {kinds}\nchild.log (tail):\n{log}"

    def kill(self) -> None:
        """End what this run started, each process by its id: the child (from its header), then the parent."""
        d = self.find_run_dir()
        header = next(iter(read_events(d / "events.jsonl")), None) if d is not None else None
        if header and header.get("type") == "header" and isinstance(header.get("pid"), int):
            kill_if_blipmon_child(header["pid"])
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def kill_if_blipmon_child(pid: int) -> None:
    """SIGKILL ``pid`` if it is still a blipmon child process (never a recycled pid of something else)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if "blipmon.runner.child" in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
            os.kill(pid, signal.SIGKILL)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        pass


def pid_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for a reaper counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class RunStarter:
    def __init__(self, factory: pytest.TempPathFactory, cache: Path) -> None:
        self._factory = factory
        self.cache = cache
        self.started: list[RunProcess] = []

    def __call__(
        self,
        config: str,
        *sets: str,
        fast: bool = True,
        env: dict[str, str] | None = None,
        use_out: bool = True,
        cwd: Path | None = None,
        gpu: bool = False,
    ) -> RunProcess:
        """Start ``blipmon run CONFIG --set ...`` (after the ``FAST`` settings unless ``fast=False``)."""
        if use_out:
            root = self._factory.mktemp("runs") / "out"  # does not exist yet: blipmon creates it
        else:
            assert cwd is not None, "without --out, runs go to ./profiles: give a cwd"
            root = cwd / "profiles"
        full_env = subprocess_env(self.cache, gpu=gpu, **(env or {}))
        rp = RunProcess(config, [*(FAST if fast else ()), *sets], root=root, env=full_env, use_out=use_out, cwd=cwd)
        self.started.append(rp)
        return rp

    def cleanup(self) -> None:
        for rp in self.started:
            rp.kill()


@pytest.fixture(scope="session")
def start_run(
    tmp_path_factory: pytest.TempPathFactory, blipmon_cache: Path, tiny_models: dict[str, Path]
) -> Iterator[RunStarter]:
    starter = RunStarter(tmp_path_factory, blipmon_cache)
    yield starter
    starter.cleanup()


@pytest.fixture(scope="session")
def run_cli(blipmon_cache: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``blipmon ARGS...`` to completion in a subprocess and return its exit code and output."""

    def run(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120):
        return subprocess.run(
            [sys.executable, "-m", "blipmon", *map(str, args)],
            capture_output=True,
            text=True,
            env=subprocess_env(blipmon_cache, **(env or {})),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def load_run() -> Callable[[Path], RunData]:
    return _load_run


# -- recorded runs (tests/recorded.py), copied into each test's own folder --------------------------
@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def cpu_run(tmp_path: Path) -> Path:
    dst = tmp_path / "profiles" / "20261123T123615-tiny-blip2-opt"
    shutil.copytree(DATA / "tiny-cpu", dst)
    return dst


@pytest.fixture
def gpu_run(tmp_path: Path) -> Path:
    return write_run(tmp_path / "profiles" / "20261123T130000-h100-reduced-batch", gpu_events())


@pytest.fixture
def tiny_ddp(tmp_path: Path) -> Path:
    """A real 2-rank DDP run of ``tiny/blip2-opt`` recorded on a CPU (tests/data/tiny-ddp), copied."""
    dst = tmp_path / "profiles" / "20261123T150234-tiny-blip2-opt"
    shutil.copytree(TINY_DDP, dst)
    return dst


@pytest.fixture
def ddp_gpu(tmp_path: Path) -> Path:
    """A synthetic 2-rank GPU run whose ranks differ (see ``recorded.ddp_gpu_events``)."""
    return write_run(tmp_path / "profiles" / "20261123T160000-h100-ddp", ddp_gpu_events())
