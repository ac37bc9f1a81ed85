"""blipmon's training step, set up as its runner sets it up, measured by the independent counter.

``live_storage`` knows nothing of blipmon; this module builds what ``blipmon.runner.train.run_train`` trains (the
model from ``load_model``, LoRA/QLoRA from ``apply_peft``, activation checkpointing, the optimizer from
``build_optimizer``, the synthetic dataset and a ``DataLoader`` with the configured batch size) and hands it to
``live_storage.run_steps``, whose loop keeps alive what ``run_train``'s loop keeps (the batch until after the
backward, the detached losses until the step's mean, the gradients until ``zero_grad``). ``windows`` pairs the
result with an estimate, window by window.
"""

from __future__ import annotations

from typing import Any

import torch

from reference.live_storage import Trace, run_steps

PHASES = ("before_fwd", "after_fwd", "after_bwd", "after_opt_step")
INTERVALS = {
    "before_fwd": "between steps",
    "after_fwd": "forward",
    "after_bwd": "backward",
    "after_opt_step": "optimizer step",
}


def reference_trace(cfg: dict[str, Any], *, steps: int = 2, optimizer: Any = None) -> Trace:
    """Train ``steps`` optimizer steps of ``cfg`` on the CPU as blipmon's runner would, counting live storages.

    ``optimizer`` (a callable taking the trainable parameters and the learning rate) replaces the runner's own,
    e.g. to run torch's foreach AdamW on the CPU.
    """
    from blipmon.runner.data import make_dataset
    from blipmon.runner.models import load_model
    from blipmon.runner.precision import autocast_for
    from blipmon.runner.train import apply_peft, build_optimizer, enable_activation_checkpointing

    t = cfg["train"]
    if t["num_workers"] != 0:
        raise ValueError("the reference counts one process: train.num_workers must be 0")
    torch.manual_seed(cfg["runtime"]["seed"])
    loaded = load_model(cfg, cuda=False)
    model = apply_peft(loaded, cfg)
    if t["act_ckpt"]:
        enable_activation_checkpointing(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = (optimizer or (lambda ps, lr: build_optimizer(t["optim"], ps, lr)))(trainable, t["lr"])
    dataset = make_dataset(loaded.model.config, loaded.family, cfg, loaded.source)
    loader = torch.utils.data.DataLoader(dataset, batch_size=t["batch_size"], shuffle=False, num_workers=0)
    float_dtype = torch.bfloat16 if t["precision"] == "bf16-true" else torch.float32
    device = torch.device("cpu")
    return run_steps(
        model,
        opt,
        loader,
        steps=steps,
        accumulate=t["accumulate_grad_batches"],
        autocast=lambda: autocast_for(t["precision"], device),
        float_dtype=float_dtype,
    )


def windows(estimate: Any, trace: Trace, steps: tuple[int, ...] = (0, 1)) -> list[dict[str, Any]]:
    """Each window's predicted peak beside the reference's, step by step.

    ``estimate`` is an ``Estimate`` or its JSON object (``Estimate.to_json()``, as a run saves it): the predicted peak
    of a window is its phase's ``total``. Rows ``{"step", "phase", "window", "predicted", "reference", "live",
    "error"}``; ``live`` is what the reference had alive at the boundary of the step's last micro-step, ``error`` is
    (predicted - reference) / reference.
    """
    if isinstance(estimate, dict):
        totals = {(int(p["step"]), str(p["phase"])): int(p["total"]) for p in estimate.get("phases") or []}
    else:
        totals = {(p.step, p.phase): p.total for p in estimate.phases}
    rows = []
    for step in steps:
        for phase in PHASES:
            pred = totals[(step, phase)]
            ref = trace.peak(step, phase)
            rows.append(
                {
                    "step": step,
                    "phase": phase,
                    "window": INTERVALS[phase],
                    "predicted": pred,
                    "reference": ref,
                    "live": trace.live(step, phase),
                    "error": (pred - ref) / ref if ref else 0.0,
                }
            )
    return rows
