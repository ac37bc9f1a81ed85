"""The estimator's rules, each checked against the real thing it stands for.

- optimizer state: torch's AdamW and SGD and bitsandbytes' 8-bit Adam really step on small CPU tensors (below and
  above bitsandbytes' 4096-element threshold), and their state storages must equal the formula;
- 4-bit weights: a real ``Linear4bit`` quantized on the CPU weighs what the packed-size rule says;
- depth scaling: a tiny model made three layers deep is traced whole, and its two-layer copy scaled up must give
  the same activations and forward/backward peaks to the byte;
- CUDA semantics on fake tensors: torch's GPU attention kernels and fused dropout keep what they keep on a GPU;
- the timeline: what coexists at each phase of step 0 and step 1, the peak, the verdict, the JSON keys.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from blipmon.core import config
from blipmon.core.config import ConfigError
from blipmon.estimate import activations, build, static, timeline
from blipmon.runner.probes import optimizer_tensors, storage_bytes

SIZES = [(3,), (64, 63), (4096,), (80, 100), (300, 257)]  # around bitsandbytes' 4096-element threshold


def _stepped(optim: str, dtype: torch.dtype) -> tuple[list[torch.nn.Parameter], Any]:
    from blipmon.runner.train import build_optimizer

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s).to(dtype)) for s in SIZES]
    opt = build_optimizer(optim, params, 1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return params, opt


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("optim", ["adamw", "sgd", "adam_8bit", "paged_adamw_8bit"])
def test_optimizer_state_formula_equals_real_state(optim: str, dtype: torch.dtype) -> None:
    params, opt = _stepped(optim, dtype)
    measured, _ = storage_bytes(optimizer_tensors(opt))
    sizes = [(p.numel(), p.numel() * p.element_size(), p.dtype) for p in params]
    predicted, _dev, _host, _temp = static._optimizer(optim, sizes, "cpu")
    assert predicted == measured


def test_adamw_step_scalars_stay_on_the_host_for_cuda() -> None:
    sizes = [(10, 40, torch.float32), (5, 20, torch.float32)]
    total, on_device, _, temp = static._optimizer("adamw", sizes, "cuda")
    assert total - on_device == 2 * static.ADAM_STEP_BYTES
    assert temp == 60  # foreach: exp_avg_sq.sqrt() of the whole dtype group at once


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_packed_4bit_weight_size(quant_type: str) -> None:
    """blipmon's packed-size rule (``static.analyse`` on the unquantized meta layer, as the estimator builds it)
    against a real ``Linear4bit`` quantized on the CPU: the packed weight, and its absmax and code table."""
    import bitsandbytes as bnb

    cfg = config.resolve("tiny/blip2-opt", ["train.optim=sgd"])
    # As load_model asks transformers for them: no double quantization, so absmax stays fp32 per 64 weights.
    kw = dict(bias=False, quant_type=quant_type, compute_dtype=torch.float32, compress_statistics=False)
    for out_f, in_f in [(64, 64), (48, 33), (7, 9)]:
        real = bnb.nn.Linear4bit(in_f, out_f, **kw).to("cpu")  # quantizes on the move, as from_pretrained does
        qs = real.weight.quant_state
        packed = real.weight.untyped_storage().nbytes()
        state = qs.absmax.untyped_storage().nbytes() + qs.code.untyped_storage().nbytes()
        assert packed == (out_f * in_f + 1) // 2  # two 4-bit weights per byte
        with torch.device("meta"):
            meta = torch.nn.Sequential(bnb.nn.Linear4bit(in_f, out_f, **kw))
        st = static.analyse(meta, cfg, frozenset(), "cpu")
        assert (st.params, st.quant_state) == (packed, state), (out_f, in_f)


def test_static_rules_on_a_qlora_meta_model() -> None:
    cfg = config.resolve("tiny/blip2-opt", ["train.qlora=true", "train.precision=bf16-true"])
    spec = build.resolve_spec(cfg)
    assert spec.quantization == "4bit-nf4"  # QLoRA implies the 4-bit base, as load_model decides
    model = build.build_meta(spec, spec.arch, cfg)
    st = static.analyse(model, cfg, frozenset(), "cpu")
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad and p.dtype == torch.float32 for p in lora)
    assert st.grads == sum(p.numel() * 4 for p in lora)
    assert st.quant_state > 0
    # prepare_model_for_kbit_training upcast everything that is not 4-bit to fp32
    assert all(p.dtype == torch.float32 for p in model.parameters() if type(p).__name__ != "Params4bit")


def _deep_spec(layers: int) -> tuple[dict[str, Any], Any]:
    """tiny/blip2-t5 with ``layers`` layers in every stack (the real tiny model has two)."""
    cfg = config.resolve("tiny/blip2-t5", ["train.batch_size=2", "data.max_length=8"])
    spec = build.resolve_spec(cfg)
    arch = copy.deepcopy(spec.arch)
    arch.vision_config.num_hidden_layers = layers
    arch.qformer_config.num_hidden_layers = layers
    arch.text_config.num_layers = layers
    arch.text_config.num_decoder_layers = layers
    spec.arch = arch
    return cfg, spec


def _trace(spec: Any, arch: Any, cfg: dict[str, Any], device: str) -> tuple[activations.Profile, dict[str, Any]]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = build.build_meta(spec, arch, cfg)
    sigs = activations.layer_signatures(model)
    activations.to_fake(model, FakeTensorMode(allow_non_fake_inputs=True))
    return activations.trace(model, cfg, spec, device, sigs), sigs


@pytest.mark.parametrize("act_ckpt", [False, True])
@pytest.mark.filterwarnings("ignore")
def test_short_copy_scaled_to_depth_equals_the_full_trace(act_ckpt: bool) -> None:
    cfg, spec = _deep_spec(3)
    cfg["train"]["act_ckpt"] = act_ckpt
    full, full_sigs = _trace(spec, spec.arch, cfg, "cuda")
    short, short_sigs = _trace(spec, build.short_config(spec.arch), cfg, "cuda")
    extra = {}
    for stack, sigs in full_sigs.items():
        for sig in set(sigs):
            more = sigs.count(sig) - short_sigs[stack].count(sig)
            if more:
                extra[(stack, sig)] = more
    assert extra, "the short copy should have fewer layers"
    for grads_exist in (False, True):
        assert short.extrapolate(extra, grads_exist=grads_exist) == full.extrapolate({}, grads_exist=grads_exist)


def test_cuda_semantics_keep_what_gpu_kernels_keep() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with mode:
        q, k, v = (torch.randn(2, 4, 20, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        x = torch.randn(8, 32, requires_grad=True)
        mask = torch.zeros(2, 1, 20, 20, dtype=torch.bfloat16)
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with activations.cuda_semantics(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.nn.functional.scaled_dot_product_attention(q, k, v)  # flash: q, k, v, out, fp32 log-sum-exp
        flash = list(kept)
        kept.clear()
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        efficient = list(kept)
        kept.clear()
        torch.nn.functional.dropout(x * 2, 0.1, True)
        dropout = list(kept)
    assert not any(t.dim() == 4 and t.shape[-1] == t.shape[-2] for t in flash), "flash keeps no attention matrix"
    assert any(t.dtype == torch.float32 and t.shape == (2, 4, 20) for t in flash)
    assert any(t.shape == (2, 4, 20, 20) for t in efficient), "memory-efficient attention keeps its (padded) bias"
    assert [t.dtype for t in dropout] == [torch.bool]
    assert torch.nn.functional.dropout is activations._ORIGINAL_DROPOUT  # restored


def _static(**kw: int) -> static.Static:
    base = dict(
        params=100, quant_state=0, buffers=0, trainable_params=25, total_params=25, grads=100, optim=200,
        optim_device=200, optim_host=0, optim_step_temp=100, max_grad=50,
    )  # fmt: skip
    base.update(kw)
    return static.Static(**base)


def test_timeline_what_coexists_when() -> None:
    cfg = config.resolve("tiny/blip2-opt", ["train.accumulate_grad_batches=2"])
    phases = timeline._timeline(cfg, _static(), acts=1000, fwd0=1100, bwd0=1200, bwd1=900, offload=False)
    by = {(p.phase, p.step): p for p in phases}
    # step 0: no optimizer state until the step; accumulated gradients coexist with the last micro-step's forward
    assert by[("before_fwd", 0)].grads == 100 and by[("before_fwd", 0)].optim == 0
    assert by[("after_fwd", 0)].acts == 1000 and by[("after_fwd", 0)].total == 100 + 100 + 1100
    assert by[("after_bwd", 0)].acts == 0
    # the first backward of a step makes the gradients; later ones add into them
    assert by[("after_bwd", 0)].total == max(100 + 1200, 100 + 100 + 900)
    assert by[("after_opt_step", 0)].optim == 200 and by[("after_opt_step", 0)].total == 100 + 100 + 200 + 100
    # step 1: the state is there from the start, and the previous step's gradients until zero_grad
    assert by[("before_fwd", 1)].optim == 200 and by[("before_fwd", 1)].total == 100 + 100 + 200
    assert by[("after_fwd", 1)].total == 100 + 200 + 100 + 1100


def test_timeline_without_accumulation_starts_each_step_without_gradients() -> None:
    cfg = config.resolve("tiny/blip2-opt")
    phases = timeline._timeline(cfg, _static(), acts=1000, fwd0=1100, bwd0=1200, bwd1=900, offload=False)
    by = {(p.phase, p.step): p for p in phases}
    assert by[("before_fwd", 1)].grads == 0 and by[("after_fwd", 1)].grads == 0
    assert by[("after_fwd", 1)].total == 100 + 200 + 1100


def test_estimate_json_is_the_fixed_object_and_verdict_follows_capacity() -> None:
    cfg = config.resolve("tiny/blip2-opt")
    est = timeline.estimate(cfg, device="cpu")
    out = est.to_json()
    assert set(out) == {"gpu_memory_bytes", "phases", "peak_bytes", "peak_phase", "verdict", "seconds"}
    assert [(p["phase"], p["step"]) for p in out["phases"]] == [(ph, s) for s in (0, 1) for ph in timeline.PHASES]
    assert all(set(p) == {"phase", "step", "params", "grads", "optim", "acts", "total"} for p in out["phases"])
    assert out["peak_bytes"] == max(p["total"] for p in out["phases"])
    assert out["peak_phase"] == est.peak_phase
    small = est.peak_bytes + est.runtime_bytes - 1
    assert timeline.estimate(cfg, device="cpu", capacity_bytes=small).verdict == "oom"
    assert timeline.estimate(cfg, device="cpu", capacity_bytes=small + 1).verdict == "fits"
    # One byte short of the peak plus the runtime: OOM by exactly one byte; one more byte: fits with none to spare.
    short, enough = (timeline.estimate(cfg, device="cpu", capacity_bytes=c) for c in (small, small + 1))
    assert short.explain().splitlines()[0].endswith(": OOM") and short.explain().splitlines()[1] == "  short by 1 B"
    assert enough.explain().splitlines()[0].endswith(": FITS") and enough.explain().splitlines()[1] == "  headroom 0 B"


def test_target_device_and_capacity_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: None)
    gpu = config.resolve("h100/baseline")
    auto = config.resolve("tiny/blip2-opt")
    cpu = config.resolve("tiny/blip2-opt", ["model.device_map=cpu"])
    assert timeline.target_device(gpu, None, None) == "cuda"
    assert timeline.target_device(auto, None, None) == "cpu"  # no GPU here: auto runs on the CPU
    assert timeline.target_device(auto, None, 80 * 1024**3) == "cuda"  # a GPU capacity means a GPU
    assert timeline.target_device(cpu, None, 80 * 1024**3) == "cpu"
    with pytest.raises(ConfigError, match="--gpu-memory"):
        timeline.capacity("cuda", None)
    assert timeline.capacity("cpu", None)[1] == "available host memory"


def test_blip_vqa_with_lora_and_checkpointing_estimates() -> None:
    # It used to fail in the runner and the estimator alike (an in-place add on a leaf); both share the fix.
    cfg = config.resolve("tiny/blip-vqa", ["train.lora.enabled=true", "train.act_ckpt=true"])
    # The tiny model needs a few MB: against this machine's available memory it can only fit.
    assert timeline.estimate(cfg, device="cpu").to_json()["verdict"] == "fits"


def test_predicted_vs_measured_pairs_last_micro_step_and_peaks() -> None:
    from blipmon.estimate import predicted_vs_measured

    pred = {
        "phases": [{"phase": "after_fwd", "step": 0, "params": 10, "grads": 5, "optim": 0, "acts": 40, "total": 70}]
    }
    rec = {"step": 0, "rank": 0, "phase": "after_fwd", "params": 10, "grads": 0, "optim": 0, "acts": 50}
    summary = {
        "phases": [
            {**rec, "micro_step": 0, "peak": 90},
            {**rec, "micro_step": 1, "grads": 5, "peak": 80},
            {**rec, "micro_step": 1, "rank": 1, "acts": 999, "peak": 1},
        ]
    }
    rows = {r["category"]: r for r in predicted_vs_measured(pred, summary)}
    assert rows["grads"]["measured"] == 5  # the last micro-step of rank 0
    assert rows["acts"]["error"] == pytest.approx(-0.2)
    # against the allocator's peak, the largest over the step's micro-steps
    assert rows["total"]["measured"] == 90 and rows["total"]["predicted"] == 70
    none = predicted_vs_measured(pred, {"phases": []})
    assert all(r["measured"] is None and r["error"] is None for r in none)
