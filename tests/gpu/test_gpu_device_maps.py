"""Device maps on real GPUs (issue 15, items 4, 5, 6, 11): what the CPU tests emulate, checked on the hardware.

Run on a lent GPU machine with ``python -m pytest -m gpu tests/gpu/test_gpu_device_maps.py -q``. Nothing is
mocked. The only skip is the two-GPU split on a machine with fewer than two GPUs.

- allocator figures: ``allocator.read`` equals the sums of ``torch.cuda.memory_allocated``/``memory_reserved``
  over the devices, and a probe's ``other`` on a model split over two GPUs is exact and non-negative;
- seed 001's map (language model on GPU 0, the rest offloaded to the host): placement's ``cpu`` share is the
  offloaded modules' parameter bytes, inputs go to GPU 0, the forward runs;
- a train job's default placement is the process's own GPU, and step 0's first peak is not the load's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from blipmon.core.config import resolve
from blipmon.core.profile import write_config
from blipmon.core.run import load_run
from blipmon.runner import allocator
from blipmon.runner.models import ensure_tiny, input_device, load_model, model_class, placement, tiny_config
from blipmon.runner.probes import PhaseProbe

pytestmark = [pytest.mark.gpu]

SEED_001 = {"language_model": 0, "vision_model": "cpu", "qformer": "cpu", "language_projection": "cpu",
            "query_tokens": "cpu"}  # fmt: skip
OFFLOADED = ("vision_model", "qformer", "language_projection")


def _bytes_by_top_module() -> dict[str, int]:
    cfg = tiny_config("tiny/blip2-opt")
    model = model_class(cfg)(cfg)
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        out[name.split(".")[0]] = out.get(name.split(".")[0], 0) + p.numel() * p.element_size()
    return out


def _batch(model: Any, device: torch.device, n: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (n, 12))
    ids[:, : model.config.num_query_tokens] = model.config.image_token_index
    return {"pixel_values": torch.randn(n, 3, 128, 128).to(device), "input_ids": ids.to(device),
            "labels": ids.to(device)}  # fmt: skip


def test_allocator_read_equals_torchs_own_figures_on_every_gpu() -> None:
    devices = list(range(torch.cuda.device_count()))
    held = [torch.empty((1 << 20) * (i + 1), dtype=torch.uint8, device=f"cuda:{d}") for i, d in enumerate(devices)]
    reading = allocator.read(devices)
    assert reading.allocated == sum(torch.cuda.memory_allocated(d) for d in devices)
    assert reading.reserved == sum(torch.cuda.memory_reserved(d) for d in devices)
    assert reading.peak == sum(torch.cuda.max_memory_allocated(d) for d in devices)
    for d in devices:
        assert reading.per_device[f"cuda:{d}"]["allocated"] == torch.cuda.memory_allocated(d)
    del held


def test_two_gpu_auto_split_other_is_exact_and_non_negative(tiny_models: dict[str, Path]) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs for a split")
    total = sum(_bytes_by_top_module().values())
    cls = model_class(tiny_config("tiny/blip2-opt"))
    model = cls.from_pretrained(
        ensure_tiny("tiny/blip2-opt"), device_map="auto", max_memory={0: total // 2, 1: 4 * total, "cpu": 0}
    )
    assert allocator.model_cuda_devices(model) == [0, 1]
    place = placement(model)
    assert set(place) == {"cuda:0", "cuda:1"} and sum(place.values()) == total
    probe = PhaseProbe(model, lambda *a, **k: None, cuda=True, cuda_device=0)
    assert probe.devices == [0, 1]
    probe.start_interval()
    rec = probe.measure()
    assert rec["allocated"] == sum(torch.cuda.memory_allocated(d) for d in (0, 1))
    assert set(rec["devices"]) == {"cuda:0", "cuda:1"}
    assert rec["other"] == rec["allocated"] - rec["params"] >= 0  # nothing but the parameters counted yet
    model.train()
    with probe.saved.track():
        out = model(**_batch(model, input_device(model)))
    after_fwd = probe.measure()
    out.loss.backward()
    after_bwd = probe.measure()
    for rec in (after_fwd, after_bwd):
        assert rec["other"] >= 0, rec
        assert rec["allocated"] == sum(v["allocated"] for v in rec["devices"].values())


def test_seed_001_cpu_offload_map_on_a_gpu(tiny_models: dict[str, Path]) -> None:
    expected = _bytes_by_top_module()
    cls = model_class(tiny_config("tiny/blip2-opt"))
    model = cls.from_pretrained(ensure_tiny("tiny/blip2-opt"), device_map=dict(SEED_001))
    place = placement(model)
    assert "meta" not in place
    # The host share: the offloaded modules' weights (query_tokens, a parameter of the root module, is moved to the
    # main device by accelerate's root hook; counted on the host only if it stayed there).
    on_host = expected["query_tokens"] if model.query_tokens.device.type == "cpu" else 0
    assert place["cpu"] == sum(expected[m] for m in OFFLOADED) + on_host
    assert place["cuda:0"] == sum(expected.values()) - place["cpu"]
    assert input_device(model) == torch.device("cuda", 0)
    assert allocator.model_cuda_devices(model) == [0]
    probe = PhaseProbe(model, lambda *a, **k: None, cuda=True, cuda_device=0)
    rec = probe.measure()
    assert rec["params"] == sum(expected.values())
    assert rec["allocated"] == torch.cuda.memory_allocated(0)
    with torch.no_grad():
        out = model(**_batch(model, input_device(model)))
    assert torch.isfinite(out.loss).item()


def test_train_default_is_the_own_gpu_and_step_0_peak_is_not_the_load_peak(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    from blipmon.runner.child import record

    cfg = resolve(
        "tiny/blip2-opt",
        ["train.num_train_samples=8", "train.batch_size=2", "train.accumulate_grad_batches=2",
         "train.max_epochs=1", "runtime.sample_hz=5"],
    )  # fmt: skip
    assert cfg["model"]["device_map"] == "auto"
    loaded = load_model(cfg, cuda=True, cuda_index=0)
    assert set(placement(loaded.model)) == {"cuda:0"}  # never split, however many GPUs the machine has
    del loaded
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_config(run_dir, cfg)
    assert record(cfg, run_dir) == 0
    run = load_run(run_dir)
    assert run.load is not None and run.load["placement"] == {"cuda:0": sum(_bytes_by_top_module().values())}
    first = run.phases[0]
    assert (first["step"], first["micro_step"], first["phase"]) == (0, 0, "before_fwd")
    # Nothing is allocated between the reset after setup and the first boundary: its peak is what is allocated.
    assert first["peak"] == first["allocated"]
    assert all(p["other"] >= 0 for p in run.phases)
    assert all(isinstance(s["loss"], float) for s in run.steps)
