"""``BlipmonCallback`` for the Hugging Face ``Trainer``: a blipmon profile of a Trainer run, four phases per micro-batch.

Usage::

    from blipmon.integrations.transformers import BlipmonCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[BlipmonCallback(out="profiles")])
    trainer.train()

Where each phase is taken, and why there:

- ``before_fwd`` / ``after_fwd``: a forward pre-hook and a forward hook on the model. The Trainer has
  no callback between fetching a batch and calling the model, nor between the model and backward.
  Between the two hooks blipmon's saved-tensor hooks are installed, so ``acts`` is exactly the
  bytes autograd keeps for backward (as in ``blipmon run``), not "allocated minus the rest".
- ``after_bwd``: the model output's loss gets a gradient hook; when backward reaches it, blipmon
  queues a callback on the autograd engine, which runs when that backward has finished (gradients
  accumulated, activations released). If that mechanism is not available, the Trainer's
  ``on_substep_end`` / ``on_pre_optimizer_step`` take its place (after gradient clipping).
- ``after_opt_step``: ``on_optimizer_step`` — after ``optimizer.step()``, before ``zero_grad``.

Step records (time, loss, samples/s) come from ``on_step_begin`` / ``on_step_end``; the loss is the
model output's ``loss`` over the step's micro-batches as the Trainer logs it: summed when the Trainer
passed ``num_items_in_batch`` (each micro-batch's loss is then a share of the step's), else averaged.

Only the main process (``state.is_world_process_zero``) records; an evaluation or ``generate()``
forward (no grad, or the model in eval mode) is never taken for a training phase.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TrainerCallback

from blipmon.core.layout import PROFILES
from blipmon.integrations._recorder import (
    MODULE_DEPTH,
    MODULE_EVERY,
    CallbackOptions,
    Recorder,
    batch_size_of,
    build_config,
    iter_tensors,
    model_id,
    optim_name,
    precision_of,
    safe_name,
    script_name,
    unwrap_optimizer,
)


class BlipmonCallback(TrainerCallback, CallbackOptions):
    """Record a ``transformers.Trainer`` run as a blipmon profile under ``out`` (``./profiles`` by default).

    ``name`` names the run (default ``trainer/<model>``); ``sample_hz`` is the timeline's rate
    (``module_depth``/``module_every``: per-module memory, as ``runtime.module_depth``/``module_every`` say for
    ``blipmon run``);
    ``print_phases`` prints the lab script's per-phase lines (``_phase0_before_fwd`` ...) for steps
    0, 1 and every 50th. After training, ``run_dir`` is the profile's directory.
    """

    def __init__(
        self,
        out: str | os.PathLike[str] | None = str(PROFILES),
        *,
        name: str | None = None,
        sample_hz: float = 10.0,
        print_phases: bool = False,
        module_depth: int = MODULE_DEPTH,
        module_every: int = MODULE_EVERY,
    ) -> None:
        self._set_options(out, name, sample_hz, print_phases, module_depth, module_every)
        self._handles: list[Any] = []
        self._depth = 0
        self._loss_part_of_step = False

    # -- Trainer events ---------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.recorder is not None and not self.recorder.finished:
            self.recorder.abandon("the previous train() call ended without on_train_end (an exception was caught?)")
        self._remove_hooks()
        self.recorder = None
        if model is None or not state.is_world_process_zero:
            return
        try:
            self._start(args, state, model, kwargs)
        except Exception as e:  # noqa: BLE001 - a profiler must never be what stops the training
            self._remove_hooks()
            self.recorder = None
            warnings.warn(f"blipmon: not recording this run: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)

    def _start(self, args: Any, state: Any, model: Any, kwargs: dict[str, Any]) -> None:
        optimizer = unwrap_optimizer(kwargs.get("optimizer"))
        mixed = "bf16-mixed" if getattr(args, "bf16", False) else "16-mixed" if getattr(args, "fp16", False) else None
        mid = model_id(model)
        name = safe_name(self.name or f"trainer/{Path(mid).name or mid}")
        optim_arg = getattr(args, "optim", "")
        optim_arg = str(getattr(optim_arg, "value", optim_arg))
        loader = kwargs.get("train_dataloader")
        dataset = getattr(loader, "dataset", None)
        train: dict[str, Any] = {
            "batch_size": int(args.per_device_train_batch_size),
            "accumulate_grad_batches": int(args.gradient_accumulation_steps),
            "precision": precision_of(model, mixed),
            "optim": optim_name(optimizer),
            "lr": float(args.learning_rate),
            "act_ckpt": bool(getattr(args, "gradient_checkpointing", False)),
            "max_epochs": max(1, math.ceil(float(args.num_train_epochs))),
            "max_steps": int(state.max_steps) if state.max_steps and state.max_steps > 0 else -1,
            "num_workers": int(getattr(args, "dataloader_num_workers", 0)),
        }
        if dataset is not None and hasattr(dataset, "__len__"):
            train["num_train_samples"] = max(1, len(dataset))
        description = (
            f"Recorded by blipmon's Hugging Face Trainer callback from {script_name()}: "
            f"{type(model).__name__}, {type(optimizer).__name__ if optimizer is not None else 'no optimizer'}"
            f" ({optim_arg}), batch {args.per_device_train_batch_size} x accumulate {args.gradient_accumulation_steps}"
        )
        rec = Recorder(
            self.out,
            sample_hz=self.sample_hz,
            print_phases=self.print_phases,
            module_depth=self.module_depth,
            module_every=self.module_every,
            source="transformers.Trainer",
        )
        plan: dict[str, Any] = {
            "total_steps": int(state.max_steps) if state.max_steps else None,
            "micro_per_step": int(args.gradient_accumulation_steps),
            "batch_size": int(args.per_device_train_batch_size),
        }
        if loader is not None and hasattr(loader, "__len__"):
            plan["steps_per_epoch"] = max(1, len(loader) // max(1, int(args.gradient_accumulation_steps)))
        self.run_dir = rec.start(
            name=name,
            model=model,
            optimizer=optimizer,
            config=build_config(name, description, model, train, self.sample_hz, self.runtime_options()),
            plan=plan,
            integration={
                "framework": "transformers",
                "framework_version": transformers.__version__,
                "optimizer": type(optimizer).__name__ if optimizer is not None else None,
                "optim_arg": optim_arg,
                "precision": mixed or precision_of(model),
            },
            rank=int(getattr(args, "process_index", 0) or 0),
        )
        self.recorder = rec
        self._install_hooks(model)
        print(f"[blipmon] recording this run into {self.run_dir}", file=sys.stderr, flush=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.begin_step(int(state.global_step))

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._fallback_after_bwd()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._fallback_after_bwd()
        if self.recorder is not None:
            self.recorder.set_phase("optimizer_step")

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.boundary("after_opt_step")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.end_step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._remove_hooks()
        rec = self.recorder
        if rec is not None and not rec.finished:
            rec.finish("ok")
            print(f"[blipmon] profile written: blipmon show {self.run_dir}", file=sys.stderr, flush=True)

    # -- module hooks -----------------------------------------------------------------------------
    def _install_hooks(self, model: torch.nn.Module) -> None:
        self._depth = 0
        self._handles = [
            model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            model.register_forward_hook(self._post_forward, always_call=True),
        ]

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.recorder is not None:
            self.recorder.track_end()
        self._depth = 0

    def _pre_forward(self, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        rec = self.recorder
        if rec is None or rec.finished or not rec.step_open or not module.training or not torch.is_grad_enabled():
            return
        self._depth += 1
        if self._depth > 1:  # the model calling itself: the outer call is the forward
            return
        if rec.boundary("before_fwd"):
            rec.add_batch(batch_size_of(kwargs, args))
            self._loss_part_of_step = kwargs.get("num_items_in_batch") is not None
        rec.track_begin()

    def _post_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        rec = self.recorder
        if rec is None or self._depth == 0:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        rec.track_end()
        exc = sys.exc_info()[1]
        if output is None and exc is not None:  # forward raised: called from the module's except block
            rec.fail(exc)
            return
        if rec.boundary("after_fwd"):
            loss = output.get("loss") if isinstance(output, Mapping) else None
            rec.add_loss(loss, part_of_step=self._loss_part_of_step)
            self._arm_backward_end(loss, output)

    def _arm_backward_end(self, loss: Any, output: Any) -> None:
        """Be called back once this micro-batch's backward has finished (see the module docstring)."""
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            targets = [loss]
        else:
            targets = [t for t in iter_tensors(output) if t.requires_grad]
        if not targets:
            return
        fired = [False]

        def on_grad(_grad: torch.Tensor) -> None:
            if fired[0]:
                return
            fired[0] = True
            try:
                torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
            except Exception:  # noqa: BLE001 - the Trainer-callback fallback records the phase instead
                pass

        for t in targets:
            t.register_hook(on_grad)

    def _backward_done(self) -> None:
        rec = self.recorder
        if rec is not None and not rec.finished:
            rec.boundary("after_bwd")

    def _fallback_after_bwd(self) -> None:
        rec = self.recorder
        if rec is not None and rec.has("after_fwd"):
            rec.boundary("after_bwd")


__all__ = ["BlipmonCallback"]
