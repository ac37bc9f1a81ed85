"""The estimate's GPU terms: what a CUDA run needs beside its allocated peak (issue 15, item 9).

Each term is checked against a figure worked out here by hand from the source that allocates it (the caching
allocator's segment rules, torch's cuBLAS workspace sizes, NCCL's buffer sizes, DeepSpeed's offload buffer), and
the verdict against a card whose allocated peak fits while reserved memory plus the context does not. No GPU
exists here: the local GPU (free memory, context) is replaced where a test needs one.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from blipmon.core import config
from blipmon.estimate import gpu, timeline
from blipmon.estimate.compare import render_verdict_line

MIB = 1024**2
GIB = 1024**3
CARD = 80 * GIB


@pytest.fixture(autouse=True)
def no_local_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: None)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)


def cuda_estimate(name: str, *sets: str, capacity: int = CARD) -> Any:
    return timeline.estimate(config.resolve(name, list(sets)), capacity_bytes=capacity, device="cuda")


# -- the caching allocator -------------------------------------------------------------------------------------------


def test_a_small_tensor_takes_512_bytes_of_a_2_mib_segment() -> None:
    p = gpu.pack([100])
    assert (p.requested, p.allocated, p.reserved) == (100, 512, 2 * MIB)
    assert p.rounding == 412 and p.segments == 2 * MIB - 512


def test_small_tensors_share_2_mib_segments() -> None:
    # 5 x 1000 B -> 5 x 1024 B blocks; 3000 x 1024 B = 3,072,000 B -> two 2 MiB segments
    assert gpu.pack([1000] * 5) == gpu.Packing(5000, 5 * 1024, 2 * MIB, 2 * MIB - 5 * 1024)
    p = gpu.pack([1000] * 3000)
    assert (p.allocated, p.reserved) == (3000 * 1024, 4 * MIB)


def test_a_1_to_10_mib_tensor_is_carved_from_a_20_mib_segment() -> None:
    p = gpu.pack([3 * MIB])
    assert (p.allocated, p.reserved, p.tails) == (3 * MIB, 20 * MIB, 17 * MIB)
    p = gpu.pack([3 * MIB] * 7)  # 21 MiB of blocks: two 20 MiB segments
    assert (p.allocated, p.reserved) == (21 * MIB, 40 * MIB)


def test_a_large_tensor_gets_its_own_segment_rounded_to_2_mib() -> None:
    # 11 MiB -> a 12 MiB segment; the 1 MiB remainder is not above kSmallSize, so the block keeps it (allocated)
    p = gpu.pack([11 * MIB])
    assert (p.allocated, p.reserved, p.segments) == (12 * MIB, 12 * MIB, 0)
    # 10 MiB + 1 B -> block 10 MiB + 512 B; segment 12 MiB; remainder 2 MiB - 512 B > 1 MiB is split off, free
    p = gpu.pack([10 * MIB + 1])
    assert (p.allocated, p.reserved) == (10 * MIB + 512, 12 * MIB)
    assert p.segments == 2 * MIB - 512 and p.per_tensor_segments == p.segments and p.tails == 0
    # a multiple of 2 MiB wastes nothing; empty tensors allocate nothing
    assert gpu.pack([64 * MIB, 0]) == gpu.Packing(64 * MIB, 64 * MIB, 64 * MIB, 0)


def test_the_allocator_constants_are_torchs() -> None:
    assert (gpu.K_MIN_BLOCK_SIZE, gpu.K_SMALL_SIZE, gpu.K_SMALL_BUFFER) == (512, 1048576, 2097152)
    assert (gpu.K_LARGE_BUFFER, gpu.K_MIN_LARGE_ALLOC, gpu.K_ROUND_LARGE) == (20971520, 10485760, 2097152)


# -- cuBLAS, NCCL, DeepSpeed, the context ----------------------------------------------------------------------------


def test_cublas_workspace_sizes_follow_torchs_defaults_and_the_variable() -> None:
    assert gpu.cublas_workspace_bytes((9, 0)) == 4096 * 1024 * 8 == 32 * MIB  # H100: ":4096:8"
    assert gpu.cublas_workspace_bytes((10, 0)) == 32 * MIB  # Blackwell too
    assert gpu.cublas_workspace_bytes((8, 0)) == 4096 * 1024 * 2 + 16 * 1024 * 8 == 8_519_680  # A100
    assert gpu.cublas_workspace_bytes(None) == 32 * MIB  # card unknown: the larger default
    assert gpu.cublas_workspace_bytes((8, 0), ":4096:8") == 32 * MIB
    assert gpu.cublas_workspace_bytes((9, 0), ":16:8") == 16 * 1024 * 8
    assert gpu.cublas_workspace_bytes((9, 0), ":128:8:64:16:32:32") == 3072 * 1024  # torch's own test case
    assert gpu.cublas_workspace_bytes((8, 0), "garbage") == 8_519_680  # torch warns and keeps its default


def test_a_training_step_holds_two_cublas_workspaces(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward thread and autograd's device thread each have one (thread-local map, default stream)."""
    assert cuda_estimate("tiny/blip2-opt").overheads.cublas_workspaces == 2 * 32 * MIB
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:2")
    assert cuda_estimate("tiny/blip2-opt").overheads.cublas_workspaces == 2 * 8 * MIB


