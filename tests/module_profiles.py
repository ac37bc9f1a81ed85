"""Hand-written profiles with per-module records (issue 12) for the module view's tests, CLI and dashboard alike.

A CPU-shaped training run of three steps whose modules are
``"" > vision_model > vision_model.encoder``, ``"" > qformer`` and ``"" > language_model >
language_model.model.decoder`` (``language_model.model`` not recorded: a tree with a gap, which the views must
still nest; a real run at depth 2 records ``language_model.model`` and nothing below it). Every
figure is a whole number of KiB chosen by hand, so tests can state exact expected values:

- params (KiB): root 1000, vision_model 300, its encoder 250, qformer 200, language_model 480, its decoder 400;
- grads = params after backward and after the optimizer step, 0 before;
- optim = 2 x params from step 0's optimizer step on (every phase of steps 1 and 2);
- acts after forward (KiB): root 1200, vision_model 300, encoder 280, qformer 100, language_model 780, decoder 700
  (``ACTS_CKPT`` for the activation-checkpointed variant); 0 at the other boundaries.

The phase records carry the root's figures, so the root equals the phase totals. The CPU peak phase (largest sum)
is step 1 after_fwd: 1000 + 2000 + 1200 = 4200 KiB (step 2's equal one comes later; the first maximum wins).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

K = 1024
TREE = ["", "vision_model", "vision_model.encoder", "qformer", "language_model", "language_model.model.decoder"]
PARAMS = {"": 1000, "vision_model": 300, "vision_model.encoder": 250, "qformer": 200, "language_model": 480,
          "language_model.model.decoder": 400}  # fmt: skip
ACTS = {"": 1200, "vision_model": 300, "vision_model.encoder": 280, "qformer": 100, "language_model": 780,
        "language_model.model.decoder": 700}  # fmt: skip
ACTS_CKPT = {"": 500, "vision_model": 300, "vision_model.encoder": 280, "qformer": 100, "language_model": 80,
             "language_model.model.decoder": 0}  # fmt: skip
PHASES = ("before_fwd", "after_fwd", "after_bwd", "after_opt_step")
OOM_MODULE = "language_model.model.decoder.layers.1"


def figures(module: str, step: int, phase: str, acts: dict[str, int] | None = None) -> dict[str, int]:
    """One module's four figures (bytes) at one boundary, by the rules in this module's docstring."""
    p = PARAMS.get(module, 0)
    grads = p if phase in ("after_bwd", "after_opt_step") else 0
    optim = 2 * p if step > 0 or phase == "after_opt_step" else 0
    a = (acts or ACTS).get(module, 0) if phase == "after_fwd" else 0
    return {"params": p * K, "grads": grads * K, "optim": optim * K, "acts": a * K}


def events(
    name: str = "tiny/blip2-opt",
    *,
    acts: dict[str, int] | None = None,
    tree: list[str] | None = None,
    steps: int = 3,
    modules: bool = True,
    oom: bool = False,
    prediction: bool = True,
    module_steps: set[int] | None = None,
) -> list[dict[str, Any]]:
    """The run's records in the order a child writes them: each boundary's phase record, then its modules record.

    ``oom``: the run stops in step ``steps - 1``'s backward pass, inside ``OOM_MODULE``; ``module_steps``: the
    steps whose boundaries have module records (None: all).
    """
    tree = list(tree or TREE)
    t = 0.0
    out: list[dict[str, Any]] = [
        {"type": "header", "t": t, "format_version": 1, "name": name, "source": "blipmon run"},
        {"type": "config", "t": 0.01, "config": {"name": name, "model": {"id": "tiny/blip2-opt"},
                                                 "job": {"kind": "train"}, "train": {"batch_size": 2}}},
        {"type": "environment", "t": 0.02, "device": "cpu", "gpu_name": None, "host_total_bytes": 8 << 30,
         "torch": "2.13.0", "transformers": "5.25.0", "world_size": 1},
    ]  # fmt: skip
    if prediction:
        pred = [
            {"step": s, "phase": ph, "module": m, **figures(m, s, ph, acts)}
            for s in (0, 1)
            for ph in PHASES
            for m in tree
        ]
        for row in pred:  # the estimate is 10 KiB high on the language model's activations after forward
            if row["phase"] == "after_fwd" and row["module"] in ("", "language_model", "language_model.model.decoder"):
                row["acts"] += 10 * K
        out.append({"type": "prediction", "t": 0.03, "modules": pred, "phases": []})
    if modules:
        out.append({"type": "module_tree", "t": 0.04, "rank": 0, "depth": 2, "modules": tree})
    for step in range(steps):
        for ph in PHASES:
            if oom and step == steps - 1 and ph == "after_bwd":
                out.append({"type": "oom", "t": t + 0.1, "step": step, "micro_step": 0, "phase": "backward",
                            "message": "CUDA out of memory", "module": OOM_MODULE, "module_pass": "backward"})  # fmt: skip
                out.append({"type": "end", "t": t + 0.2, "status": "oom", "code": 3})
                return out
            t = round(t + 0.5, 3)
            root = figures("", step, ph, acts)
            out.append({"type": "phase", "t": t, "step": step, "micro_step": 0, "rank": 0, "phase": ph, **root,
                        "other": None, "allocated": None, "peak": None, "reserved": None, "host_rss": 500 << 20})  # fmt: skip
            if modules and (module_steps is None or step in module_steps):
                rec: dict[str, Any] = {"type": "modules", "t": t, "step": step, "micro_step": 0, "rank": 0, "phase": ph}
                for cat in ("params", "grads", "optim", "acts"):
                    rec[cat] = [figures(m, step, ph, acts)[cat] for m in tree]
                out.append(rec)
        out.append({"type": "step", "t": t, "step": step, "seconds": 0.5, "loss": 1.0, "samples_per_s": 4.0})
    out.append({"type": "end", "t": t + 0.1, "status": "ok", "code": 0})
    return out


def write(run_dir: Path, evs: list[dict[str, Any]]) -> Path:
    """Write ``evs`` as ``run_dir/events.jsonl`` (the folder made), and return ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))
    return run_dir
