"""``blipmon estimate CONFIG [--set K=V]... [--gpu-memory SIZE] [--host-memory SIZE] [--modules] [--json]``: will it fit?

Exit codes: 0 when an estimate was made, whatever its verdict (the verdict is data: read ``--json``'s
``verdict``, or the last line of the table); 2 for a configuration or usage error (a bad key, a bad size, a GPU
configuration without ``--gpu-memory`` on a machine without a GPU, a step that cannot run), as ``blipmon run``.
A preset named for one of the lab's cards (``h100/*``, ``a100/*``) is judged against that card when no GPU is here.

Sizes need a unit (``80GiB``, ``24GB``, ``512MiB``, ``85899345920B``): a bare ``80`` is refused rather than read as
80 bytes. ``--host-memory`` is the machine's RAM: a CPU run is judged against it instead of the memory available
right now, and a GPU run that offloads its optimizer to the host (DeepSpeed) is judged on both.

Every verdict rule lives in ``blipmon.estimate.judge`` (``blipmon fit`` asks it too); this module parses the two
sizes and prints.

``--modules`` adds the predicted memory per module (``estimate.modules``, docs/modules.md "Predicted"): the text
prints the tree at step 1 (the steady state) and the predicted peak's phase, as ``show --modules`` prints a run's
(a peak in the backward shows ``after_fwd``, whose activations that backward releases: ``after_bwd`` holds none);
``--json`` adds ``modules``, every predicted row (steps 0 and 1, the four phases). The tree's depth is
``runtime.module_depth`` (``--set runtime.module_depth=N``; 0, attribution off for runs, gives the default depth
here: asking for modules is asking for some). A load or generate job has no training step to split: it prints its
estimate with a note saying so (exit 0) and its JSON has no ``modules``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from blipmon.core.config import ConfigError


def memory_arg(flag: str, text: str | None) -> int | None:
    """A ``--gpu-memory``/``--host-memory`` value in bytes (None when not given); ConfigError says what is wrong."""
    from blipmon.core.units import parse_memory

    if text is None:
        return None
    try:
        return parse_memory(text)
    except ValueError as e:
        raise ConfigError(f"{flag} {e}") from None


def run(args: Any) -> int:
    from blipmon.core.config import resolve
    from blipmon.estimate.judge import judge

    gpu = memory_arg("--gpu-memory", args.gpu_memory)
    host = memory_arg("--host-memory", getattr(args, "host_memory", None))
    cfg = resolve(args.config, args.overrides)
    j = judge(cfg, gpu_memory=gpu, host_memory=host)
    rows, note = module_rows(cfg, j) if getattr(args, "modules", False) else (None, None)
    if args.json:
        data = j.to_json()
        if rows is not None:
            from blipmon.estimate.modules import rows_json

            data["modules"] = rows_json(rows)
        print(json.dumps(data, indent=1))
    else:
        text = render(j)
        if rows is not None:
            text += render_modules(j, rows)
        if note:
            text += f"note     {note}\n"
        sys.stdout.write(text)
    return 0


def module_rows(cfg: dict[str, Any], j: Any) -> tuple[list[Any] | None, str | None]:
    """(the predicted per-module rows, None) for a training job; (None, why not) for a load or generate job."""
    from blipmon.core import config as config_mod
    from blipmon.core.schema import SCHEMA
    from blipmon.estimate.modules import predict_modules

    cfg = config_mod.validate(cfg)
    if cfg["job"]["kind"] != "train":
        return None, (
            f"--modules: per-module prediction covers training jobs (job.kind = {cfg['job']['kind']}); "
            "this estimate's devices say where the weights go"
        )
    depth = int(cfg["runtime"]["module_depth"]) or int(SCHEMA["runtime.module_depth"].default)
    return predict_modules(cfg, depth=depth, est=j.estimate), None


def render_modules(j: Any, rows: list[Any]) -> str:
    """The predicted tree at step 1 and the predicted peak's phase, as ``show --modules`` prints a run's."""
    from blipmon.core.module_view import build_tree, walk
    from blipmon.core.report import MODULES_NOTE, module_table
    from blipmon.core.safe_text import one_line

    est = j.estimate
    step, phase, why = 1, est.peak_phase, "the steady state, at the predicted peak's phase"
    if phase == "after_bwd":  # that boundary holds no activations: show what the peaking backward starts from
        phase, why = "after_fwd", "the steady state; the predicted peak is in the backward that starts here"
    nodes = walk(build_tree([r for r in rows if r.step == step and r.phase == phase]))
    lines = [f"modules  predicted at step {step} {phase} ({why}); {MODULES_NOTE}"]
    lines += ["  " + line for line in module_table(nodes)]
    return "\n".join(one_line(line) for line in lines) + "\n"


def render(j: Any) -> str:
    """The human text: the estimate's own table (a training step's phases, or a load's devices), a line per
    device with its verdict, and the overall verdict last."""
    est = j.estimate
    lines = est.render_lines() if hasattr(est, "render_lines") else _train_lines(est)
    lines += j.device_lines()
    lines.append(f"verdict  {verdict_text(j)}   ({j.seconds:.1f} s)")
    return "\n".join(lines) + "\n"


def verdict_text(j: Any) -> str:
    """ "FITS with X to spare", "OUT OF MEMORY: ..." naming where (a training interval, a device, the host), or
    "CANNOT RUN AS CONFIGURED: why" when no memory would do (the judgement's ``refused``: a map bitsandbytes or
    accelerate refuses), which "out of memory" would misstate: the verdict is ``oom`` only so that it is not ``fits``.
    """
    from blipmon.core.safe_text import one_line
    from blipmon.core.units import fmt_bytes

    est = j.estimate
    refused = getattr(j, "refused", "")
    if refused:
        return f"CANNOT RUN AS CONFIGURED: {one_line(refused)}"
    if j.verdict == "fits":
        return f"FITS with {fmt_bytes(j.headroom_bytes)} to spare"
    lim = j.device_judgement(j.limiting_device)
    if not hasattr(est, "runs_out"):  # a load or generate job: the device that is short
        return f"OUT OF MEMORY: {est.runs_out_text(lim)}"
    host_short = any(d.device == "cpu" and d.verdict == "oom" for d in j.judged) and est.device == "cuda"
    if host_short and est.runs_out is None:
        return (
            f"OUT OF MEMORY: host RAM: the offloaded optimizer state needs {fmt_bytes(lim.total_bytes)}, "
            f"{fmt_bytes(-(lim.headroom_bytes or 0))} more than --host-memory"
        )
    text = f"OUT OF MEMORY: runs out at {est.runs_out_text()}"
    first = est.runs_out
    if first is not None and (first.step, first.phase) != (est.peak_step, est.peak_phase):
        text += f"; its peak would be at step {est.peak_step} {est.peak_phase}, {fmt_bytes(-est.headroom_bytes)} over"
    if host_short:
        text += "; host RAM is short too"
    return text


def _train_lines(est: Any) -> list[str]:
    """A training estimate's table: both steps' four phases (GiB, or MiB for small models), then its peak."""
    from blipmon.core.units import GIB, MIB, fmt_bytes

    unit, div = ("GiB", GIB) if est.peak_bytes >= GIB else ("MiB", MIB)

    where = "GPU" if est.device == "cuda" else "host RAM (CPU run)"
    head = ["step", "phase", "params", "grads", "optim", "acts", "other", "total"]
    rows = [head]
    for p in est.phases:
        mark = "  <- peak" if (p.phase, p.step) == (est.peak_phase, est.peak_step) else ""
        vals = [p.params, p.grads, p.optim, p.acts, p.other, p.total]
        rows.append([str(p.step), p.phase, *(f"{v / div:.2f}" for v in vals[:-1]), f"{vals[-1] / div:.2f}{mark}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        f"estimate {est.name}   {est.model_id} on {where}",
        f"params   {est.total_params:,} ({est.trainable_params:,} trainable)",
        f"phases   ({unit}; step 0 = the first optimizer step, step 1 = steady state; categories at the step's last",
        "         micro-step; total = predicted peak of the interval ending at the phase, temporaries included)",
    ]
    for r in rows:
        lines.append(
            "  "
            + "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
    lines.append(
        f"peak     {fmt_bytes(est.peak_bytes)} at step {est.peak_step} {est.peak_phase}, "
        f"+ {fmt_bytes(est.runtime_bytes)} {'GPU overheads' if est.device == 'cuda' else 'runtime'}, "
        f"of {fmt_bytes(est.capacity_bytes)} ({est.capacity_source})"
    )
    for n in est.notes:
        lines.append(f"note     {n}")
    if est.host_optim_bytes:
        lines.append(f"host     {fmt_bytes(est.host_optim_bytes)} of host RAM for offloaded optimizer state")
    return lines