def test_nccl_buffers_and_ddp_buckets_only_with_several_ranks() -> None:
    one = cuda_estimate("tiny/blip2-opt").overheads
    assert one.nccl_buffers == 0 and one.ddp_buckets == 0
    ddp = cuda_estimate("tiny/blip2-opt", "train.strategy=ddp", "train.devices=2")
    # per channel and connection: LL 8*512*8*16 + LL128 120*640*8*8 + SIMPLE 4 MiB; 16 channels x 2 connections
    assert ddp.overheads.nccl_buffers == 16 * 2 * (524_288 + 4_915_200 + 4_194_304) == 308_281_344
    # DDP's flat buckets (gradient_as_bucket_view=False) hold every gradient once more: fp32, 4 bytes each
    from blipmon.estimate.build import build_meta, resolve_spec

    cfg = config.resolve("tiny/blip2-opt")
    model = build_meta(resolve_spec(cfg), resolve_spec(cfg).arch, cfg)
    assert ddp.overheads.ddp_buckets == 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert any("NCCL" in n for n in ddp.notes)


@pytest.mark.parametrize(("precision", "itemsize"), [("bf16-true", 2), ("32-true", 4)])
def test_deepspeeds_offload_buffer_is_the_largest_trainable_parameter(precision: str, itemsize: int) -> None:
    """``temp_grad_buffer_for_gpu_offload = torch.zeros(largest_param_numel, dtype=self.dtype)`` on the device.

    In tiny/blip2-opt the largest parameter is OPT's token embedding (tied to the head): vocab 1024 x hidden 64.
    The next largest are far smaller: the ViT patch embedding 64 x 3 x 16 x 16 = 49,152, the FFN 64 x 256.
    """
    sets = ("train.strategy=deepspeed_stage_2_offload", "train.optim=deepspeed_cpu", f"train.precision={precision}")
    est = cuda_estimate("tiny/blip2-opt", *sets)
    assert est.overheads.deepspeed_offload_buffer == 1024 * 64 * itemsize
    from blipmon.estimate.build import build_meta, resolve_spec

    cfg = config.resolve("tiny/blip2-opt", list(sets))
    model = build_meta(resolve_spec(cfg), resolve_spec(cfg).arch, cfg)
    assert max(p.numel() for p in model.parameters() if p.requires_grad) == 1024 * 64
    assert cuda_estimate("tiny/blip2-opt").overheads.deepspeed_offload_buffer == 0  # no DeepSpeed: none


def test_the_cuda_context_is_a_named_constant_outside_the_allocator() -> None:
    assert gpu.CUDA_CONTEXT_BYTES == 500 * MIB
    o = cuda_estimate("tiny/blip2-opt").overheads
    assert o.cuda_context == 500 * MIB
    assert o.total == o.reserved + o.cuda_context + o.nccl_buffers
    assert o.reserved == o.inside_allocator + o.allocator_segments


# -- the allocator terms of an estimate ------------------------------------------------------------------------------


