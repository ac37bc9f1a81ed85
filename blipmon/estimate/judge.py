"""``judge(cfg)``: the one home of every verdict ``blipmon estimate`` (and ``blipmon fit``) gives.

An estimate predicts bytes; a verdict needs a capacity for each device the run uses, and the rules for choosing
them lived in the command before: which device a ``device_map`` of ``auto``/``cpu-first`` means once
``--gpu-memory`` is given, a CPU run judged against ``--host-memory``, DeepSpeed's offloaded optimizer judged on the
host, and a preset named for a card (``h100/*``, ``a100/*``) judged against the lab's card when no GPU is here and
no ``--gpu-memory`` is given. ``fit`` asks the same question hundreds of times with one knob changed, so the rules
must have one home and the call must stay cheap: ``judge`` only calls ``timeline.estimate`` (whose model and
activation-profile caches make a repeated configuration cost milliseconds) and, for load and generate jobs,
``estimate.load`` (parameter bytes per module cached per model and dtype).

Every device the run uses gets a figure in ``devices`` (bytes, its predicted peak with the runtime it needs:
GPU overheads on a GPU, the interpreter on the host). A device is *judged* when a capacity is known for it: a GPU
always (``--gpu-memory`` per GPU, the local GPU's free memory, or the lab's card), the host when the run is a CPU
run (``--host-memory``, else the memory available now) or ``--host-memory`` is given. The verdict is ``oom`` when
any judged device is over; the *limiting* device is the judged one with the least headroom.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from blipmon.core.config import ConfigError

LOAD_KINDS = ("load", "generate")

# One estimate at a time in a process. Building a model without weights patches ``nn.Module`` process-wide (the
# empty-weight contexts) and transformers' lazy imports are not safe to race: two estimates in two threads (the
# launcher's panel and its fit view, a worker left from a closed screen) were seen to count a parameter twice and
# to fail with "cannot import name 'Blip2Config'". Re-entrant: a caller holding it (``fit``) may judge inside.
ESTIMATE_LOCK = threading.RLock()


@dataclass(frozen=True)
class DeviceJudgement:
    """One device's figure and, when a capacity is known for it, its verdict."""

    device: str  # "cuda:0", "cuda:1", ... or "cpu" (the host)
    peak_bytes: int  # predicted peak of what the run allocates there
    runtime_bytes: int  # what the device needs besides: GPU overheads (CUDA context ...), the interpreter on the host
    capacity_bytes: int | None = None  # None: not judged (the host of a GPU run without --host-memory)
    capacity_source: str = ""
    what: str = ""  # what the peak is made of, for people
    # Why the run cannot run on this device as configured, whatever its memory (a load bitsandbytes refuses with
    # modules on the host, a map accelerate cannot dispatch): its verdict is then "oom" with this reason
    refused: str = ""

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + self.runtime_bytes

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.capacity_bytes is None else self.capacity_bytes - self.total_bytes

    @property
    def verdict(self) -> str | None:
        hr = self.headroom_bytes
        if hr is None:
            return None
        return "oom" if self.refused or hr < 0 else "fits"


