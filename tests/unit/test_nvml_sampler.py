"""NVML in the sampler: the right GPU under CUDA_VISIBLE_DEVICES, MIG devices, host PIDs, per-call failures.

No NVIDIA driver exists here, so NVML is the fake of ``fake_nvml`` (its own device order, prefixed UUIDs,
host PIDs, NVMLError on MIG parents), torch's side is an injected ``device_identity`` (what
``get_device_properties(i).uuid`` prints: the UUID without NVML's prefix) and the allocator an injected
``memory_stats``. Every expected figure is the one the fake device was given.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import fake_nvml as fk
import pytest

from blipmon.runner.nvml import Nvml, normalize_uuid, parse_visible_devices
from blipmon.runner.sampler import MIN_PERIOD_S, Sampler, next_wait, sample_period

GIB = 1024**3
MIB = 1024**2
HOST_PID = 4_000_000  # beyond Linux's pid_max: never this process's PID, as a host PID seen from a container


def four_gpus(pid: int | None = None) -> list[fk.FakeGpu]:
    """Four GPUs in NVML's order, each with a distinct used figure (i + 1 GiB + i MiB) and capacity."""
    me = os.getpid() if pid is None else pid
    return [
        fk.FakeGpu(uuid=fk.uuid(i), total=(80 + i) * GIB, used=(i + 1) * GIB + i * MIB,
                   pci=f"00000000:{0x10 + i:02X}:00.0", procs=[fk.Proc(me, (i + 1) * 100 * MIB)])
        for i in range(4)
    ]  # fmt: skip


def stats_for(reserved: dict[int, int], allocated: dict[int, int] | None = None) -> Any:
    alloc = allocated or {d: r // 2 for d, r in reserved.items()}

    def memory_stats(dev: int) -> dict[str, int]:
        return {
            "allocated_bytes.all.current": alloc[dev],
            "reserved_bytes.all.current": reserved[dev],
            "allocated_bytes.all.peak": alloc[dev],
        }

    return memory_stats


class Emitted:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, kind: str, **fields: Any) -> None:
        self.records.append((kind, fields))

    def notes(self) -> list[str]:
        return [f["message"] for k, f in self.records if k == "note"]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for k, f in self.records if k == kind]


def sampler(
    gpus: list[fk.FakeGpu],
    visible: dict[int, str | None],
    *,
    devices: list[int] | None = None,
    reserved: dict[int, int] | None = None,
    own_ns: bool = False,
) -> tuple[Sampler, Emitted]:
    """A started-NVML sampler whose torch index i has the UUID ``visible[i]`` (bare, as torch prints it)."""
    emitted = Emitted()

    def identity(index: int) -> tuple[str | None, str | None]:
        if index not in visible:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        return visible[index], None

    devs = devices or [0]
    s = Sampler(
        emitted,
        10,
        cuda=True,
        cuda_device=devs[0],
        cuda_devices=devs,
        nvml_module=fk.make(gpus),
        device_identity=identity,
        memory_stats=stats_for(reserved or dict.fromkeys(devs, 512 * MIB)),
        own_pid_namespace=own_ns,
    )
    s.start_nvml()
    return s, emitted


# -- which GPU -------------------------------------------------------------------------------------
def test_cuda_visible_devices_3_reads_nvml_device_3_not_0() -> None:
    gpus = four_gpus()
    # CUDA_VISIBLE_DEVICES=3: torch's only device, cuda:0, is the GPU NVML numbers 3.
    s, emitted = sampler(gpus, {0: fk.bare(gpus[3].uuid)})
    rec = s.sample()
    assert rec["dev"] == 4 * GIB + 3 * MIB  # GPU 3's used memory, not GPU 0's (1 GiB)
    assert rec["proc_gpu"] == 400 * MIB
    (mapping,) = emitted.of("nvml")
    assert mapping["devices"]["cuda:0"]["nvml_index"] == 3
    assert mapping["devices"]["cuda:0"]["matched_by"] == "uuid"
    assert mapping["devices"]["cuda:0"]["total"] == 83 * GIB
    reads = [u for fn, u in s.nvml.nv.calls if fn == "nvmlDeviceGetMemoryInfo"]  # type: ignore[union-attr]
    assert gpus[0].uuid not in reads


def test_without_torch_identity_cuda_visible_devices_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = four_gpus()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    s, emitted = sampler(gpus, {}, devices=[1])  # identity raises: torch cannot say
    assert s.sample()["dev"] == 2 * GIB + 1 * MIB  # cuda:1 = the second visible entry = NVML GPU 1
    assert emitted.of("nvml")[0]["devices"]["cuda:1"]["matched_by"] == "CUDA_VISIBLE_DEVICES"
    assert any("torch cannot name cuda:1" in n for n in emitted.notes())