def test_the_tensors_packed_are_the_models_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-tensor lists add up to the exact category bytes, and AdamW's state is two tensors per parameter."""
    from blipmon.estimate import static
    from blipmon.estimate.build import build_meta, resolve_spec

    for optim in ("adamw", "adam_8bit", "paged_adamw_8bit"):
        cfg = config.resolve("tiny/blip2-opt", [f"train.optim={optim}"])
        model = build_meta(resolve_spec(cfg), resolve_spec(cfg).arch, cfg)
        st = static.analyse(model, cfg, frozenset(), "cuda")
        assert sum(st.resident_tensors) == st.params + st.quant_state + st.buffers
        assert sum(st.grad_tensors) == st.grads
        assert sum(st.optim_device_tensors) == st.optim_device
        if optim == "adamw":
            sizes = sorted(4 * p.numel() for p in model.parameters() if p.requires_grad)
            assert sorted(st.optim_device_tensors) == sorted(sizes + sizes)


def test_allocator_rounding_and_segments_of_an_estimate() -> None:
    """Known tensors packed exactly; the rest of the peak takes the traced saved tensors' per-tensor share."""
    from blipmon.estimate.timeline import _PROFILES, profile_key

    est = cuda_estimate("tiny/blip2-opt")
    peak = est.phase(est.peak_phase, est.peak_step)
    assert (peak.phase, peak.step) == ("after_bwd", 1)  # grads and AdamW state exist, no optimizer temporary
    from blipmon.estimate import static
    from blipmon.estimate.build import build_meta, resolve_spec

    cfg = config.resolve("tiny/blip2-opt")
    model = build_meta(resolve_spec(cfg), resolve_spec(cfg).arch, cfg)
    st = static.analyse(model, cfg, frozenset(), "cuda")
    fixed = gpu.pack([*st.resident_tensors, *st.grad_tensors, *st.optim_device_tensors])
    # This configuration's own profile: other tests of the process may have traced other tiny/blip2-opt ones.
    prof, _s = _PROFILES[profile_key(cfg, "cuda")]
    saved = gpu.pack(size for *_x, size, _w in prof.saved)
    rest = peak.total - fixed.requested
    assert est.overheads.allocator_rounding == fixed.rounding + rest * saved.rounding // saved.requested
    assert est.overheads.allocator_segments == fixed.segments + rest * saved.per_tensor_segments // saved.requested


# -- the verdict -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "sets"), [("tiny/blip2-opt", ()), ("h100/opt-6.7b", ())])
def test_an_allocated_peak_that_fits_is_oom_when_reserved_and_the_context_do_not(name: str, sets: tuple) -> None:
    big = cuda_estimate(name, *sets, capacity=1024**4)
    o = big.overheads
    assert o.allocator_segments > 0 and o.cuda_context == 500 * MIB
    # a card with room for the allocated peak and 100 MiB more: less than the context alone
    card = big.peak_bytes + 100 * MIB
    est = cuda_estimate(name, *sets, capacity=card)
    assert est.peak_bytes < card and est.verdict == "oom"
    assert est.runs_out is not None and est.headroom_bytes == card - big.peak_bytes - o.total
    # the allocated peak plus everything the allocator reserves fits, the context does not
    est = cuda_estimate(name, *sets, capacity=big.peak_bytes + o.reserved)
    assert est.verdict == "oom"
    assert cuda_estimate(name, *sets, capacity=big.peak_bytes + o.total).verdict == "fits"
    assert cuda_estimate(name, *sets, capacity=big.peak_bytes + o.total - 1).verdict == "oom"


def test_the_json_keeps_its_fixed_fields_and_adds_the_terms() -> None:
    out = cuda_estimate("tiny/blip2-opt").to_json()
    fixed = {"gpu_memory_bytes", "phases", "peak_bytes", "peak_phase", "verdict", "seconds"}
    assert set(out) == fixed | {"overheads", "capacity_source"}
    terms = out["overheads"]
    assert set(terms) == set(gpu.Overheads.FIELDS) | {"total"}
    assert terms["total"] == sum(v for k, v in terms.items() if k != "total")
    assert out["capacity_source"] == "given"
    cpu = timeline.estimate(config.resolve("tiny/blip2-opt"), device="cpu").to_json()
    assert set(cpu) == fixed  # a CPU estimate is unchanged: no GPU terms


def test_a_cpu_estimate_keeps_its_runtime_and_has_no_gpu_terms() -> None:
    est = timeline.estimate(config.resolve("tiny/blip2-opt"), device="cpu", capacity_bytes=CARD)
    assert est.runtime_bytes == timeline.CPU_RUNTIME_BYTES == 420 * MIB
    assert est.overheads == gpu.NO_OVERHEADS
    assert not any("GPU overheads" in n for n in est.notes)


