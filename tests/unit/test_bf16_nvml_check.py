"""bfloat16 is refused from the GPU's compute capability as NVML reports it, never through ``torch.cuda``.

``torch.cuda.is_bf16_supported()`` counts emulation (True on a T4 or V100) and creates a CUDA context
in the parent on GPU 0, which the dashboard then holds for the whole run. No NVIDIA driver exists
here, so NVML is a fake that behaves as NVML does: its own (PCI bus) order, whatever
``CUDA_VISIBLE_DEVICES`` says, UUIDs, and an error for an index it does not have.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from blipmon.core.config import ConfigError, resolve
from blipmon.runner import preflight as preflight_mod
from blipmon.runner.preflight import bf16_capability, preflight


class NVMLError(Exception):
    pass


@dataclass
class Card:
    name: str
    uuid: str
    capability: tuple[int, int]


V100 = Card("Tesla V100-SXM2-16GB", "GPU-7a1b0c2d-1111-2222-3333-444455556666", (7, 0))
T4 = Card("Tesla T4", "GPU-51c0ffee-1111-2222-3333-444455556666", (7, 5))
H100 = Card("NVIDIA H100 80GB HBM3", "GPU-9e1f2a3b-1111-2222-3333-444455556666", (9, 0))
A100 = Card("NVIDIA A100-SXM4-80GB", "GPU-a1000000-1111-2222-3333-444455556666", (8, 0))


class FakeNvml:
    """The calls blipmon makes, answered as NVML answers them: PCI order, exact UUIDs only, bytes-free."""

    def __init__(self, *cards: Card) -> None:
        self.cards = list(cards)
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> Card:
        if not 0 <= i < len(self.cards):
            raise NVMLError("Invalid Argument")
        return self.cards[i]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Card:
        for c in self.cards:
            if c.uuid == uuid:  # NVML takes whole UUIDs only (CUDA_VISIBLE_DEVICES takes prefixes)
                return c
        raise NVMLError("Not Found")

    def nvmlDeviceGetUUID(self, h: Card) -> str:
        return h.uuid

    def nvmlDeviceGetName(self, h: Card) -> str:
        return h.name

    def nvmlDeviceGetCudaComputeCapability(self, h: Card) -> tuple[int, int]:
        return h.capability


@pytest.fixture
def parent(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A parent on a GPU machine: torch sees CUDA, and touching torch.cuda any further fails the test."""

    def forbidden(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the parent must not touch torch.cuda (it creates a CUDA context on GPU 0)")

    monkeypatch.setattr(preflight_mod, "cuda_available", lambda: True)
    for name in ("is_bf16_supported", "init", "get_device_capability", "get_device_properties", "current_device"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)

    def install(*cards: Card) -> FakeNvml:
        fake = FakeNvml(*cards)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake

    return install


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_a_volta_gpu_is_refused_with_its_name_and_capability(parent: Any, precision: str) -> None:
    fake = parent(V100)
    cfg = resolve("tiny/blip2-opt", [f"train.precision={precision}", "model.device_map=cuda"])
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    msg = str(err.value)
    assert "Tesla V100-SXM2-16GB" in msg and "compute capability 7.0" in msg and "needs 8.0" in msg
    assert f"train.precision = '{precision}'" in msg and "'16-mixed'" in msg
    assert fake.inits == fake.shutdowns == 1


def test_a_hopper_gpu_is_allowed(parent: Any) -> None:
    parent(H100)
    preflight(resolve("tiny/blip2-opt", ["train.precision=bf16-mixed", "model.device_map=cuda"]))
    preflight(resolve("tiny/blip2-opt", ["model.dtype=bfloat16", "job.kind=load", "model.device_map=cuda"]))


def test_a_train_job_ignores_model_dtype_which_only_loads_use(parent: Any) -> None:
    """A train job's weights follow train.precision: model.dtype = bfloat16 there runs fine on a V100."""
    parent(V100)
    preflight(resolve("tiny/blip2-opt", ["model.dtype=bfloat16", "train.precision=16-mixed", "model.device_map=cuda"]))


def test_a_bf16_load_on_a_t4_is_refused(parent: Any) -> None:
    parent(T4)
    with pytest.raises(ConfigError, match=r"model.dtype = 'bfloat16'.*Tesla T4.*compute capability 7\.5"):
        preflight(resolve("tiny/blip2-opt", ["model.dtype=bfloat16", "job.kind=load", "model.device_map=cuda"]))


def test_the_gpu_cuda_visible_devices_names_is_the_one_checked(parent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    parent(V100, H100)  # NVML order: the V100 first
    cfg = resolve("tiny/blip2-opt", ["train.precision=bf16-mixed", "model.device_map=cuda"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", H100.uuid[:12])  # a UUID prefix, as CUDA accepts
    preflight(cfg)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", V100.uuid)
    with pytest.raises(ConfigError, match="Tesla V100"):
        preflight(cfg)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # numbers are NVML indices only in this order
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    preflight(cfg)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(ConfigError, match=r"NVML GPU 0, compute capability 7\.0"):
        preflight(cfg)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")  # torch index 0 is the H100: allowed
    preflight(cfg)


def test_cuda_s_own_order_is_not_guessed(parent: Any) -> None:
    """Without PCI_BUS_ID a number is CUDA's "fastest first" ordinal: only a unanimous answer is certain."""
    parent(V100, H100)
    check = bf16_capability([0], environ={"CUDA_VISIBLE_DEVICES": "1"})
    assert check.supported is None  # CUDA's device 1 could be either card
    assert bf16_capability([0], environ={"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}).supported
    parent(V100, T4)
    assert bf16_capability([0], environ={"CUDA_VISIBLE_DEVICES": "1"}).supported is False  # neither has it
    parent(A100, H100)
    assert bf16_capability([0], environ={}).supported is True


def test_auto_and_ddp_check_every_gpu_they_use(parent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    parent(H100, V100)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    auto = resolve("tiny/blip2-opt", ["job.kind=load", "model.dtype=bfloat16", "model.device_map=auto"])
    with pytest.raises(ConfigError, match="Tesla V100"):  # a load job's "auto" may spread onto the V100
        preflight(auto)
    single = resolve("tiny/blip2-opt", ["train.precision=bf16-mixed", "model.device_map=cuda"])
    preflight(single)  # one process: torch index 0, the H100
    preflight(resolve("tiny/blip2-opt", ["train.precision=bf16-mixed", "model.device_map=auto"]))  # train: its own
    assert preflight_mod.target_cuda_indices(resolve("tiny/blip2-opt", ["train.strategy=ddp", "train.devices=2"])) == [
        0,
        1,
    ]
    assert preflight_mod.target_cuda_indices(resolve("tiny/blip2-opt", ['model.device_map={"" = 1}'])) == [1]


def test_no_nvml_refuses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def nvmlInit(self) -> None:
            raise NVMLError("Driver Not Loaded")

    assert bf16_capability([0], nvml=Broken(), environ={}).supported is None
    monkeypatch.setattr(preflight_mod, "cuda_available", lambda: True)
    monkeypatch.setitem(sys.modules, "pynvml", Broken())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: pytest.fail("called torch.cuda"))
    preflight(resolve("tiny/blip2-opt", ["train.precision=bf16-mixed", "model.device_map=cuda"]))


def test_an_unknown_uuid_decides_nothing(parent: Any) -> None:
    parent(V100)
    assert bf16_capability([0], environ={"CUDA_VISIBLE_DEVICES": "GPU-00000000"}).supported is None
