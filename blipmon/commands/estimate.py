"""``blipmon estimate CONFIG [--set K=V]... [--gpu-memory SIZE] [--host-memory SIZE] [--json]``: will it fit?

Exit codes: 0 when an estimate was made, whatever its verdict (the verdict is data: read ``--json``'s
``verdict``, or the last line of the table); 2 for a configuration or usage error (a bad key, a bad size, a GPU
configuration without ``--gpu-memory`` on a machine without a GPU, a step that cannot run), as ``blipmon run``.

Sizes need a unit (``80GiB``, ``24GB``, ``512MiB``, ``85899345920B``): a bare ``80`` is refused rather than read as
80 bytes. ``--host-memory`` is the machine's RAM: a CPU run is judged against it instead of the memory available
right now, and a GPU run that offloads its optimizer to the host (DeepSpeed) is judged on both.
"""

from __future__ import annotations

import dataclasses
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

    capacity = memory_arg("--gpu-memory", args.gpu_memory)
    host = memory_arg("--host-memory", getattr(args, "host_memory", None))
    cfg = resolve(args.config, args.overrides)
    from blipmon.estimate import estimate
    from blipmon.estimate.timeline import target_device

    device = None
    if capacity is not None and cfg["model"]["device_map"] in ("auto", "cpu-first"):
        device = "cuda"  # --gpu-memory says which machine the user means: a GPU one
    host_bytes = None
    if host is not None and target_device(cfg, device, capacity) == "cpu":
        # A CPU run lives in host RAM: the machine's RAM replaces "what is available on this machine right now".
        est = estimate(cfg, capacity_bytes=host, device="cpu")
        est = dataclasses.replace(est, capacity_source="--host-memory")
        host_bytes = est.peak_bytes + est.runtime_bytes
    else:
        est = estimate(cfg, capacity_bytes=capacity, device=device)
        if host is not None:
            host_bytes = est.host_optim_bytes
            if host_bytes > host:  # DeepSpeed's offloaded optimizer does not fit the host: the run cannot run
                est = dataclasses.replace(est, verdict="oom")
    if args.json:
        data = est.to_json()
        if host is not None:
            data["host_memory_bytes"] = host
            data["host_bytes"] = host_bytes
        print(json.dumps(data, indent=1))
    else:
        sys.stdout.write(render(est, host_memory=host, host_bytes=host_bytes))
    return 0


def render(est: Any, *, host_memory: int | None = None, host_bytes: int | None = None) -> str:
    """The human table: both steps' four phases (GiB, or MiB for small models), then the peak and the verdict.

    ``host_memory`` (``--host-memory``) and ``host_bytes`` (what the estimate puts in host RAM) add a line on the
    host for a GPU run, and the verdict names the host when it is the host that runs out.
    """
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
    hr = est.headroom_bytes
    lines.append(
        f"peak     {fmt_bytes(est.peak_bytes)} at step {est.peak_step} {est.peak_phase}, "
        f"+ {fmt_bytes(est.runtime_bytes)} {'GPU overheads' if est.device == 'cuda' else 'runtime'}, "
        f"of {fmt_bytes(est.capacity_bytes)} ({est.capacity_source})"
    )
    for n in est.notes:
        lines.append(f"note     {n}")
    host_short = False
    if est.device == "cuda" and host_memory is not None:
        need = host_bytes or 0
        host_short = need > host_memory
        if need:
            lines.append(
                f"host     {fmt_bytes(need)} of host RAM for offloaded optimizer state, "
                f"of {fmt_bytes(host_memory)} (--host-memory)"
            )
        else:
            lines.append(
                f"host     no offloaded state in host RAM (the process itself aside), "
                f"of {fmt_bytes(host_memory)} (--host-memory)"
            )
    elif est.host_optim_bytes:
        lines.append(f"host     {fmt_bytes(est.host_optim_bytes)} of host RAM for offloaded optimizer state")
    if est.verdict == "fits":
        verdict = f"FITS with {fmt_bytes(hr)} to spare"
    elif host_short and est.runs_out is None:
        verdict = (
            f"OUT OF MEMORY: host RAM: the offloaded optimizer state needs {fmt_bytes(host_bytes)}, "
            f"{fmt_bytes((host_bytes or 0) - (host_memory or 0))} more than --host-memory"
        )
    else:
        verdict = f"OUT OF MEMORY: runs out at {est.runs_out_text()}"
        first = est.runs_out
        if first is not None and (first.step, first.phase) != (est.peak_step, est.peak_phase):
            verdict += f"; its peak would be at step {est.peak_step} {est.peak_phase}, {fmt_bytes(-hr)} over"
        if host_short:
            verdict += "; host RAM is short too"
    lines.append(f"verdict  {verdict}   ({est.seconds:.1f} s)")
    return "\n".join(lines) + "\n"