@dataclass(frozen=True)
class Judgement:
    """A configuration's verdict on every device it uses. ``to_json()`` is ``blipmon estimate --json``'s object."""

    estimate: Any  # timeline.Estimate (train) or load.LoadEstimate (load, generate)
    verdict: str  # "fits" | "oom": every judged device fits, or one does not
    device: str  # the main device: the GPU of a GPU run, "cpu" for a CPU run (peak_bytes and capacity_bytes are its)
    peak_bytes: int  # the main device's predicted peak, as the estimate JSON's ``peak_bytes``
    runtime_bytes: int  # the main device's GPU overheads or interpreter
    capacity_bytes: int  # the main device's capacity (the JSON's ``gpu_memory_bytes``)
    capacity_source: str
    headroom_bytes: int  # capacity - runtime - peak on the limiting device (negative: short by that much)
    limiting_device: str  # the judged device with the least headroom
    judged: tuple[DeviceJudgement, ...]
    host_bytes: int  # the host's predicted peak (the process, offloaded state, host-side weights)
    gpu_memory: int | None = None  # --gpu-memory as given
    host_memory: int | None = None  # --host-memory as given
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def devices(self) -> dict[str, int]:
        """Every device's predicted peak with its runtime, GPUs first: the JSON's ``devices``."""
        return {d.device: d.total_bytes for d in self.judged}

    def device_judgement(self, device: str) -> DeviceJudgement:
        return next(d for d in self.judged if d.device == device)

    @property
    def refused(self) -> str:
        """Why the configuration cannot run as configured ("" when it can): the first refused device's reason."""
        return next((d.refused for d in self.judged if d.refused), "")

    def to_json(self) -> dict[str, Any]:
        """The estimate JSON: the estimate's own object, the overall verdict, ``devices`` and ``judged``."""
        data: dict[str, Any] = self.estimate.to_json()
        data.setdefault("gpu_memory_bytes", int(self.capacity_bytes))
        if self.device != "cpu":
            data.setdefault("capacity_source", self.capacity_source)
        data["verdict"] = self.verdict
        data["devices"] = self.devices
        data["judged"] = {
            d.device: {"capacity_bytes": d.capacity_bytes, "capacity_source": d.capacity_source, "verdict": d.verdict}
            | ({"refused": d.refused} if d.refused else {})
            for d in self.judged
            if d.capacity_bytes is not None
        }
        if self.refused:
            data["refused"] = self.refused
        if self.host_memory is not None:
            data["host_memory_bytes"] = self.host_memory
            data["host_bytes"] = self.host_bytes
        data["seconds"] = round(float(self.seconds), 3)
        return data

    def device_lines(self) -> list[str]:
        """One line per device: its peak, what it is judged against, its verdict (or why it is not judged)."""
        from blipmon.core.units import fmt_bytes

        width = max(len(d.device) for d in self.judged)
        lines = []
        for d in self.judged:
            extra = "GPU overheads" if d.device.startswith("cuda") else "runtime"
            text = (
                f"device   {d.device.ljust(width)}  {fmt_bytes(d.total_bytes)} "
                f"({d.what or 'peak'} {fmt_bytes(d.peak_bytes)} + {fmt_bytes(d.runtime_bytes)} {extra})"
            )
            if d.capacity_bytes is None:
                text += ": not judged (give --host-memory to judge the host)"
            elif d.refused:
                text += (
                    f" of {fmt_bytes(d.capacity_bytes)} ({_judged_against(d.capacity_source)}): "
                    "CANNOT LOAD AS MAPPED, whatever its memory (see the verdict)"
                )
            else:
                hr = d.headroom_bytes or 0
                how = f"{fmt_bytes(hr)} to spare" if hr >= 0 else f"short by {fmt_bytes(-hr)}"
                text += (
                    f" of {fmt_bytes(d.capacity_bytes)} ({_judged_against(d.capacity_source)}): "
                    f"{'FITS' if d.verdict == 'fits' else 'OUT OF MEMORY'}, {how}"
                )
            lines.append(text)
        return lines

    def explain_lines(self) -> list[str]:
        """A few lines a person reads before launching: the estimate's own explanation and every device's verdict."""
        head = self.estimate.explain().splitlines()
        return [*head, *self.device_lines()]


def _judged_against(source: str) -> str:
    """The capacity's origin for people: a capacity given on the command line is ``--gpu-memory``'s."""
    if source == "given":
        source = "--gpu-memory"
    return source if source.startswith("judged against") else f"judged against {source}"


# ----------------------------------------------------------------------------------------------------------------


def lab_card(cfg: dict[str, Any]) -> tuple[int, str] | None:
    """(bytes, "the lab's H100 (79.11 GiB)") for a configuration named for one of the lab's cards, else None.

    The ``h100/*`` and ``a100/*`` presets are rows of the seed lab's tables, run on those 80 GB cards; judged on a
    machine without a GPU they mean that card (the capacity torch reports for it, ``core.presets.LAB_CARD_BYTES``).
    """
    from blipmon.core.presets import LAB_CARD_BYTES
    from blipmon.core.units import fmt_bytes

    card = str(cfg.get("name", "")).split("/", 1)[0].lower()
    if card not in LAB_CARD_BYTES or "/" not in str(cfg.get("name", "")):
        return None
    n = LAB_CARD_BYTES[card]
    return n, f"the lab's {card.upper()} ({fmt_bytes(n)})"