def test_the_cli_text_lists_the_terms(capsys: pytest.CaptureFixture[str]) -> None:
    from blipmon import cli

    assert cli.main(["estimate", "tiny/blip2-opt", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("note") and "GPU overheads" in x)
    assert "cuBLAS workspaces 64.00 MiB" in line and "CUDA context 500.00 MiB" in line
    peak = next(x for x in out.splitlines() if x.startswith("peak"))
    assert "GPU overheads" in peak and "runtime" not in peak
    assert "free in allocator segments" in line


def test_a_saved_prediction_is_judged_with_its_own_overheads() -> None:
    phases = [
        {"step": 0, "phase": "after_bwd", "params": 0, "grads": 0, "optim": 0, "acts": 0, "total": 38 * GIB},
        {"step": 1, "phase": "after_bwd", "params": 0, "grads": 0, "optim": 0, "acts": 0, "total": 45 * GIB},
    ]
    pred = {"gpu_memory_bytes": 40 * GIB, "phases": phases, "verdict": "oom", "overheads": {"total": 3 * GIB}}
    # 38 GiB + 3 GiB of overheads is over 40 GiB: step 0 already
    assert "run out at step 0 after_bwd" in render_verdict_line(pred, on_gpu=True, oom=None)
    old = {k: v for k, v in pred.items() if k != "overheads"}  # saved before the terms: the context alone
    assert "run out at step 1 after_bwd" in render_verdict_line(old, on_gpu=True, oom=None)


# -- free memory of the local GPU ------------------------------------------------------------------------------------


def fake_gpu(free: int | None, own_context: bool = False) -> gpu.LocalGpu:
    return gpu.LocalGpu(total=CARD, free=free, own_context=own_context, capability=(8, 0), how="NVML (device 0)")


def test_a_local_gpu_is_judged_by_its_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: CARD)
    monkeypatch.setattr(timeline, "_local_gpu", lambda: fake_gpu(10 * GIB))
    est = timeline.estimate(config.resolve("tiny/blip2-opt", ["model.device_map=cuda"]))
    assert est.capacity_bytes == 10 * GIB and est.capacity_source.startswith("free on the local GPU")
    assert est.overheads.cuda_context == 500 * MIB  # the run's own context is still to come
    assert est.overheads.cublas_workspaces == 2 * 8_519_680  # an A100: the smaller default workspace
    # just enough free memory for the peak and every term, then one byte less
    need = est.peak_bytes + est.overheads.total
    monkeypatch.setattr(timeline, "_local_gpu", lambda: fake_gpu(need))
    assert timeline.estimate(config.resolve("tiny/blip2-opt", ["model.device_map=cuda"])).verdict == "fits"
    monkeypatch.setattr(timeline, "_local_gpu", lambda: fake_gpu(need - 1))
    assert timeline.estimate(config.resolve("tiny/blip2-opt", ["model.device_map=cuda"])).verdict == "oom"


def test_a_process_holding_its_context_does_not_count_it_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: CARD)
    monkeypatch.setattr(timeline, "_local_gpu", lambda: fake_gpu(10 * GIB, own_context=True))
    assert timeline.estimate(config.resolve("tiny/blip2-opt", ["model.device_map=cuda"])).overheads.cuda_context == 0
    monkeypatch.setattr(timeline, "_local_gpu", lambda: fake_gpu(None, own_context=True))
    est = timeline.estimate(config.resolve("tiny/blip2-opt", ["model.device_map=cuda"]))
    assert est.capacity_bytes == CARD and "free memory unknown" in est.capacity_source
    assert est.overheads.cuda_context == 500 * MIB  # judged against the total: the context is in the terms


def test_a_given_capacity_wins_over_the_local_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: CARD)
    monkeypatch.setattr(timeline, "_local_gpu", lambda: fake_gpu(GIB))
    est = cuda_estimate("tiny/blip2-opt", capacity=40 * GIB)
    assert est.capacity_bytes == 40 * GIB and est.capacity_source == "given"


class FakeProps:
    total_memory = CARD
    major, minor = 9, 0