@pytest.mark.parametrize("form", ["full", "prefix"])
def test_cuda_visible_devices_by_uuid(monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    gpus = four_gpus()
    value = gpus[2].uuid if form == "full" else gpus[2].uuid[:12]  # CUDA takes a unique UUID prefix
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    s, _ = sampler(gpus, {})
    assert s.sample()["dev"] == 3 * GIB + 2 * MIB


def test_torch_order_differs_from_nvml_order() -> None:
    # CUDA's default order is fastest first: torch's cuda:0 may be NVML's GPU 2 with nothing hidden.
    gpus = four_gpus()
    s, _ = sampler(gpus, {0: fk.bare(gpus[2].uuid), 1: fk.bare(gpus[0].uuid)}, devices=[0, 1])
    rec = s.sample()
    assert s._per_gpu["cuda:0"]["dev"] == 3 * GIB + 2 * MIB
    assert s._per_gpu["cuda:1"]["dev"] == 1 * GIB
    assert rec["dev"] == 4 * GIB + 2 * MIB


def test_pci_bus_id_when_torch_has_no_uuid() -> None:
    gpus = four_gpus()
    emitted = Emitted()
    s = Sampler(emitted, 10, cuda=True, cuda_device=0, nvml_module=fk.make(gpus),
                device_identity=lambda i: (None, "00000000:12:00.0"),
                memory_stats=stats_for({0: MIB}), own_pid_namespace=False)  # fmt: skip
    s.start_nvml()
    assert s.sample()["dev"] == 3 * GIB + 2 * MIB  # bus 0x12 is NVML's GPU 2
    assert emitted.of("nvml")[0]["devices"]["cuda:0"]["matched_by"] == "pci bus id"


# -- MIG ---------------------------------------------------------------------------------------------
def mig_host() -> list[fk.FakeGpu]:
    me = os.getpid()
    migs = [
        fk.FakeGpu(uuid=fk.mig_uuid(10 + j), total=(10 + j) * GIB, used=(j + 1) * 700 * MIB,
                   procs=[fk.Proc(me, 300 * MIB)] if j == 1 else [])
        for j in range(2)
    ]  # fmt: skip
    return [fk.FakeGpu(uuid=fk.uuid(0), total=80 * GIB, used=5 * GIB, migs=migs), *four_gpus()[1:]]


def test_mig_device_handle_is_read_not_its_parent() -> None:
    gpus = mig_host()
    s, emitted = sampler(gpus, {0: fk.bare(gpus[0].migs[1].uuid)})
    rec = s.sample()
    assert rec["dev"] == 1400 * MIB  # MIG device 1's memory; the parent would refuse (NO_PERMISSION)
    assert rec["proc_gpu"] == 300 * MIB
    info = emitted.of("nvml")[0]["devices"]["cuda:0"]
    assert info["mig"] is True and info["nvml_index"] == 0 and info["total"] == 11 * GIB
    assert not any("failed" in n for n in emitted.notes())


def test_mig_uuid_in_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = mig_host()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpus[0].migs[0].uuid)
    s, _ = sampler(gpus, {})
    assert s.sample()["dev"] == 700 * MIB


def test_a_mig_parent_with_one_mig_device_reads_that_device() -> None:
    # A driver that gives CUDA the parent's UUID: the one MIG device on it is where the process runs.
    gpus = mig_host()
    gpus[0].migs = gpus[0].migs[:1]
    s, emitted = sampler(gpus, {0: fk.bare(gpus[0].uuid)})
    assert s.sample()["dev"] == 700 * MIB
    assert emitted.of("nvml")[0]["devices"]["cuda:0"]["mig"] is True


# -- per-call guards ----------------------------------------------------------------------------------
def test_one_failing_nvml_call_costs_only_its_own_figure_and_one_note() -> None:
    gpus = four_gpus()
    gpus[0].fail["nvmlDeviceGetMemoryInfo"] = fk.NVML_ERROR_LIB_RM_VERSION_MISMATCH
    s, emitted = sampler(gpus, {0: fk.bare(gpus[0].uuid)}, reserved={0: 768 * MIB})
    samples = [s.sample() for _ in range(3)]
    for rec in samples:
        assert "dev" not in rec  # the failed figure only
        assert rec["alloc"] == 384 * MIB and rec["res"] == 768 * MIB  # the allocator's, exactly
        assert isinstance(rec["rss"], int) and rec["rss"] > 0  # host RSS is a live figure of this process
        assert rec["proc_gpu"] == 100 * MIB
    failed = [n for n in emitted.notes() if "nvmlDeviceGetMemoryInfo" in n]
    assert len(failed) == 1 and "version mismatch" in failed[0]


