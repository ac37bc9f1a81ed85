"""The train job: a plain PyTorch loop with the seed lab's four phases at every micro-step.

Written by hand rather than on Lightning so the phase boundaries are exactly where the lab puts
them and nothing else (a logger, a progress bar) allocates between them.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from blipmon.core.schedule import schedule
from blipmon.runner.batch_check import watch_image_placeholders
from blipmon.runner.data import make_dataset
from blipmon.runner.distributed import Dist
from blipmon.runner.models import LoadedModel
from blipmon.runner.precision import autocast_for
from blipmon.runner.probes import NullProbe, PhaseProbe, track_checkpoint_inputs

DELIBERATE_NO_PLACEHOLDERS = (
    "captions without image placeholder tokens (data.image_placeholders = false, as the seed lab tokenizes them): "
    "the language model sees the captions only and the images do not affect the loss"
)

LORA_TARGETS = {
    "blip2-decoder": r".*language_model.*\.(q_proj|v_proj|query_key_value)",  # OPT; BLOOM (mBLIP) fuses q/k/v
    "blip2-encdec": r".*language_model.*\.(q|v)",
    "blip-vqa": ["query", "value"],
}


@dataclass
class Cursor:
    """Where the job is, so an OOM or a stop can be recorded with its step and phase."""

    step: int = 0
    micro_step: int = 0
    phase: str = "load"  # load | forward | backward | optimizer_step | generate
    # The innermost module running (the probe's module map), asked only when an error is recorded; given the
    # error, whose traceback names the module on the steps whose module hooks are off.
    running_module: Callable[[BaseException | None], str | None] = lambda _exc=None: None

    def where(self, exc: BaseException | None = None) -> dict[str, str | None]:
        """An ``oom`` record's ``module`` and ``module_pass``: which module ran, in which pass, when ``exc`` (default:
        the exception being handled) stopped it.

        The optimizer step runs no module (its pass alone is named); loading and generation have no pass."""
        module_pass = MODULE_PASS.get(self.phase)
        module = self.running_module(exc) if module_pass in ("forward", "backward") else None
        return {"module": module, "module_pass": module_pass}


# The job's cursor -> an ``oom`` record's ``module_pass``.
MODULE_PASS = {"forward": "forward", "backward": "backward", "optimizer_step": "optimizer"}


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "sgd":  # the lab's stateless baseline: no momentum
        return torch.optim.SGD(params, lr=lr)
    if name in ("adam_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.Adam8bit if name == "adam_8bit" else bnb.optim.PagedAdamW8bit
        return cls(params, lr=lr)
    raise NotImplementedError(f"train.optim = {name!r} is not available yet")


def apply_peft(loaded: LoadedModel, cfg: dict[str, Any]) -> Any:
    """Wrap with LoRA (and prepare a 4-bit base for k-bit training for QLoRA)."""
    t = cfg["train"]
    model = loaded.model
    if not (t["lora"]["enabled"] or t["qlora"]):
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if t["qlora"] or cfg["model"]["quantization"] != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t["act_ckpt"])
    lora = t["lora"]
    targets = lora["target_modules"] or LORA_TARGETS[loaded.family]
    peft_cfg = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=targets, bias="none"
    )
    return get_peft_model(model, peft_cfg)


def enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant checkpointing of every layer, through whichever name this transformers has."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if getattr(getattr(model, "config", None), "model_type", "") == "blip":
        _drop_input_require_grads_hooks(model)


def _drop_input_require_grads_hooks(model: Any) -> int:
    """Remove the "make inputs require grad" forward hooks that transformers and peft install.

    BLIP's text embeddings add position embeddings in place; a word-embedding output forced to
    require grad is a leaf, and the in-place add then fails. Non-reentrant checkpointing does not
    need the inputs to require grad, so for BLIP the hooks (registered once per wrapper) go.
    """
    removed = 0
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") == "make_inputs_require_grads":
                del module._forward_hooks[key]
                removed += 1
    return removed


def _to_device(
    batch: dict[str, torch.Tensor], device: torch.device, float_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)
        if v.is_floating_point():
            v = v.to(float_dtype)
        out[k] = v
    return out


def mean_loss(losses: list[torch.Tensor], scale: float = 1) -> float | None:
    """The step's loss from its micro-steps' loss tensors (each times ``scale``): one copy to the host for all.

    Each value is the float the tensor holds (a bfloat16 or float32 value is exact in float32) and is scaled in
    Python, so the result is what converting each with ``float()`` gave, without a device sync per micro-step.
    """
    if not losses:
        return None
    values = torch.stack([x.reshape(()).float() for x in losses]).tolist()
    return sum(v * scale for v in values) / len(values)


def _sync_devices(model: Any, loaded: LoadedModel, probe: Any) -> list[int]:
    """The GPUs the step's time must wait for: the probe's (every GPU the model occupies), else the input's."""
    devices = list(getattr(probe, "devices", None) or [])
    if devices:
        return devices
    from blipmon.runner.allocator import model_cuda_devices

    default = loaded.device.index if loaded.device.type == "cuda" else None
    return model_cuda_devices(model, default=default)


