"""The phase timeline: what coexists when, the peak, and the verdict against a memory capacity.

The runner's loop (``blipmon.runner.train.run_train``) fixes the order of events in every micro-step::

    before_fwd -> forward -> after_fwd -> backward -> after_bwd [-> optimizer.step() -> after_opt_step -> zero_grad]

- activations (tensors saved for backward) are created in the forward pass and released during backward;
- gradients appear during the first backward of a step and stay until ``zero_grad(set_to_none=True)`` after the
  optimizer step; later micro-steps of an accumulation window add into them in place;
- optimizer state is created inside the first ``step()`` and lives for the rest of the run.

Each phase entry carries the four probe categories at that boundary (of the step's last micro-step, where
accumulated gradients coexist with the forward) and ``total``: the predicted peak of the interval that ends at
that boundary, over all micro-steps of the step. That is the figure the CUDA allocator reports as the phase's
``peak``; it adds to the categories what the boundaries never see: temporaries of the forward and backward pass
(fp32 logits and their gradient, gradient buffers of activations, checkpointed layers being recomputed), the
optimizer's own temporaries (``static.optimizer_step``: per implementation and device), the batch (and on a CPU
run, the batch being made before the forward), the losses the runner keeps for the step's mean, registered buffers
and bitsandbytes' quantization state. ``tests/integration/test_estimate_vs_reference.py`` holds every interval's
total to an independent count of live storages on the CPU, to the byte.

A CUDA run needs more than that peak: the verdict adds ``gpu.Overheads`` (the caching allocator's rounding and
segments, cuBLAS workspaces, DDP's buckets, NCCL's and DeepSpeed's buffers, the CUDA context) and judges the sum
against the local GPU's *free* memory when there is a GPU here, else against the capacity given. The phases
themselves stay the allocated figures the probe and ``max_memory_allocated`` report.

Why one module over ~500 lines: every interval's peak is built from the same list of what is alive when; the
verdict, the GPU overheads and "where it runs out" read that one list.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from blipmon.core.config import ConfigError, caption_tokens
from blipmon.estimate.gpu import CUDA_CONTEXT_BYTES, NO_OVERHEADS, Overheads

PHASES = ("before_fwd", "after_fwd", "after_bwd", "after_opt_step")
# What runs in the interval that ends at each boundary: where a run that does not fit would fail.
INTERVAL = {
    "before_fwd": "between steps",
    "after_fwd": "forward",
    "after_bwd": "backward",
    "after_opt_step": "optimizer step",
}
# The CUDA context alone (``gpu.CUDA_CONTEXT_BYTES``): what a saved prediction without ``overheads`` (made before
# they existed) is judged with. New CUDA estimates carry every term in ``Estimate.overheads``.
CUDA_RUNTIME_BYTES = CUDA_CONTEXT_BYTES
# Host memory of the runner child before it loads a model: Python, torch, transformers, peft, bitsandbytes
# (measured: ~400 MiB RSS at the first boundary of a tiny run).
CPU_RUNTIME_BYTES = 420 * 1024**2


@dataclass(frozen=True)
class PhaseEstimate:
    """One phase boundary of step 0 (the first optimizer step) or step 1 (steady state)."""

    phase: str
    step: int
    params: int
    grads: int
    optim: int
    acts: int
    total: int  # predicted peak of the interval ending here (all micro-steps of the step)

    @property
    def other(self) -> int:
        """Temporaries, batch, buffers and quantization state at the interval's peak.

        Never negative: on a GPU torch keeps AdamW's ``step`` scalars in host memory, so ``optim`` (counted like
        the probe, everywhere) can exceed what the device holds by 4 bytes per parameter tensor.
        """
        return max(0, self.total - (self.params + self.grads + self.optim + self.acts))

    def to_json(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "step": self.step,
            "params": self.params,
            "grads": self.grads,
            "optim": self.optim,
            "acts": self.acts,
            "total": self.total,
        }


@dataclass(frozen=True)
class Estimate:
    """A configuration's predicted memory. ``to_json()`` is the fixed ``blipmon estimate --json`` object."""

    name: str
    model_id: str
    device: str  # "cuda" | "cpu": whose memory the verdict is about
    capacity_bytes: int  # GPU memory (or available host memory for CPU runs)
    capacity_source: str  # where the capacity came from (argument, free on the local GPU, host memory)
    runtime_bytes: int  # memory needed besides the predicted peak: ``overheads.total`` on CUDA, the interpreter on CPU
    phases: tuple[PhaseEstimate, ...]
    peak_bytes: int
    peak_phase: str
    peak_step: int
    verdict: str  # "fits" | "oom"
    seconds: float
    # Details behind the numbers.
    total_params: int = 0
    trainable_params: int = 0
    quant_state_bytes: int = 0
    buffer_bytes: int = 0
    host_optim_bytes: int = 0  # optimizer memory in host RAM (DeepSpeed offload)
    optim_step_temp_bytes: int = 0
    short_layers: dict[str, tuple[int, int]] = field(default_factory=dict)  # stack -> (traced, full) layers
    notes: tuple[str, ...] = ()
    overheads: Overheads = NO_OVERHEADS  # CUDA only: the terms of runtime_bytes (gpu.Overheads)

    @property
    def runs_out(self) -> PhaseEstimate | None:
        """The first interval, in the order a run meets them, that needs more than the capacity; None if it fits.

        A run fails there, which can be before the peak: a configuration whose peak is in step 1's backward may
        already not survive step 0's optimizer step.
        """
        limit = self.capacity_bytes - self.runtime_bytes
        return next((p for p in self.phases if p.total > limit), None)

    def runs_out_text(self) -> str:
        """Where it would run out, for people: "step 0 after_bwd (backward), short by 1.2 GiB there"."""
        from blipmon.core.units import fmt_bytes

        p = self.runs_out
        if p is None:
            return ""
        short = p.total - (self.capacity_bytes - self.runtime_bytes)
        return f"step {p.step} {p.phase} ({INTERVAL.get(p.phase, p.phase)}), short by {fmt_bytes(short)} there"

    @property
    def headroom_bytes(self) -> int:
        """Capacity left at the peak (negative when it does not fit)."""
        return self.capacity_bytes - self.runtime_bytes - self.peak_bytes

    def phase(self, phase: str, step: int) -> PhaseEstimate:
        for p in self.phases:
            if p.phase == phase and p.step == step:
                return p
        raise KeyError((phase, step))

    def to_json(self) -> dict[str, Any]:
        """The fixed object; a CUDA estimate adds ``overheads`` (bytes per term and their ``total``, which the
        verdict adds to each phase's ``total``) and ``capacity_source`` (what ``gpu_memory_bytes`` is)."""
        out: dict[str, Any] = {
            "gpu_memory_bytes": int(self.capacity_bytes),
            "phases": [p.to_json() for p in self.phases],
            "peak_bytes": int(self.peak_bytes),
            "peak_phase": self.peak_phase,
            "verdict": self.verdict,
            "seconds": round(float(self.seconds), 3),
        }
        if self.device == "cuda":
            out["overheads"] = self.overheads.to_json()
            out["capacity_source"] = self.capacity_source
        return out

    def explain(self) -> str:
        """A few lines a person reads before launching: the peak, where it is, what dominates, the verdict."""
        from blipmon.core.units import fmt_bytes

        where = "GPU" if self.device == "cuda" else "host RAM"
        extra = "overheads" if self.device == "cuda" else "runtime"
        lines = [
            f"{self.name}: {self.model_id}, predicted peak {fmt_bytes(self.peak_bytes)} at step {self.peak_step} "
            f"{self.peak_phase} (+{fmt_bytes(self.runtime_bytes)} {extra}) vs {fmt_bytes(self.capacity_bytes)} "
            f"{where} ({self.capacity_source}): {self.verdict.upper()}",
        ]
        hr = self.headroom_bytes
        lines.append(
            f"  headroom {fmt_bytes(hr)}" if hr >= 0 else f"  short by {fmt_bytes(-hr)}",
        )
        p = self.phase(self.peak_phase, self.peak_step)
        parts = [("params", p.params), ("grads", p.grads), ("optim", p.optim), ("acts", p.acts), ("other", p.other)]
        lines.append("  at the peak: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in parts))
        if self.host_optim_bytes:
            lines.append(f"  host RAM for offloaded optimizer state and gradients: {fmt_bytes(self.host_optim_bytes)}")
        lines.extend(f"  note: {n}" for n in self.notes)  # on CUDA the first note lists the overheads
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------


def target_device(cfg: dict[str, Any], device: str | None, capacity_bytes: int | None) -> str:
    """Where the run would put the model: "cuda" or "cpu".

    ``device_map = "cpu"`` is the CPU; ``"cuda"`` or a table with a GPU entry is the GPU. ``auto`` and
    ``cpu-first`` follow the machine, as the runner does: the GPU when one is visible or a GPU capacity is given.
    """
    if device is not None:
        if device not in ("cuda", "cpu"):
            raise ConfigError(f"device {device!r}: expected 'cuda' or 'cpu'")
        return device
    dm = cfg["model"]["device_map"]
    if dm == "cpu":
        return "cpu"
    if dm == "cuda" or (isinstance(dm, dict) and any(str(v) not in ("cpu", "disk") for v in dm.values())):
        return "cuda"
    if isinstance(dm, dict):
        return "cpu"
    return "cuda" if capacity_bytes is not None or _local_gpu_bytes() is not None else "cpu"


def _local_gpu_bytes() -> int | None:
    """Total memory of the local GPU, or None without one (tests replace this to hide a GPU)."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001 - a broken driver is "no GPU" here
        return None
    return None


def _local_gpu() -> Any:
    """``gpu.LocalGpu`` of this machine (free memory without creating a CUDA context), or None."""
    from blipmon.estimate.gpu import local_gpu

    return local_gpu(0)


def capacity(device: str, capacity_bytes: int | None) -> tuple[int, str]:
    """(bytes, where they came from) for the verdict: the given capacity, the local GPU's free memory, host RAM."""
    cap, source, _local = _capacity(device, capacity_bytes)
    return cap, source


def _capacity(device: str, capacity_bytes: int | None) -> tuple[int, str, Any]:
    """``capacity`` plus the ``LocalGpu`` judged against (None when the capacity was given or it is a CPU run)."""
    if capacity_bytes is not None:
        if capacity_bytes <= 0:
            raise ConfigError(f"memory capacity {capacity_bytes}: expected a positive number of bytes")
        return int(capacity_bytes), "given", None
    if device == "cuda":
        local = _local_gpu_bytes()
        if local is None:
            raise ConfigError(
                "this configuration runs on a GPU and no GPU is visible here: give its memory with --gpu-memory "
                "(e.g. --gpu-memory 80GiB)"
            )
        from blipmon.estimate.gpu import describe_local

        g = _local_gpu()
        if g is None:
            return local, "local GPU", None
        # Free memory, not the card: other processes (a notebook, another job) hold part of it.
        return (g.free if g.free is not None else g.total), describe_local(g), g
    import psutil

    return int(psutil.virtual_memory().available), "available host memory", None


# ----------------------------------------------------------------------------------------------------------------

_PROFILES: dict[str, Any] = {}  # activation profiles of this process, by what decides them (never written to disk)
_MODELS: dict[str, Any] = {}  # full meta models, by what decides their parameters
_CACHE_SIZE = 16


def cache_put(cache: dict[str, Any], key: str, value: Any) -> None:
    """Keep ``value`` under ``key``, forgetting the oldest entry past ``_CACHE_SIZE`` (``estimate.modules`` too)."""
    if len(cache) >= _CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[key] = value


def profile_key(cfg: dict[str, Any], device: str) -> str:
    """What decides a traced training step: the cache key of an activation profile (``estimate.modules``' too)."""
    m, t = cfg["model"], cfg["train"]
    return json.dumps(
        [
            m["id"],
            m["quantization"],
            t["batch_size"],
            caption_tokens(cfg),
            cfg["data"]["image_placeholders"],
            t["precision"],
            t["act_ckpt"],
            t["lora"],
            t["qlora"],
            device,
        ],
        sort_keys=True,
        default=str,
    )


def model_key(cfg: dict[str, Any]) -> str:
    m, t = cfg["model"], cfg["train"]
    return json.dumps(
        [m["id"], m["quantization"], t["precision"], t["lora"], t["qlora"], cfg["job"]["kind"]], sort_keys=True
    )


def clear_cache() -> None:
    """Forget cached models and activation profiles (tests use it to time a cold estimate)."""
    _PROFILES.clear()
    _MODELS.clear()


def estimate(
    cfg: dict[str, Any], *, capacity_bytes: int | None = None, device: str | None = None, name: str | None = None
) -> Estimate:
    """Predict the per-phase memory of a training configuration, with no GPU and no weights.

    ``cfg`` is a configuration dict (validated here if it is not already); ``capacity_bytes`` is the memory to
    judge against (default: the local GPU's, or available host memory for a CPU run); ``device`` forces "cuda" or
    "cpu" instead of deciding from ``model.device_map``. Raises ``ConfigError`` for what the user must fix.
    """
    from blipmon.core import config as config_mod
    from blipmon.estimate import activations, build, static

    t0 = time.perf_counter()
    cfg = config_mod.validate(cfg)
    dev = target_device(cfg, device, capacity_bytes)
    cap, cap_source, local = _capacity(dev, capacity_bytes)
    spec = build.resolve_spec(cfg)
    if not spec.train:
        raise ConfigError(
            f"job.kind = {cfg['job']['kind']!r}: estimates cover training steps; "
            "`blipmon models` lists parameter bytes per dtype for loading"
        )
    notes = list(spec.notes)
    if caption_tokens(cfg) < cfg["data"]["max_length"]:
        notes.append(
            f"captions of {caption_tokens(cfg)} tokens (data.caption_tokens): a batch padded to its longest caption; "
            f"a caption of data.max_length = {cfg['data']['max_length']} tokens would need more"
        )
    else:
        notes.append(
            f"every caption padded to data.max_length = {cfg['data']['max_length']} tokens, as blipmon's batches are; "
            "a dataset padded to the longest caption of each batch can need less (data.caption_tokens)"
        )
    if not cfg["data"]["image_placeholders"] and spec.family != "blip-vqa":
        notes.append(
            "captions tokenized without image placeholders (data.image_placeholders = false), as the seed lab does: "
            "the language model sees the caption only; with the processor's placeholders it would need more"
        )
    if _world_size(cfg) > 1:
        notes.append(
            "per rank (every rank holds the same); DDP's gradient buckets and NCCL's buffers are in the overheads"
        )

    mkey = model_key(cfg)
    full = _MODELS.get(mkey)
    if full is None:
        full = build.build_meta(spec, spec.arch, cfg)
        cache_put(_MODELS, mkey, full)
    full_stacks = activations.layer_signatures(full)

    pkey = profile_key(cfg, dev)
    cached = _PROFILES.get(pkey)
    if cached is None:
        short_arch = build.short_config(spec.arch)
        short = build.build_meta(spec, short_arch, cfg)
        short_stacks = activations.layer_signatures(short)
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        activations.to_fake(short, mode)
        try:
            prof = activations.trace(short, cfg, spec, dev, short_stacks)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - the run would most likely fail the same way: say so, no traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise EstimateError(
                f"{spec.model_id}: the training step raised in the estimator's fake run, and the real run would most "
                f"likely fail the same way: {type(e).__name__}: {first}"
            ) from e
        cached = (prof, short_stacks)
        cache_put(_PROFILES, pkey, cached)
    prof, short_stacks = cached

    extra: dict[tuple[str, str], int] = {}
    layers_info: dict[str, tuple[int, int]] = {}
    for stack, sigs in full_stacks.items():
        short_sigs = short_stacks.get(stack, [])
        layers_info[stack] = (len(short_sigs), len(sigs))
        for sig in set(sigs):
            more = sigs.count(sig) - short_sigs.count(sig)
            if more > 0:
                if sig not in short_sigs:
                    raise EstimateError(f"{stack}: a layer kind of the full model is missing from the short copy")
                extra[(stack, sig)] = more

    st = static.analyse(full, cfg, prof.no_grad_params, dev, dict(prof.recast))
    acts, fwd0, bwd0 = prof.extrapolate(extra, grads_exist=False)
    _a, _f, bwd1 = prof.extrapolate(extra, grads_exist=True)
    offload = cfg["train"]["strategy"] == "deepspeed_stage_2_offload"
    phases = _timeline(
        cfg,
        st,
        acts,
        fwd0,
        bwd0,
        bwd1,
        offload,
        on_host=dev != "cuda",
        loss=prof.loss,
        loading=loading_bytes(cfg, prof.batch, dev),
    )
    if offload:
        notes.append("DeepSpeed ZeRO-2 offload: gradients and optimizer state are in host RAM; GPU gradient buckets")
    if cfg["train"]["precision"] == "16-mixed":
        notes.append("16-mixed: the GradScaler may skip the first steps (inf gradients), delaying optimizer state")
    if cfg["train"]["optim"] == "paged_adamw_8bit" and dev == "cuda":
        notes.append("paged optimizer state (tensors of 100k+ elements) can page out to host RAM: not in the peak")
    peak = max(phases, key=lambda p: (p.total, -p.step))
    overheads = NO_OVERHEADS
    if dev == "cuda":
        overheads = gpu_overheads(cfg, st, prof, peak, local)
        notes.insert(0, overheads.describe())
    runtime = overheads.total if dev == "cuda" else CPU_RUNTIME_BYTES
    verdict = "fits" if peak.total + runtime <= cap else "oom"
    return Estimate(
        name=name or str(cfg.get("name", "")),
        model_id=spec.model_id,
        device=dev,
        capacity_bytes=cap,
        capacity_source=cap_source,
        runtime_bytes=runtime,
        phases=tuple(phases),
        peak_bytes=peak.total,
        peak_phase=peak.phase,
        peak_step=peak.step,
        verdict=verdict,
        seconds=time.perf_counter() - t0,
        total_params=st.total_params,
        trainable_params=st.trainable_params,
        quant_state_bytes=st.quant_state,
        buffer_bytes=st.buffers,
        host_optim_bytes=st.optim_host,
        optim_step_temp_bytes=st.optim_step_temp,
        short_layers=layers_info,
        notes=tuple(notes),
        overheads=overheads,
    )


def loading_bytes(cfg: dict[str, Any], batch: int, device: str) -> int:
    """Device memory that making one batch needs, in the interval that ends before the forward.

    On a GPU none: the DataLoader builds batches in host memory and the forward's interval copies them over (the
    traced forward holds the batch). A CPU run with ``num_workers = 0`` builds them in the training process:
    ``Dataset.__getitem__`` makes every item of the batch, and ``default_collate`` stacks them while the list of
    items is still alive, so both exist at once: twice the batch. With workers, the items are made in the workers
    and the batch arrives whole (in shared memory).
    """
    if device == "cuda":
        return 0
    return 2 * batch if cfg["train"]["num_workers"] == 0 else batch


def _world_size(cfg: dict[str, Any]) -> int:
    t = cfg["train"]
    return int(t.get("devices", 1) or 1) * int(t.get("num_nodes", 1) or 1)


def gpu_overheads(cfg: dict[str, Any], st: Any, prof: Any, peak: PhaseEstimate, local: Any = None) -> Overheads:
    """The GPU terms beside the allocated peak (``gpu.Overheads``), for the phase where the peak is.

    Allocator rounding and segments: the tensors whose sizes are known at the peak are packed tensor by tensor
    (``gpu.pack``): parameters with their quantization state and buffers, gradients and optimizer state where that
    phase has them, DeepSpeed's reduce buckets in a backward, AdamW's per-parameter temporaries in an optimizer
    step. The rest of the peak (activations and the forward's and backward's temporaries) takes the per-tensor
    rounding and split remainders of the traced step's saved tensors, in proportion to its bytes. ``local`` is the
    GPU judged against (its compute capability sizes the cuBLAS workspace; a context this process already holds
    is outside its free memory already).
    """
    from blipmon.estimate import gpu

    t = cfg["train"]
    offload = t["strategy"] == "deepspeed_stage_2_offload"
    world = _world_size(cfg)
    known = list(st.resident_tensors)
    if peak.grads and not offload:
        known += st.grad_tensors
    if peak.optim and not offload:
        known += st.optim_device_tensors
    if offload and peak.phase == "after_bwd" and st.grads:
        from blipmon.runner.zero_offload import BUCKET_ELEMENTS

        half = t["precision"] in ("bf16-true", "bf16-mixed", "16-mixed")
        known += [BUCKET_ELEMENTS * (2 if half else 4)] * 2
    if peak.phase == "after_opt_step" and not offload:
        known += list(st.optim_step_tensors)  # the optimizer's temporaries at its peak, tensor by tensor
    fixed = gpu.pack(known)
    saved = gpu.pack(size for _stack, _layer, size, _what in prof.saved)
    rest = max(0, peak.total - fixed.requested)

    def share(part: int) -> int:
        return rest * part // saved.requested if saved.requested else 0

    capability = getattr(local, "capability", None)
    ds_buffer = 0
    if offload and st.largest_trainable_numel:
        ds_buffer = gpu.deepspeed_offload_buffer_bytes(st.largest_trainable_numel, st.trainable_itemsize)
    return Overheads(
        allocator_rounding=fixed.rounding + share(saved.rounding),
        allocator_segments=fixed.segments + share(saved.per_tensor_segments),
        cublas_workspaces=gpu.CUBLAS_THREADS * gpu.cublas_workspace_bytes(capability, gpu.cublas_env()),
        ddp_buckets=st.grads if world > 1 and not offload else 0,
        deepspeed_offload_buffer=ds_buffer,
        nccl_buffers=gpu.nccl_buffer_bytes(world),
        # Judged against the free memory of a process that holds its context already: the context is not in it.
        cuda_context=0 if local is not None and local.own_context and local.free is not None else CUDA_CONTEXT_BYTES,
    )


class EstimateError(ConfigError):
    """The configuration cannot be estimated (its training step fails, or the model is not supported)."""


def _timeline(
    cfg: dict[str, Any],
    st: Any,
    acts: int,
    fwd0: int,
    bwd0: int,
    bwd1: int,
    offload: bool,
    *,
    on_host: bool = False,
    loss: int = 0,
    loading: int = 0,
) -> list[PhaseEstimate]:
    """Phase entries of step 0 and step 1 (see the module docstring for what ``total`` means).

    ``fwd0`` is the forward's peak of non-parameter memory; ``bwd0`` the backward's when it creates the gradients
    (the first micro-step of a step), ``bwd1`` when it adds into existing ones (later micro-steps). ``loss`` is one
    micro-step's loss tensor, which the runner keeps (detached) until the step's mean loss is taken after
    ``zero_grad``; ``loading`` is what making the next batch needs in the interval that ends before the forward
    (a CPU run loading in-process holds every item and the collated batch at once: twice the batch).

    Micro-step ``m`` of an accumulation window (``m >= 1``) starts at the previous micro-step's ``after_bwd``: the
    gradients and ``m`` losses are alive through its loading, forward and backward. Each total is the largest over
    the step's micro-steps. The optimizer step's interval holds the gradients, the step's losses and what the
    optimizer needs at its peak: in the first step the state it creates plus its temporaries
    (``Static.first_step_peak``: torch creates all of it before the first update, bitsandbytes parameter by
    parameter), later the state plus the temporaries (``Static.optim_step_temp``).
    """
    acc = cfg["train"]["accumulate_grad_batches"]
    resident = st.params + st.quant_state + st.buffers
    params, grads, optim, optim_dev = st.params, st.grads, st.optim, st.optim_device
    if offload and on_host:
        return _offload_on_host(cfg, st, acts, fwd0, bwd0)
    if offload:
        return _offload_on_gpu(cfg, st, acts, fwd0, bwd1)
    pre = st.optim_before_step  # bitsandbytes' quantile maps, made with the optimizer (CPU)
    optim_dev += st.optim_outside_state  # ... which stay outside its state without 8-bit tensors
    late = acc - 1  # the last micro-step of a window: the most gradients-and-losses company
    loaded = resident  # until the first forward, which may re-type parameters for good (``Static.params_change``)
    resident = loaded + st.params_change
    out: list[PhaseEstimate] = []
    for step in (0, 1):
        o, o_dev = (optim, optim_dev) if step else (0, pre)
        g_before = grads if acc > 1 else 0  # the last micro-step of an accumulation window starts with gradients
        # before_fwd: the interval starts at the previous boundary: the run's start, the previous step's
        # after_opt_step (gradients not yet zeroed, its losses kept), or the previous micro-step's after_bwd. The
        # next batch is made after zero_grad and after the losses were let go.
        if step == 0:
            before_total = loaded + pre + loading
        else:
            before_total = max(resident + grads + optim_dev + acc * loss, resident + o_dev + loading)
        fwd_total = resident + o_dev + fwd0
        bwd_total = resident + o_dev + bwd0
        if acc > 1:
            company = resident + o_dev + grads + late * loss
            before_total = max(before_total, company + loading)
            fwd_total = max(fwd_total, company + fwd0)
            bwd_total = max(bwd_total, company + bwd1)
        opt_peak = st.first_step_peak if step == 0 else optim_dev + st.optim_step_temp
        out += [
            PhaseEstimate("before_fwd", step, params, g_before, o, 0, before_total),
            PhaseEstimate("after_fwd", step, params, g_before, o, acts, fwd_total),
            PhaseEstimate("after_bwd", step, params, grads, o, 0, bwd_total),
            PhaseEstimate("after_opt_step", step, params, grads, optim, 0, resident + grads + acc * loss + opt_peak),
        ]
    return out


def _offload_on_host(cfg: dict[str, Any], st: Any, acts: int, fwd0: int, bwd0: int) -> list[PhaseEstimate]:
    """ZeRO-2 offload when the "device" is the host itself: everything DeepSpeed offloads is in the phases.

    DeepSpeed allocates the fp32 master partition and its gradient when it starts (4 bytes per trainable
    parameter each), a host gradient accumulator on the first backward when accumulating, and Adam's two
    fp32 moments at the first optimizer step (``blipmon.runner.zero_offload`` counts the same tensors).
    """
    n = st.trainable_params
    acc = cfg["train"]["accumulate_grad_batches"]
    resident = st.params + st.quant_state + st.buffers
    grads = 4 * n + (4 * n if acc > 1 else 0)
    out: list[PhaseEstimate] = []
    for step in (0, 1):
        optim = 4 * n if step == 0 else 12 * n
        base = resident + grads + optim
        out += [
            PhaseEstimate("before_fwd", step, st.params, grads, optim, 0, base),
            PhaseEstimate("after_fwd", step, st.params, grads, optim, acts, base + fwd0),
            PhaseEstimate("after_bwd", step, st.params, grads, optim, 0, base + bwd0),
            PhaseEstimate("after_opt_step", step, st.params, grads, 12 * n, 0, resident + grads + 12 * n),
        ]
    return out


def _offload_on_gpu(cfg: dict[str, Any], st: Any, acts: int, fwd0: int, bwd1: int) -> list[PhaseEstimate]:
    """ZeRO-2 offload on a GPU: the device holds the weights, activations and, during backward, the reduce buckets.

    DeepSpeed allocates each backward's gradient buckets (``reduce_bucket_size`` elements in the weights' dtype,
    two of them with ``overlap_comm``, as ``blipmon.runner.zero_offload`` configures it on CUDA) and releases
    them when the backward ends; gradients and optimizer state live in host RAM (``host_optim_bytes``), so the
    phases show no gradients or optimizer state on the device. Each parameter's gradient passes through the
    device on its way to a bucket: ``bwd1`` (the backward's peak with gradients "existing") covers that.
    """
    from blipmon.runner.zero_offload import BUCKET_ELEMENTS

    half = cfg["train"]["precision"] in ("bf16-true", "bf16-mixed", "16-mixed")
    buckets = 2 * BUCKET_ELEMENTS * (2 if half else 4) if st.grads else 0
    resident = st.params + st.quant_state + st.buffers
    out: list[PhaseEstimate] = []
    for step in (0, 1):
        out += [
            PhaseEstimate("before_fwd", step, st.params, 0, 0, 0, resident),
            PhaseEstimate("after_fwd", step, st.params, 0, 0, acts, resident + fwd0),
            PhaseEstimate("after_bwd", step, st.params, 0, 0, 0, resident + buckets + bwd1),
            PhaseEstimate("after_opt_step", step, st.params, 0, 0, 0, resident),
        ]
    return out