def test_a_refused_process_query_leaves_device_used() -> None:
    gpus = four_gpus()
    gpus[0].fail["nvmlDeviceGetComputeRunningProcesses"] = fk.NVML_ERROR_NO_PERMISSION
    s, emitted = sampler(gpus, {0: fk.bare(gpus[0].uuid)})
    rec = s.sample()
    assert rec["dev"] == 1 * GIB and "proc_gpu" not in rec
    assert sum("nvmlDeviceGetComputeRunningProcesses" in n for n in emitted.notes()) == 1


def test_the_allocator_failing_leaves_nvml_and_host_rss() -> None:
    gpus = four_gpus()
    emitted = Emitted()

    def broken(dev: int) -> dict[str, int]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    s = Sampler(emitted, 10, cuda=True, nvml_module=fk.make(gpus), device_identity=lambda i: (fk.bare(gpus[0].uuid), None),
                memory_stats=broken, own_pid_namespace=False)  # fmt: skip
    s.start_nvml()
    rec = s.sample()
    assert "alloc" not in rec and "res" not in rec
    assert rec["dev"] == 1 * GIB and rec["proc_gpu"] == 100 * MIB
    assert sum("allocator" in n for n in emitted.notes()) == 1


def test_nvml_missing_is_one_note(monkeypatch: pytest.MonkeyPatch) -> None:
    # No nvml_module: the sampler imports pynvml, whose nvmlInit fails as it does without a driver.
    monkeypatch.setitem(sys.modules, "pynvml", fk.make([], init_error=9))
    emitted = Emitted()
    s = Sampler(emitted, 10, cuda=True, memory_stats=stats_for({0: MIB}))
    s.start_nvml()
    for _ in range(2):
        rec = s.sample()
        assert rec["alloc"] == MIB // 2 and rec["res"] == MIB and "dev" not in rec
    assert emitted.notes() == ["NVML unavailable (NVMLError: error 9)"]


# -- this process's own memory --------------------------------------------------------------------------
def test_host_pids_never_matching_are_unknown_not_zero() -> None:
    gpus = four_gpus(pid=HOST_PID)  # NVML lists the process by its host PID
    s, emitted = sampler(gpus, {0: fk.bare(gpus[0].uuid)}, reserved={0: 640 * MIB})
    for _ in range(3):
        rec = s.sample()
        assert "proc_gpu" not in rec  # unknown, never 0
        assert rec["dev"] == 1 * GIB
    notes = [n for n in emitted.notes() if "does not list this process" in n]
    assert len(notes) == 1
    assert "640.00 MiB" in notes[0] and "unknown, not 0" in notes[0]


def test_in_a_pid_namespace_the_note_comes_before_any_allocation() -> None:
    gpus = four_gpus(pid=HOST_PID)
    s, emitted = sampler(gpus, {0: fk.bare(gpus[0].uuid)}, reserved={0: 0}, own_ns=True)
    assert "proc_gpu" not in s.sample()
    assert any("PID namespace of its own" in n for n in emitted.notes())


def test_not_listed_yet_and_nothing_held_is_unknown_without_a_note() -> None:
    gpus = four_gpus(pid=HOST_PID)
    s, emitted = sampler(gpus, {0: fk.bare(gpus[0].uuid)}, reserved={0: 0})
    assert "proc_gpu" not in s.sample()
    assert not any("does not list" in n for n in emitted.notes())


def test_listed_then_gone_is_zero() -> None:
    gpus = four_gpus()
    s, _ = sampler(gpus, {0: fk.bare(gpus[0].uuid)})
    assert s.sample()["proc_gpu"] == 100 * MIB
    gpus[0].procs = []  # the context was destroyed
    assert s.sample()["proc_gpu"] == 0


def test_used_gpu_memory_none_is_unknown_with_a_note() -> None:
    gpus = four_gpus()
    gpus[0].procs = [fk.Proc(os.getpid(), None)]
    s, emitted = sampler(gpus, {0: fk.bare(gpus[0].uuid)})
    for _ in range(2):
        assert "proc_gpu" not in s.sample()
    assert sum("withholds its memory" in n for n in emitted.notes()) == 1