def run_train(
    loaded: LoadedModel,
    cfg: dict[str, Any],
    emit: Callable[..., Any],
    cursor: Cursor,
    *,
    cuda: bool,
    dist: Dist | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    dist = dist or Dist()
    t = cfg["train"]
    torch.manual_seed(cfg["runtime"]["seed"])
    model = apply_peft(loaded, cfg)
    if t["act_ckpt"]:
        enable_activation_checkpointing(model)
    model.train()
    # Everything loaded so far lives for the whole run: keep the cyclic GC from rescanning it
    # every few thousand allocations (it cost a third of a tiny model's step).
    gc.collect()
    gc.freeze()
    trainable = [p for p in model.parameters() if p.requires_grad]
    total_params = sum(p.numel() for p in model.parameters())
    engine: Any = None
    zero_opt: Any = None
    if t["strategy"] == "deepspeed_stage_2_offload":
        from blipmon.runner import zero_offload

        emit("log", message="DeepSpeed ZeRO-2, optimizer offloaded to the host (first use builds its CPU Adam)")
        engine, zero_opt = zero_offload.initialize(model, trainable, cfg, cuda=cuda)
        model = engine
        optimizer = zero_offload.inner_optimizer(zero_opt)
    else:
        if dist.multi:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[loaded.device.index] if loaded.device.type == "cuda" else None
            )
        optimizer = build_optimizer(t["optim"], trainable, t["lr"])
    scaler = torch.amp.GradScaler(loaded.device.type) if t["precision"] == "16-mixed" and engine is None else None

    dataset = make_dataset(loaded.model.config, loaded.family, cfg, loaded.source)
    if len(dataset) < t["num_train_samples"]:  # a real folder smaller than asked for: an epoch is the folder
        cfg = {**cfg, "train": {**t, "num_train_samples": len(dataset)}}
    sched = schedule(cfg)
    sampler = (
        torch.utils.data.DistributedSampler(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=False)
        if dist.multi
        else None
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=t["batch_size"],
        shuffle=False,
        sampler=sampler,
        num_workers=t["num_workers"],
        pin_memory=cuda,
    )
    emit(
        "plan" if dist.writes_run else "rank_plan",
        rank=dist.rank,
        world_size=dist.world,
        total_steps=sched.total_steps,
        steps_per_epoch=sched.steps_per_epoch,
        micro_per_step=sched.accumulate,
        batch_size=t["batch_size"],
        trainable_params=sum(p.numel() for p in trainable),
        total_params=total_params,
        weights=loaded.weights,
    )
    probe: PhaseProbe | NullProbe
    if cfg["runtime"]["probes"]:
        cuda_dev = loaded.device.index if loaded.device.type == "cuda" else None
        per_module = {"module_depth": cfg["runtime"]["module_depth"], "module_every": cfg["runtime"]["module_every"]}
        if zero_opt is not None:
            probe = PhaseProbe(
                model,
                emit,
                optimizer=optimizer,
                rank=dist.rank,
                cuda=cuda,
                cuda_device=cuda_dev,
                extra_grads=lambda: zero_offload.grad_tensors(zero_opt),
                optim_state=lambda: zero_offload.optim_tensors(zero_opt),
                host_split=True,
                **per_module,
            )
        else:
            probe = PhaseProbe(
                model, emit, optimizer=optimizer, rank=dist.rank, cuda=cuda, cuda_device=cuda_dev, **per_module
            )
        if t["act_ckpt"]:
            track_checkpoint_inputs(model, probe.saved)
        cursor.running_module = probe.running_module
    else:
        probe = NullProbe()
    if dist.writes_run and not cfg["data"]["image_placeholders"] and loaded.family.startswith("blip2"):
        emit("note", message=DELIBERATE_NO_PLACEHOLDERS)
    elif dist.writes_run:  # a batch of blipmon's own should never lack them; a real folder's might
        watch_image_placeholders(loaded.model, lambda text: emit("note", message=text))
    float_dtype = torch.bfloat16 if t["precision"] == "bf16-true" else torch.float32
    if engine is not None:  # DeepSpeed runs the whole model in its half dtype: inputs must match
        float_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(t["precision"], float_dtype)
    acc = sched.accumulate
    sync_devices = _sync_devices(model, loaded, probe) if cuda else []
    # Setup is over: from here on a peak belongs to a phase. Step 0's first "peak before forward" must cover the
    # interval since now, not loading, quantization or DeepSpeed's flattening (the load record has that peak).
    probe.start_interval()
    step = 0
    for _epoch in range(t["max_epochs"]):
        micro = 0
        # Micro-step losses stay tensors on the device: float() on one waits for the GPU to finish everything
        # queued so far, every micro-step. They become numbers once per optimizer step, for its record.
        losses: list[torch.Tensor] = []
        samples = 0
        t_start = time.perf_counter()
        for i, batch in enumerate(loader):
            if step >= sched.total_steps or should_stop():
                break
            last_of_epoch = i == sched.micro_per_epoch - 1
            cursor.step, cursor.micro_step, cursor.phase = step, micro, "forward"
            probe.boundary("before_fwd", step, micro)
            batch = _to_device(batch, loaded.device, float_dtype)
            samples += int(batch["pixel_values"].shape[0])
            boundary = micro + 1 >= acc or last_of_epoch
            if engine is not None:  # DeepSpeed: its engine casts, scales by accumulation and knows the boundary
                engine.set_gradient_accumulation_boundary(boundary)
                with probe.saved.track():
                    out = engine(**batch)
                loss = out.loss
            else:
                with probe.saved.track(), autocast_for(t["precision"], loaded.device):
                    out = model(**batch)
                loss = out.loss / acc
            del out
            probe.boundary("after_fwd", step, micro)
            cursor.phase = "backward"
            if engine is not None:
                engine.backward(loss)
                losses.append(loss.detach())
            else:
                (scaler.scale(loss) if scaler else loss).backward()
                losses.append(loss.detach())
            del loss, batch
            probe.boundary("after_bwd", step, micro)
            micro += 1
            if not boundary:
                continue
            cursor.phase = "optimizer_step"
            if engine is not None:
                engine.step()
            elif scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            probe.boundary("after_opt_step", step, micro - 1)
            if engine is None:
                optimizer.zero_grad(set_to_none=True)
            # Once per optimizer step (never per phase): the step's time must include the GPU work it queued,
            # on every GPU the model occupies; the losses' one copy to the host then costs no further wait.
            for dev in sync_devices:
                torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - t_start
            step_loss = mean_loss(losses, scale=1 if engine is not None else acc)
            emit(
                "step" if dist.writes_run else "rank_step",
                rank=dist.rank,
                step=step,
                seconds=round(seconds, 6),
                loss=step_loss,
                samples_per_s=samples / seconds if seconds > 0 else None,
                micro_steps=micro,
            )
            step += 1
            micro, losses, samples = 0, [], 0
            t_start = time.perf_counter()
        if step >= sched.total_steps or should_stop():
            break
