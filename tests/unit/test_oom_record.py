"""The OOM record: exact size from torch's out-of-memory observer, cuBLAS allocation failures, every GPU's state.

No GPU exists here: the exceptions are the ones torch raises (``torch.OutOfMemoryError`` with the CUDA
allocator's message, a RuntimeError from cuBLAS), the observer is called as the CUDA caching allocator calls
it (device, bytes it failed to allocate, device limit, device free), and ``memory_stats`` is a fake that
answers per device as the allocator does.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import torch

from blipmon.core.units import requested_bytes_from_message
from blipmon.runner import child
from blipmon.runner.child import OomObserver, _follow_model, _Gpus, _record_failure, expected_cuda_device, load_memory
from blipmon.runner.train import Cursor

GIB, MIB = 1024**3, 1024**2

# The allocator rounds a large request up to 2 MiB and prints it with two decimals of its unit: 1204 x 2 MiB
# is 2.3515625 GiB, printed "2.35 GiB", which reads back 1.6 MiB short of what it tried to allocate.
EXACT = 1204 * 2 * MIB
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.35 GiB. GPU 0 has a total capacity of 79.11 GiB of which "
    "1.02 GiB is free. Including non-PyTorch memory, this process has 78.08 GiB memory in use. Of the "
    "allocated memory 75.50 GiB is allocated by PyTorch, and 1.90 GiB is reserved by PyTorch but unallocated."
)


class Stats:
    """``torch.cuda.memory_stats(dev)`` for two GPUs: the three keys blipmon reads, per device."""

    def __init__(self, per: dict[int, tuple[int, int, int]]) -> None:
        self.per = per
        self.calls: list[int] = []

    def __call__(self, dev: int) -> dict[str, int]:
        self.calls.append(dev)
        alloc, res, peak = self.per[dev]
        return {"allocated_bytes.all.current": alloc, "reserved_bytes.all.current": res,
                "allocated_bytes.all.peak": peak, "num_ooms": 1}  # fmt: skip


TWO_GPUS = Stats({0: (70 * GIB, 75 * GIB, 76 * GIB), 1: (30 * GIB, 33 * GIB, 31 * GIB)})


def record(e: BaseException, **kw: Any) -> tuple[tuple[str, int], dict[str, Any]]:
    out: list[tuple[str, dict[str, Any]]] = []
    cursor = Cursor(step=3, micro_step=1, phase="backward")
    result = _record_failure(e, cursor, lambda kind, **f: out.append((kind, f)), 0, **kw)
    assert len(out) == 1
    kind, fields = out[0]
    assert kind == ("oom" if result[0] == "oom" else "error")
    return result, fields


def test_the_size_is_the_observer_s_exact_bytes_not_the_rounded_message() -> None:
    parsed = requested_bytes_from_message(CUDA_OOM)
    assert parsed == int(Decimal("2.35") * GIB) and parsed != EXACT  # what the message alone gives
    obs = OomObserver()
    obs(0, EXACT, 80 * GIB, int(Decimal("1.02") * GIB))  # as the allocator calls it, before raising
    (status, code), rec = record(torch.OutOfMemoryError(CUDA_OOM), devices=[0], observer=obs,
                                 stats=Stats({0: (75 * GIB, 77 * GIB, 78 * GIB)}))  # fmt: skip
    assert (status, code) == ("oom", 3)
    assert rec["requested_bytes"] == EXACT
    assert rec["requested_source"] == "allocator"
    assert rec["device"] == "cuda:0"
    assert rec["device_limit"] == 80 * GIB and rec["device_free"] == int(Decimal("1.02") * GIB)
    assert (rec["step"], rec["micro_step"], rec["phase"]) == (3, 1, "backward")
    assert (rec["allocated"], rec["reserved"], rec["peak"]) == (75 * GIB, 77 * GIB, 78 * GIB)
    assert "devices" not in rec  # one GPU: the sums are its figures
    assert obs.last is None  # taken: a later failure cannot reuse it


def test_without_an_observer_the_message_s_size_and_gpu_are_recorded() -> None:
    _, rec = record(torch.OutOfMemoryError(CUDA_OOM.replace("GPU 0", "GPU 3")))
    assert rec["requested_bytes"] == int(Decimal("2.35") * GIB)
    assert rec["requested_source"] == "message"
    assert rec["device"] == "cuda:3"
    assert "allocated" not in rec  # no GPU given: no allocator state


def test_a_stale_observation_from_an_earlier_caught_oom_is_not_used() -> None:
    obs = OomObserver()
    obs(1, 512 * MIB, 80 * GIB, 10 * GIB)  # someone caught that one and went on
    _, rec = record(torch.OutOfMemoryError(CUDA_OOM), observer=obs)
    assert rec["requested_bytes"] == int(Decimal("2.35") * GIB) and rec["requested_source"] == "message"
    assert rec["device"] == "cuda:0"


def test_cublas_failing_to_allocate_is_an_out_of_memory() -> None:
    e = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    obs = OomObserver()
    obs(0, 20 * MIB, 80 * GIB, 0)  # stale: cuBLAS allocates its handle outside the caching allocator
    (status, code), rec = record(e, devices=[0, 1], observer=obs, stats=TWO_GPUS)
    assert (status, code) == ("oom", 3)
    assert rec["requested_bytes"] is None and rec["requested_source"] is None
    assert rec["message"].startswith("RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED")


def test_the_state_sums_every_gpu_the_model_occupies_and_keeps_each() -> None:
    _, rec = record(torch.OutOfMemoryError(CUDA_OOM), devices=[0, 1], stats=TWO_GPUS)
    assert rec["allocated"] == 100 * GIB and rec["reserved"] == 108 * GIB and rec["peak"] == 107 * GIB
    assert rec["devices"] == {
        "cuda:0": {"allocated": 70 * GIB, "reserved": 75 * GIB, "peak": 76 * GIB},
        "cuda:1": {"allocated": 30 * GIB, "reserved": 33 * GIB, "peak": 31 * GIB},
    }


def test_an_ordinary_error_stays_an_error() -> None:
    (status, code), rec = record(ValueError("must end with [/INST]"), devices=[0], stats=TWO_GPUS)
    assert (status, code) == ("error", 1)
    assert rec["message"] == "ValueError: must end with [/INST]" and "reason" not in rec


def test_a_full_disk_is_an_error_that_says_disk_full() -> None:
    import errno

    (status, code), rec = record(OSError(errno.ENOSPC, "No space left on device"))
    assert (status, code) == ("error", 1)
    assert rec["message"].startswith("disk full: OSError: [Errno 28] No space left on device")
    assert rec["reason"] == "disk_full"


def test_the_observer_never_raises_into_the_allocator() -> None:
    obs = OomObserver()
    obs("not a device", None, None, None)  # type: ignore[arg-type]
    assert obs.last is None


def test_the_observer_is_not_attached_where_torch_has_no_cuda() -> None:
    assert not hasattr(torch._C, "_cuda_attach_out_of_memory_observer")  # this CPU build
    assert OomObserver().attach(torch) is False


def test_the_observer_attaches_once_after_cuda_is_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(torch._C, "_cuda_attach_out_of_memory_observer", lambda o: calls.append("attach"),
                        raising=False)  # fmt: skip
    monkeypatch.setattr(torch.cuda, "init", lambda: calls.append("init"))
    obs = OomObserver()
    assert obs.attach(torch) and obs.attach(torch)
    assert calls == ["init", "attach"]  # the allocator only gives observers to devices it has set up


# -- load peak and the sampler's device (15.4, the child's side) --------------------------------------


def test_the_load_peak_sums_the_model_s_gpus() -> None:
    assert load_memory([0, 1], stats=TWO_GPUS) == {
        "allocated": 100 * GIB,
        "reserved": 108 * GIB,
        "peak": 107 * GIB,
        "devices": {
            "cuda:0": {"allocated": 70 * GIB, "reserved": 75 * GIB, "peak": 76 * GIB},
            "cuda:1": {"allocated": 30 * GIB, "reserved": 33 * GIB, "peak": 31 * GIB},
        },
    }
    assert load_memory([1], stats=TWO_GPUS) == {"allocated": 30 * GIB, "reserved": 33 * GIB, "peak": 31 * GIB}
    assert load_memory([]) == {"peak": None}  # the CPU: no allocator


def _cfg(device_map: Any) -> dict[str, Any]:
    return {"model": {"device_map": device_map}}


def test_the_expected_device_is_where_the_model_will_load() -> None:
    assert expected_cuda_device(_cfg("cuda"), 0) == 0
    assert expected_cuda_device(_cfg("auto"), 0) == 0
    assert expected_cuda_device(_cfg("cuda"), 3) == 3  # torchrun's local rank 3 is torch index 3
    split = {"vision_model": 2, "qformer": "cuda:1", "language_model": "cpu"}
    assert expected_cuda_device(_cfg(split), 0) == 1  # the lowest GPU the map names
    assert expected_cuda_device(_cfg({"": "cpu"}), 0) == 0


class FakeSampler:
    made: list[FakeSampler] = []

    def __init__(self, emit: Any, hz: float, *, cuda: bool, cuda_device: int, rank: int) -> None:
        self.cuda_device, self.rank, self.started, self.stopped = cuda_device, rank, False, False
        FakeSampler.made.append(self)

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def set_cuda_devices(self, devices: list[int]) -> None:
        self.sampled = list(devices)


def test_the_sampler_moves_to_the_model_s_first_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import blipmon.runner.sampler as sampler_mod

    monkeypatch.setattr(sampler_mod, "Sampler", FakeSampler)
    FakeSampler.made = []
    model = torch.nn.Linear(2, 2)
    model.hf_device_map = {"vision_model": 2, "language_model": 3}  # type: ignore[assignment]
    gpus = _Gpus()
    gpus.cuda, gpus.device, gpus.devices = True, 0, [0]
    first = child._start_sampler(lambda *a, **k: None, {"runtime": {"sample_hz": 10}}, cuda=True, device=0, rank=0)
    moved = _follow_model(model, gpus, first, lambda *a, **k: None, {"runtime": {"sample_hz": 10}}, rank=0)
    assert gpus.devices == [2, 3] and gpus.device == 2
    assert first.stopped and moved is not first and moved.cuda_device == 2 and moved.started
    assert moved.sampled == [2, 3]  # the timeline sums both GPUs of the split, as the phases do


def test_a_model_on_the_expected_gpu_keeps_its_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    import blipmon.runner.sampler as sampler_mod

    monkeypatch.setattr(sampler_mod, "Sampler", FakeSampler)
    model = torch.nn.Linear(2, 2)
    model.hf_device_map = {"": 1}  # type: ignore[assignment]
    gpus = _Gpus()
    gpus.cuda, gpus.device, gpus.devices = True, 1, [1]
    first = FakeSampler(None, 10, cuda=True, cuda_device=1, rank=0)
    assert _follow_model(model, gpus, first, None, {"runtime": {"sample_hz": 10}}, rank=0) is first
    assert not first.stopped and gpus.devices == [1] and first.sampled == [1]