# -- several GPUs -------------------------------------------------------------------------------------------
def test_a_model_on_two_gpus_sums_and_keeps_each() -> None:
    gpus = four_gpus()
    s, _ = sampler(gpus, {0: fk.bare(gpus[1].uuid), 1: fk.bare(gpus[3].uuid)}, devices=[0, 1],
                   reserved={0: 300 * MIB, 1: 500 * MIB})  # fmt: skip
    rec = s.sample()
    assert rec["dev"] == (2 * GIB + 1 * MIB) + (4 * GIB + 3 * MIB)
    assert rec["proc_gpu"] == 200 * MIB + 400 * MIB
    assert rec["res"] == 800 * MIB and rec["alloc"] == 400 * MIB
    assert s._per_gpu == {
        "cuda:0": {"alloc": 150 * MIB, "res": 300 * MIB, "dev": 2 * GIB + 1 * MIB, "proc_gpu": 200 * MIB},
        "cuda:1": {"alloc": 250 * MIB, "res": 500 * MIB, "dev": 4 * GIB + 3 * MIB, "proc_gpu": 400 * MIB},
    }


def test_the_thread_writes_a_gpus_record_beside_each_sample_and_follows_set_cuda_devices() -> None:
    gpus = four_gpus()
    emitted = Emitted()
    two = threading.Event()
    lock = threading.Lock()

    def emit(kind: str, **fields: Any) -> None:
        with lock:
            emitted(kind, **fields)
            if kind == "gpus":
                two.set()

    uuids = {i: fk.bare(g.uuid) for i, g in enumerate(gpus)}
    s = Sampler(emit, 1e9, cuda=True, cuda_device=0, rank=2, nvml_module=fk.make(gpus),
                device_identity=lambda i: (uuids[i], None), memory_stats=stats_for(dict.fromkeys(range(4), MIB)),
                own_pid_namespace=False)  # fmt: skip
    s.set_cuda_devices([2, 0])
    s.start()
    try:
        assert two.wait(60), "no gpus record"
    finally:
        s.stop()
    with lock:
        rec = emitted.of("gpus")[0]
        sample = next(f for f in emitted.of("sample") if "dev" in f and f["dev"] > 2 * GIB)
    assert rec["rank"] == 2 and set(rec["devices"]) == {"cuda:0", "cuda:2"}
    assert sample["dev"] == 1 * GIB + (3 * GIB + 2 * MIB)
    assert {"cuda:0", "cuda:2"} <= set().union(*(m["devices"] for m in emitted.of("nvml")))


# -- rates ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("hz", "period"),
    [(10, 0.1), (1e9, MIN_PERIOD_S), (float("inf"), MIN_PERIOD_S), (1e-9, 1e9), (1e-300, 1e9), (5e-324, 1e9),
     (float("nan"), 0.1), (0, 0.1), (-3, 0.1)],
)  # fmt: skip
def test_sample_period_is_bounded_for_any_rate(hz: float, period: float) -> None:
    assert sample_period(hz) == pytest.approx(period)


def test_next_wait_keeps_sampling_to_a_fifth_of_the_time() -> None:
    assert next_wait(0.1, 0.01) == pytest.approx(0.09)
    assert next_wait(0.01, 0.05) == pytest.approx(0.2)  # a slow sample: four times its cost
    assert next_wait(1e9, 0.0) == 1e9


def test_a_sampler_at_a_tiny_rate_stops_at_once() -> None:
    s = Sampler(Emitted(), 1e-300)
    s.start()
    deadline = time.monotonic() + 60
    while s.samples == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    s.stop()
    assert s.samples == 1 and not s.is_alive()


# -- parsing ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "parsed"),
    [(None, None), ("3", [3]), ("3,1", [3, 1]), ("1gpu2,2ampere", [1, 2]), ("0,0", []), ("", []), ("-1,2", []),
     ("GPU-abc,GPU-def", ["GPU-abc", "GPU-def"]), ("MIG-abc", ["MIG-abc"]), ("GPU-a,3", ["GPU-a"])],
)  # fmt: skip
def test_parse_visible_devices_as_cuda_does(value: str | None, parsed: list[Any] | None) -> None:
    assert parse_visible_devices(value) == parsed


def test_normalize_uuid() -> None:
    assert normalize_uuid("GPU-ABCdef") == normalize_uuid("abcdef") == normalize_uuid(b"MIG-abcdef") == "abcdef"


def test_unmatched_device_is_noted() -> None:
    notes: list[str] = []
    nv = Nvml(fk.make(four_gpus()), note=lambda k, m: notes.append(m))
    assert (
        nv.for_torch_device(0, identity=lambda i: ("ffffffff-0000", None), environ={"CUDA_VISIBLE_DEVICES": "7"})
        is None
    )
    assert any("no NVML device matches cuda:0" in n for n in notes)
