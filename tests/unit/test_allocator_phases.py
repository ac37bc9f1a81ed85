"""Allocator figures over every GPU a model occupies, one ``memory_stats`` per device per boundary (issue 15: 4, 6, 11).

Several GPUs cannot exist here, so what cannot is emulated, and only that: ``FakeAllocator`` stands in for
``torch.cuda.memory_stats``/``reset_peak_memory_stats`` and keeps the caching allocator's bookkeeping
(current bytes, a peak that a reset brings down to the current figure), and where the split model's parameters
live is what accelerate computes for fake GPU capacities (``infer_auto_device_map`` on the meta device). The
probe itself, the model and the device-map arithmetic are real.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from accelerate import infer_auto_device_map, init_empty_weights

from blipmon.runner import allocator, probes
from blipmon.runner.models import model_class, tiny_config
from blipmon.runner.probes import PhaseProbe

KIB = 1024
MIB = 1024**2


class FakeAllocator:
    """The caching allocator's counters for GPUs that cannot exist here, read the way torch reads them."""

    def __init__(self, current: dict[int, int], cached: int = 2 * MIB) -> None:
        self.current = dict(current)
        self.peak = dict(current)
        self.cached = cached  # reserved - allocated, per device
        self.stats_calls: Counter[int] = Counter()
        self.resets: Counter[int] = Counter()

    def allocate(self, dev: int, n: int) -> None:
        self.current[dev] += n
        self.peak[dev] = max(self.peak[dev], self.current[dev])

    def free(self, dev: int, n: int) -> None:
        self.current[dev] -= n

    def memory_stats(self, dev: int) -> dict[str, int]:
        self.stats_calls[dev] += 1
        return {
            "allocated_bytes.all.current": self.current[dev],
            "allocated_bytes.all.peak": self.peak[dev],
            "reserved_bytes.all.current": self.current[dev] + self.cached,
        }

    def reset_peak(self, dev: int) -> None:
        self.resets[dev] += 1
        self.peak[dev] = self.current[dev]


def _meta_tiny() -> Any:
    cfg = tiny_config("tiny/blip2-opt")
    with init_empty_weights():
        return model_class(cfg)(cfg)