def _no_context_gpu(monkeypatch: pytest.MonkeyPatch, module: Any, identity: Any) -> None:
    """torch sees a GPU but holds no context; NVML is ``module``; torch names its device with ``identity``."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: FakeProps())
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)

    def no_context(*_a: Any) -> Any:
        raise AssertionError("mem_get_info creates a CUDA context")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_context)
    real = gpu._nvml_free
    monkeypatch.setattr(gpu, "_nvml_free", lambda i: real(i, module=module, identity=identity))


def test_free_memory_comes_from_nvml_without_a_cuda_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """No context in this process: NVML's figure for torch's device, never ``mem_get_info``, which would
    create a context the process then holds (the dashboard for its whole life). torch's cuda:0 is NVML's
    GPU 3 here (CUDA numbers the fastest first, or CUDA_VISIBLE_DEVICES renumbers): found by UUID."""
    import fake_nvml as fk

    gpus = [fk.FakeGpu(uuid=fk.uuid(i), total=CARD, used=CARD - (i + 4) * GIB) for i in range(4)]
    _no_context_gpu(monkeypatch, fk.make(gpus), lambda i: (fk.bare(gpus[3].uuid), None))
    g = gpu.local_gpu(0)
    assert g is not None and g.free == 7 * GIB and not g.own_context and g.total == CARD
    assert g.how == "NVML (cuda:0 (GPU 3), matched by uuid)"


def test_on_a_mig_gpu_the_mig_devices_free_memory_is_judged_not_the_cards(monkeypatch: pytest.MonkeyPatch) -> None:
    import fake_nvml as fk

    mig = fk.FakeGpu(uuid=fk.mig_uuid(10), total=10 * GIB, used=3 * GIB)
    parent = fk.FakeGpu(uuid=fk.uuid(0), total=CARD, used=5 * GIB, migs=[mig])
    _no_context_gpu(monkeypatch, fk.make([parent]), lambda i: (fk.bare(mig.uuid), None))
    g = gpu.local_gpu(0)
    assert g is not None and g.free == 7 * GIB  # the slice's, not the parent's 75 GiB


def test_with_its_own_context_the_process_asks_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: FakeProps())
    monkeypatch.setattr(gpu, "_has_context", lambda i: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (5 * GIB, CARD))
    g = gpu.local_gpu(0)
    assert g is not None and (g.free, g.own_context) == (5 * GIB, True)


def test_without_nvml_the_card_is_judged_and_said(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: FakeProps())
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    g = gpu.local_gpu(0)
    assert g is not None and g.free is None and "NVML unavailable" in g.how
    assert "free memory unknown" in gpu.describe_local(g)


def test_no_gpu_is_none() -> None:
    assert gpu.local_gpu(0) is None  # this machine: torch sees no GPU


# -- the calibration script --------------------------------------------------------------------------------------------


def test_the_calibration_script_pairs_each_term_with_its_measured_figure() -> None:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "predicted_vs_measured.py"
    spec = importlib.util.spec_from_file_location("predicted_vs_measured", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    terms = {
        "allocator_rounding": 10 * MIB,
        "allocator_segments": 300 * MIB,
        "cublas_workspaces": 64 * MIB,
        "ddp_buckets": 0,
        "deepspeed_offload_buffer": 0,
        "nccl_buffers": 0,
        "cuda_context": 500 * MIB,
        "total": 874 * MIB,
    }
    summary = {"peaks": {"allocated": 40 * GIB, "reserved": 40 * GIB + 256 * MIB, "device_used": 41 * GIB}}
    pairs = mod.overhead_pairs({"overheads": terms}, summary, 40 * GIB - 70 * MIB)
    assert pairs["segments"] == {"predicted": 300 * MIB, "measured": 256 * MIB}
    assert pairs["inside_allocator"] == {"predicted": 74 * MIB, "measured": 70 * MIB}
    assert pairs["outside_allocator"] == {"predicted": 500 * MIB, "measured": 1024 * MIB - 256 * MIB}
    assert mod.overhead_pairs({"phases": []}, summary, None) == {}  # a CPU prediction: nothing to calibrate
    row = {"preset": "p", "status": "ok", "verdict": "fits", "predicted_peak": GIB, "measured_peak": GIB}
    line = mod._line({**row, "ratio": 1.0, "exact": True, "acts_error_max": 0.0, "overheads": pairs})
    assert "segments: predicted 300.0, measured 256.0 (reserved - allocated)" in line
