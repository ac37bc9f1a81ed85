"""``BlipmonCallback`` for Lightning: a blipmon profile of ``trainer.fit()``, with the lab script's four phases.

Usage (``pip install 'blipmon[lightning]'``)::

    from blipmon.integrations.lightning import BlipmonCallback
    trainer = L.Trainer(..., callbacks=[BlipmonCallback(out="profiles")])
    trainer.fit(model, train_loader)

Seed 002's lab script printed memory at ``_phase0_before_fwd``, ``_phase1_after_fwd``,
``_phase2_after_bwd`` and ``_phase3_after_opt_step`` from Lightning hooks; this callback takes the
same four phases from the same places and measures them with blipmon's probe:

- ``before_fwd``: ``on_train_batch_start`` (the batch is already on the device);
- ``after_fwd``: ``on_before_backward`` — ``training_step`` has returned its loss. Saved-tensor hooks
  are installed from the first to the second, so ``acts`` counts exactly what autograd keeps;
- ``after_bwd``: ``on_after_backward``;
- ``after_opt_step``: ``on_train_batch_end`` of the micro-batch whose optimizer step ran (the
  trainer's ``global_step`` moved on). Lightning zeroes gradients just before the next backward,
  so the gradients of the step are still there, as they were in the lab's printout.

Steps run from the first micro-batch's ``on_train_batch_start`` to the stepping micro-batch's
``on_train_batch_end``; the loss is ``training_step``'s, un-scaled by gradient accumulation.
``on_exception`` records an OOM (with its step and phase), an error or a Ctrl-C as the run's end.
Only global rank 0 records.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch

try:  # the unified package first, then the standalone one; the Trainer checks the Callback's class
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError:
        raise ImportError("blipmon.integrations.lightning needs Lightning: pip install 'blipmon[lightning]'") from None

from blipmon.core.layout import PROFILES
from blipmon.integrations._recorder import (
    MODULE_DEPTH,
    MODULE_EVERY,
    CallbackOptions,
    Recorder,
    batch_size_of,
    build_config,
    model_id,
    optim_name,
    precision_of,
    safe_name,
    script_name,
    unwrap_optimizer,
)

_PRECISIONS = {"32-true", "bf16-true", "bf16-mixed", "16-mixed"}


class BlipmonCallback(pl.Callback, CallbackOptions):
    """Record a Lightning ``fit()`` as a blipmon profile under ``out`` (``./profiles`` by default).

    ``name`` names the run (default ``lightning/<LightningModule class>``); ``sample_hz`` is the
    timeline's rate (``module_depth``/``module_every``: per-module memory, as ``runtime.module_depth``/``module_every``
    say for ``blipmon run``); ``print_phases`` prints the lab script's lines (``_phase0_before_fwd`` ...) for
    steps 0, 1 and every 50th. After ``fit()``, ``run_dir`` is the profile's directory.
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
        self._step_at_start = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.recorder is not None and not self.recorder.finished:
            self.recorder.abandon("the previous fit() ended without on_train_end")
        self.recorder = None
        if trainer.global_rank != 0:
            return
        try:
            self._start(trainer, pl_module)
        except Exception as e:  # noqa: BLE001 - a profiler must never be what stops the training
            self.recorder = None
            warnings.warn(f"blipmon: not recording this run: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)

    def _start(self, trainer: Any, pl_module: Any) -> None:
        optimizer = unwrap_optimizer(trainer.optimizers[0]) if trainer.optimizers else None
        raw_precision = str(getattr(trainer, "precision", "32-true"))
        precision = raw_precision if raw_precision in _PRECISIONS else precision_of(pl_module)
        acc = int(trainer.accumulate_grad_batches)
        loader = getattr(trainer, "train_dataloader", None)
        batch_size = int(getattr(loader, "batch_size", 0) or 0)
        lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None and optimizer.param_groups else 0.0
        name = safe_name(self.name or f"lightning/{type(pl_module).__name__}")
        max_steps = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else -1
        total = max_steps if max_steps > 0 else _finite_int(getattr(trainer, "estimated_stepping_batches", None))
        train: dict[str, Any] = {
            "batch_size": batch_size or 1,
            "accumulate_grad_batches": acc,
            "precision": precision,
            "optim": optim_name(optimizer),
            "lr": lr,
            "max_epochs": max(1, int(trainer.max_epochs or 1)),
            "max_steps": max_steps,
            "num_workers": int(getattr(loader, "num_workers", 0) or 0),
        }
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__"):
            train["num_train_samples"] = max(1, len(dataset))
        description = (
            f"Recorded by blipmon's Lightning callback from {script_name()}: {type(pl_module).__name__} "
            f"({model_id(pl_module)}), {type(optimizer).__name__ if optimizer is not None else 'no optimizer'}, "
            f"precision {raw_precision}, accumulate {acc}"
        )
        rec = Recorder(
            self.out,
            sample_hz=self.sample_hz,
            print_phases=self.print_phases,
            module_depth=self.module_depth,
            module_every=self.module_every,
            source="lightning.Trainer",
        )
        self.run_dir = rec.start(
            name=name,
            model=pl_module,
            optimizer=optimizer,
            config=build_config(name, description, pl_module, train, self.sample_hz, self.runtime_options()),
            plan={"total_steps": total, "micro_per_step": acc, "batch_size": batch_size or None},
            integration={
                "framework": "lightning",
                "framework_version": getattr(pl, "__version__", ""),
                "optimizer": type(optimizer).__name__ if optimizer is not None else None,
                "precision": raw_precision,
                "strategy": type(trainer.strategy).__name__,
            },
            rank=int(trainer.global_rank),
        )
        self.recorder = rec
        print(f"[blipmon] recording this run into {self.run_dir}", file=sys.stderr, flush=True)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        rec = self.recorder
        if rec is None or rec.finished:
            return
        if not rec.step_open:
            rec.begin_step(int(trainer.global_step))
            self._step_at_start = int(trainer.global_step)
        rec.new_micro()
        if rec.boundary("before_fwd"):
            rec.add_batch(batch_size_of(batch))
        rec.track_begin()

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        rec = self.recorder
        if rec is None or rec.finished:
            return
        rec.track_end()
        if rec.boundary("after_fwd"):
            # Lightning hands over the loss already divided by accumulate_grad_batches.
            rec.add_loss(loss.detach() * int(trainer.accumulate_grad_batches))

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        rec = self.recorder
        if rec is not None and not rec.finished:
            rec.boundary("after_bwd")

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        rec = self.recorder
        if rec is not None and not rec.finished:
            rec.set_phase("optimizer_step")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        rec = self.recorder
        if rec is None or rec.finished:
            return
        rec.track_end()  # training_step returned None (a skipped batch): no backward closed it
        if int(trainer.global_step) > self._step_at_start and rec.step_open:
            rec.boundary("after_opt_step")
            rec.end_step()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        rec = self.recorder
        if rec is not None and not rec.finished:
            rec.track_end()
            rec.finish(rec.fail(exception))
            print(f"[blipmon] profile written ({rec.status}): blipmon show {self.run_dir}", file=sys.stderr)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        rec = self.recorder
        if rec is not None and not rec.finished:
            rec.finish("ok")
            print(f"[blipmon] profile written: blipmon show {self.run_dir}", file=sys.stderr, flush=True)


def _finite_int(v: Any) -> int | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if f == f and f not in (float("inf"), float("-inf")) and f > 0 else None


__all__ = ["BlipmonCallback"]