def _bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _device_for(name: str, device_map: dict[str, Any]) -> Any:
    """The device a device map gives a parameter: its longest module prefix in the map."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        prefix = ".".join(parts[:i])
        if prefix in device_map:
            return device_map[prefix]
    raise KeyError(name)


def test_accelerate_auto_splits_the_tiny_model_over_two_fake_gpus_then_cpu() -> None:
    """What accelerate's "auto" does on a machine with two GPUs: what a train job must no longer get by default."""
    meta = _meta_tiny()
    total = _bytes(meta)
    split = infer_auto_device_map(
        meta, max_memory={0: total // 2, 1: total, "cpu": 10 * total}, no_split_module_classes=meta._no_split_modules
    )
    assert set(split.values()) == {0, 1}
    spill = infer_auto_device_map(
        meta,
        max_memory={0: total // 3, 1: total // 3, "cpu": 10 * total},
        no_split_module_classes=meta._no_split_modules,
    )
    assert set(spill.values()) == {0, 1, "cpu"}  # GPU first, then the host: seed 003's loads rely on it
    # Every parameter lands on exactly one device of the map, and the map holds the whole model.
    placed = Counter()
    for name, p in meta.named_parameters():
        placed[_device_for(name, split)] += p.numel() * p.element_size()
    assert sum(placed.values()) == total and placed[0] <= total // 2


@pytest.fixture
def split_model(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict[int, int]]:
    """The real tiny model with accelerate's two-GPU "auto" map, its parameters seen on their fake GPUs.

    Returns the model and the parameter bytes each fake GPU holds, summed from shapes x dtype sizes.
    """
    meta = _meta_tiny()
    total = _bytes(meta)
    split = infer_auto_device_map(
        meta, max_memory={0: total // 2, 1: total, "cpu": 10 * total}, no_split_module_classes=meta._no_split_modules
    )
    cfg = tiny_config("tiny/blip2-opt")
    torch.manual_seed(0)
    model = model_class(cfg)(cfg)
    model.hf_device_map = dict(split)
    per_gpu: Counter[int] = Counter()
    fake_gpu: dict[int, int] = {}
    for name, p in model.named_parameters():
        dev = _device_for(name, split)
        per_gpu[dev] += p.numel() * p.element_size()
        fake_gpu[p.untyped_storage().data_ptr()] = dev
    real_key = probes._key

    def key_on_fake_gpu(t: torch.Tensor) -> tuple[tuple[int, int], int, bool]:
        (dev, ptr), n, cuda = real_key(t)
        if ptr in fake_gpu:  # a parameter of the split model: on its GPU
            return (fake_gpu[ptr], ptr), n, True
        return (dev, ptr), n, cuda

    monkeypatch.setattr(probes, "_key", key_on_fake_gpu)
    return model, dict(per_gpu)


def test_other_is_summed_over_every_gpu_of_a_two_gpu_split(split_model: tuple[Any, dict[int, int]]) -> None:
    model, per_gpu = split_model
    assert sorted(per_gpu) == [0, 1] and all(v > 0 for v in per_gpu.values())
    extra = {0: 3 * KIB, 1: 5 * KIB}  # what lives on each GPU outside the four categories (cuBLAS workspace, say)
    fake = FakeAllocator({d: per_gpu[d] + extra[d] for d in (0, 1)})
    # One GPU's allocations minus the parameters of both: the negative "other" of issue 15, item 4.
    assert fake.current[0] - sum(per_gpu.values()) < 0
    probe = PhaseProbe(
        model, lambda *a, **k: None, cuda=True, cuda_device=0, memory_stats=fake.memory_stats,
        reset_peak=fake.reset_peak,
    )  # fmt: skip
    assert probe.devices == [0, 1]  # from hf_device_map: the default device alone would be [0]
    rec = probe.measure()
    assert rec["params"] == sum(per_gpu.values())
    assert rec["allocated"] == sum(per_gpu.values()) + 8 * KIB
    assert rec["other"] == 8 * KIB  # exactly what lives outside the categories, on both GPUs together
    assert rec["reserved"] == rec["allocated"] + 2 * 2 * MIB
    assert rec["peak"] == rec["allocated"]
    assert rec["devices"] == {
        f"cuda:{d}": {"allocated": per_gpu[d] + extra[d], "reserved": per_gpu[d] + extra[d] + 2 * MIB,
                      "peak": per_gpu[d] + extra[d]}
        for d in (0, 1)
    }  # fmt: skip


def test_peak_and_its_reset_cover_every_gpu(split_model: tuple[Any, dict[int, int]]) -> None:
    model, per_gpu = split_model
    fake = FakeAllocator({d: per_gpu[d] for d in (0, 1)})
    probe = PhaseProbe(
        model, lambda *a, **k: None, cuda=True, cuda_device=0, memory_stats=fake.memory_stats,
        reset_peak=fake.reset_peak,
    )  # fmt: skip
    probe.start_interval()
    fake.allocate(0, 7 * MIB)  # a spike on GPU 0 between two boundaries ...
    fake.free(0, 7 * MIB)
    fake.allocate(1, 11 * MIB)  # ... and one on GPU 1
    fake.free(1, 11 * MIB)
    first = probe.measure()
    assert first["peak"] == sum(per_gpu.values()) + 18 * MIB
    assert first["devices"]["cuda:0"]["peak"] == per_gpu[0] + 7 * MIB
    assert first["devices"]["cuda:1"]["peak"] == per_gpu[1] + 11 * MIB
    second = probe.measure()  # nothing happened since: both GPUs' peaks were reset at the last boundary
    assert second["peak"] == sum(per_gpu.values())
    assert fake.resets == Counter({0: 3, 1: 3})  # start + two boundaries, on each GPU


def test_one_memory_stats_per_device_per_boundary_and_no_synchronize(
    split_model: tuple[Any, dict[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, per_gpu = split_model
    syncs: list[Any] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    fake = FakeAllocator({d: per_gpu[d] for d in (0, 1)})
    events: list[tuple[str, dict[str, Any]]] = []
    probe = PhaseProbe(
        model, lambda kind, **kw: events.append((kind, kw)), cuda=True, cuda_device=0,
        memory_stats=fake.memory_stats, reset_peak=fake.reset_peak,
    )  # fmt: skip
    for i, phase in enumerate(("before_fwd", "after_fwd", "after_bwd", "after_opt_step")):
        probe.boundary(phase, 0, 0)
        assert fake.stats_calls == Counter({0: i + 1, 1: i + 1})  # one memory_stats per device per boundary
    assert [kind for kind, _ in events] == ["phase"] * 4
    assert syncs == []  # reading the allocator never waits for the GPU


def test_one_gpu_record_has_no_devices_field() -> None:
    """A single-GPU run's phase record keeps exactly the fixed fields; ``devices`` appears only for a split."""
    reading = allocator.read([0], stats=FakeAllocator({0: 5 * MIB}).memory_stats)
    assert reading.as_record() == {"allocated": 5 * MIB, "reserved": 7 * MIB, "peak": 5 * MIB}


def test_first_interval_starts_after_setup_not_at_process_start() -> None:
    """Step 0's first peak covers only what happened after setup (issue 15, item 6)."""
    model = torch.nn.Linear(4, 4)
    fake = FakeAllocator({0: 1 * MIB})
    fake.allocate(0, 900 * MIB)  # loading: a transient copy of the weights, say
    fake.free(0, 900 * MIB)
    probe = PhaseProbe(
        model, lambda *a, **k: None, cuda=True, devices=[0], memory_stats=fake.memory_stats,
        reset_peak=fake.reset_peak,
    )  # fmt: skip
    probe.start_interval()
    fake.allocate(0, 3 * MIB)  # the batch arrives
    rec = probe.boundary("before_fwd", 0, 0)
    assert rec["peak"] == 4 * MIB  # not the lifetime peak of 901 MiB


def test_model_cuda_devices_reads_the_map_the_tensors_and_the_hooks() -> None:
    class Hook:
        def __init__(self, dev: Any) -> None:
            self.execution_device = dev

    class Sequential:
        def __init__(self, *hooks: Any) -> None:
            self.hooks = list(hooks)

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert allocator.model_cuda_devices(model) == []
    assert allocator.model_cuda_devices(model, default=3) == [3]
    model.hf_device_map = {"0": "cuda:2", "1": "cpu"}
    model[1]._hf_hook = Sequential(Hook(None), Hook(torch.device("cuda", 5)))  # an offloaded module's hook
    model[0]._hf_hook = Hook(1)
    assert allocator.model_cuda_devices(model, default=0) == [1, 2, 5]