def gpu_intended(cfg: dict[str, Any]) -> bool:
    """Whether the configuration means a GPU when the machine has one (everything but an all-CPU placement)."""
    dm = cfg["model"]["device_map"]
    if dm == "cpu":
        return False
    if isinstance(dm, dict):
        return any(str(v) not in ("cpu", "disk") for v in dm.values())
    return True


def gpu_here() -> bool:
    """Whether this machine has a GPU, by the estimator's one rule: ``auto`` means the GPU when one is visible."""
    from blipmon.estimate import timeline

    return timeline.target_device({"model": {"device_map": "auto"}}, None, None) == "cuda"


def _no_local_gpu() -> bool:
    return not gpu_here()


def choose_gpu(cfg: dict[str, Any], gpu_memory: int | None) -> tuple[str | None, int | None, str | None]:
    """(device to force or None, GPU capacity or None, where the capacity came from or None).

    ``--gpu-memory`` says the user means a GPU machine: ``auto`` and ``cpu-first`` then load onto the GPU. Without
    it, on a machine without a GPU, a configuration named for a lab card is judged against that card.
    """
    dm = cfg["model"]["device_map"]
    if gpu_memory is not None:
        return ("cuda" if dm in ("auto", "cpu-first") else None), gpu_memory, None
    card = lab_card(cfg)
    if card is not None and gpu_intended(cfg) and _no_local_gpu():
        return "cuda", card[0], card[1]
    return None, None, None


def judge(cfg: dict[str, Any], *, gpu_memory: int | None = None, host_memory: int | None = None) -> Judgement:
    """Estimate ``cfg`` and judge every device it uses; raises ``ConfigError`` for what the user must fix.

    ``gpu_memory`` is each GPU's capacity in bytes (default: the local GPU's free memory, or the lab's card for an
    ``h100/*``/``a100/*`` configuration on a machine without a GPU); ``host_memory`` the machine's RAM (default: a
    CPU run is judged against the memory available now, the host of a GPU run is not judged).
    """
    from blipmon.core import config as config_mod

    t0 = time.perf_counter()
    for flag, v in (("--gpu-memory", gpu_memory), ("--host-memory", host_memory)):
        if v is not None and v <= 0:
            raise ConfigError(f"{flag} {v}: expected a positive number of bytes")
    cfg = config_mod.validate(cfg)
    with ESTIMATE_LOCK, _quiet_bitsandbytes():
        if cfg["job"]["kind"] in LOAD_KINDS:
            from blipmon.estimate.load import judge_load

            return judge_load(cfg, gpu_memory=gpu_memory, host_memory=host_memory, t0=t0)
        return _judge_train(cfg, gpu_memory, host_memory, t0)


# bitsandbytes' CPU backend, when it is first imported on a CPU with AVX512-BF16, asks the ``kernels`` package for
# a hub kernel and logs the outcome: "Failed to load CPU gemm_4bit_forward from kernels-community ...
# trust_remote_code" (bitsandbytes.backends.cpu.ops), or offline "Skipping publisher trust check ..."
# (kernels._internals.hf_hub). An estimate runs no kernel: those two loggers are quieted while one is made
# (trust_remote_code stays off; their errors still show).
QUIETED_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


@contextlib.contextmanager
def _quiet_bitsandbytes() -> Iterator[None]:
    """Only those loggers, only during the estimate, back to their levels after."""
    logs = [logging.getLogger(name) for name in QUIETED_LOGGERS]
    old = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, old, strict=True):
            log.setLevel(level)


