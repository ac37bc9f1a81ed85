"""``blipmon estimate CONFIG [--set K=V]... [--gpu-memory SIZE] [--json]``: will it fit, and where will it run out?

Exit codes: 0 when an estimate was made, whatever its verdict (the verdict is data: read ``--json``'s
``verdict``, or the last line of the table); 2 for a configuration or usage error (a bad key, a bad size, a GPU
configuration without ``--gpu-memory`` on a machine without a GPU, a step that cannot run), as ``blipmon run``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from blipmon.core.config import ConfigError


def main(args: Any) -> int:
    from blipmon.core.config import resolve
    from blipmon.core.units import parse_size

    capacity = None
    if args.gpu_memory is not None:
        try:
            capacity = parse_size(args.gpu_memory)
        except ValueError as e:
            raise ConfigError(f"--gpu-memory: {e}") from None
        if capacity <= 0:
            raise ConfigError(f"--gpu-memory {args.gpu_memory!r}: expected a size above zero")
    cfg = resolve(args.config, args.overrides)
    from blipmon.estimate import estimate

    device = None
    if capacity is not None and cfg["model"]["device_map"] in ("auto", "cpu-first"):
        device = "cuda"  # --gpu-memory says which machine the user means: a GPU one
    est = estimate(cfg, capacity_bytes=capacity, device=device)
    if args.json:
        print(json.dumps(est.to_json(), indent=1))
    else:
        sys.stdout.write(render(est))
    return 0


def render(est: Any) -> str:
    """The human table: both steps' four phases (GiB, or MiB for small models), then the peak and the verdict."""
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
        f"+ {fmt_bytes(est.runtime_bytes)} runtime, of {fmt_bytes(est.capacity_bytes)} ({est.capacity_source})"
    )
    for n in est.notes:
        lines.append(f"note     {n}")
    if est.host_optim_bytes:
        lines.append(f"host     {fmt_bytes(est.host_optim_bytes)} of host RAM for offloaded optimizer state")
    if est.verdict == "fits":
        verdict = f"FITS with {fmt_bytes(hr)} to spare"
    else:
        verdict = f"OUT OF MEMORY: runs out at {est.runs_out_text()}"
        first = est.runs_out
        if first is not None and (first.step, first.phase) != (est.peak_step, est.peak_phase):
            verdict += f"; its peak would be at step {est.peak_step} {est.peak_phase}, {fmt_bytes(-hr)} over"
    lines.append(f"verdict  {verdict}   ({est.seconds:.1f} s)")
    return "\n".join(lines) + "\n"