def _train_gpu(cfg: dict[str, Any]) -> str:
    """The GPU a training run's peak is on: rank 0's, or the lowest GPU a device-map table names."""
    dm = cfg["model"]["device_map"]
    if isinstance(dm, dict):
        from blipmon.estimate.load import gpu_index

        idx = sorted(i for i in (gpu_index(v) for v in dm.values()) if i is not None)
        if idx:
            return f"cuda:{idx[0]}"
    return "cuda:0"


def _judge_train(cfg: dict[str, Any], gpu_memory: int | None, host_memory: int | None, t0: float) -> Judgement:
    from blipmon.estimate import timeline

    device, capacity, source = choose_gpu(cfg, gpu_memory)
    dev = timeline.target_device(cfg, device, capacity)
    if host_memory is not None and dev == "cpu":
        # A CPU run lives in host RAM: the machine's RAM replaces "what is available on this machine right now".
        est = timeline.estimate(cfg, capacity_bytes=host_memory, device="cpu")
        est = dataclasses.replace(est, capacity_source="--host-memory")
    else:
        est = timeline.estimate(cfg, capacity_bytes=capacity, device=device)
        if source is not None:
            est = dataclasses.replace(est, capacity_source=source)
    judged: list[DeviceJudgement] = []
    if est.device == "cuda":
        judged.append(
            DeviceJudgement(
                _train_gpu(cfg), est.peak_bytes, est.runtime_bytes, est.capacity_bytes, est.capacity_source, "peak"
            )
        )
        # The host of a GPU training run: the process itself, the CUDA runtime's host memory (as for every job kind
        # on a GPU: load.CUDA_HOST_BYTES) and what DeepSpeed offloads there.
        from blipmon.estimate.load import CUDA_HOST_BYTES

        host_peak = est.host_optim_bytes
        host = DeviceJudgement(
            "cpu",
            host_peak,
            timeline.CPU_RUNTIME_BYTES + CUDA_HOST_BYTES,
            host_memory,
            "--host-memory" if host_memory is not None else "",
            "offloaded optimizer state" if host_peak else "host-side state",
        )
        judged.append(host)
    else:
        host = DeviceJudgement("cpu", est.peak_bytes, est.runtime_bytes, est.capacity_bytes, est.capacity_source)
        judged.append(host)
        if gpu_memory is not None and cfg["model"]["device_map"] == "cpu":
            note = "--gpu-memory is not used: model.device_map = 'cpu' runs everything on the host"
            est = dataclasses.replace(est, notes=(*est.notes, note))
    return conclude(est, judged, est.device, gpu_memory, host_memory, t0, est.notes)


def conclude(
    est: Any,
    judged: list[DeviceJudgement],
    main: str,
    gpu_memory: int | None,
    host_memory: int | None,
    t0: float,
    notes: tuple[str, ...] = (),
) -> Judgement:
    """The overall verdict from every judged device; ``main`` is "cuda" (the first GPU) or "cpu"."""
    rated = [d for d in judged if d.capacity_bytes is not None]
    if not rated:
        raise ConfigError("nothing to judge: no device of this run has a known capacity")
    verdict = "oom" if any(d.verdict == "oom" for d in rated) else "fits"
    refused = [d for d in rated if d.refused]
    limiting = refused[0] if refused else min(rated, key=lambda d: d.headroom_bytes or 0)
    first = next((d for d in judged if d.device.startswith("cuda")), None) if main == "cuda" else None
    lead = first or next(d for d in judged if d.device == "cpu")
    host = next((d for d in judged if d.device == "cpu"), None)
    return Judgement(
        estimate=est,
        verdict=verdict,
        device=lead.device,
        peak_bytes=lead.peak_bytes,
        runtime_bytes=lead.runtime_bytes,
        capacity_bytes=int(lead.capacity_bytes or 0),
        capacity_source=lead.capacity_source,
        headroom_bytes=int(limiting.headroom_bytes or 0),
        limiting_device=limiting.device,
        judged=tuple(judged),
        host_bytes=host.total_bytes if host is not None else 0,
        gpu_memory=gpu_memory,
        host_memory=host_memory,
        seconds=time.perf_counter() - t0,
        notes=tuple(notes),
    )
