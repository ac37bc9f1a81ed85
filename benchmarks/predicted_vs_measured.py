"""The estimator against real runs: predicted peak beside the allocator's measured peak, preset by preset.

Each preset runs for a few steps with random weights (no download) in its own ``blipmon run`` process, which
saves the prediction it made at start; this script pairs that prediction with what the run measured
(``blipmon.estimate.predicted_vs_measured``) and prints, per preset: the verdict beside the outcome, the predicted
and measured peak and their ratio (goal: within 10 %), whether params, grads and optimizer state matched to the
byte, and the largest activation error. A GPU run compares the allocator's per-phase ``peak``; ``--cpu`` runs
the tiny presets on the CPU (no allocator: totals are the four categories).

On the CPU there is no allocator peak to hold the windows' predicted peaks to, so ``--cpu`` also trains the same
configuration in this process under an independent count of every live tensor storage
(``tests/reference/live_storage.py``: a dispatch mode and storage finalizers, no blipmon code) and prints, beside
the boundary figures, each window's predicted peak (between steps, forward, backward, optimizer step; steps 0 and
1) against that reference's peak.

On a GPU it also prints, for calibrating the estimate's GPU overheads (docs/memory-model.md, "GPU overheads"),
each predicted term beside what the run measured:

- free space in the allocator's segments beside the run's ``reserved - allocated`` (at their peaks);
- what the allocator holds besides the predicted peak (rounding, cuBLAS workspaces, DDP buckets, DeepSpeed's
  buffer) beside the measured allocated peak minus the predicted one (this also holds the activation error);
- what lives outside the allocator (CUDA context, NCCL) beside the device's used memory minus the reserved peak
  (NVML's figure for the whole GPU: run on an otherwise idle GPU).

    python benchmarks/predicted_vs_measured.py [PRESET ...] [--steps N] [--out DIR] [--cpu] [--json]

With no PRESET: the seed lab's H100 rows that ran in the lab (the ones predicted to fit an 80 GB card).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

GIB = 1024**3
LAB_FITS = [
    "h100/reduced-batch",
    "h100/grad-accum",
    "h100/bf16-true",
    "h100/bf16-mixed",
    "h100/opt-6.7b",
    "h100/sgd",
    "h100/adam-8bit",
    "h100/act-ckpt",
    "h100/lora",
    "h100/qlora",
]
CPU_DEFAULT = ["tiny/blip2-opt", "tiny/blip2-t5"]


def reference_windows(preset: str, steps: int, prediction: dict[str, Any]) -> dict[str, Any]:
    """Each window's predicted peak against the independent live-storage count of the same configuration (CPU)."""
    tests = Path(__file__).resolve().parents[1] / "tests"
    if not (tests / "reference" / "live_storage.py").is_file():
        return {"error": f"no reference counter in {tests} (a source checkout has it)"}
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    from reference.train_like_runner import reference_trace, windows

    from blipmon.core import config

    sets = ["model.device_map=cpu", f"train.max_steps={max(steps, 2)}"]
    if not preset.startswith("tiny/"):
        sets.append("model.weights=random")
    cfg = config.resolve(preset, sets)
    if cfg["train"]["num_workers"]:
        cfg["train"]["num_workers"] = 0  # the counter watches one process; workers only move where items are made
    trace = reference_trace(cfg, steps=2)
    rows = windows(prediction, trace)
    return {
        "rows": rows,
        "exact": all(r["predicted"] == r["reference"] for r in rows),
        "error_max": max(abs(r["error"]) for r in rows),
    }


def run_one(preset: str, steps: int, out: Path, cpu: bool) -> dict[str, Any]:
    from blipmon.core.run import load_run
    from blipmon.estimate import predicted_vs_measured

    cmd = [sys.executable, "-m", "blipmon", "run", preset, "--out", str(out), "--set", f"train.max_steps={steps}"]
    if not preset.startswith("tiny/"):
        cmd += ["--set", "model.weights=random"]
    if cpu:
        cmd += ["--set", "model.device_map=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [x for x in proc.stdout.splitlines() if x.strip()]
    row: dict[str, Any] = {"preset": preset, "exit": proc.returncode}
    if not lines or not Path(lines[-1]).is_dir():
        row["error"] = (proc.stderr.strip().splitlines() or ["no run directory printed"])[-1]
        return row
    run = load_run(Path(lines[-1]))
    summary = run.summary()
    row["run"] = lines[-1]
    row["status"] = summary["status"]
    if not isinstance(run.prediction, dict):
        row["error"] = "the run saved no prediction"
        return row
    rows = [r for r in predicted_vs_measured(run.prediction, summary) if r["measured"] is not None]
    totals = [r for r in rows if r["category"] == "total"]
    exact = [r for r in rows if r["category"] in ("params", "grads", "optim")]
    acts = [r for r in rows if r["category"] == "acts" and r["error"] is not None]
    row["verdict"] = run.prediction.get("verdict")
    row["predicted_peak"] = max((r["predicted"] for r in totals), default=None)
    row["measured_peak"] = max((r["measured"] for r in totals), default=None)
    if row["predicted_peak"] and row["measured_peak"]:
        row["ratio"] = round(row["predicted_peak"] / row["measured_peak"], 4)
    row["exact"] = all(r["predicted"] == r["measured"] for r in exact) if exact else None
    row["acts_error_max"] = round(max((abs(r["error"]) for r in acts), default=0.0), 4)
    row["overheads"] = overhead_pairs(run.prediction, summary, row["predicted_peak"])
    if cpu:
        try:
            row["windows"] = reference_windows(preset, steps, run.prediction)
        except Exception as e:  # noqa: BLE001 - the boundary figures stand without the reference
            row["windows"] = {"error": f"{type(e).__name__}: {e}"}
    return row


INSIDE = ("allocator_rounding", "cublas_workspaces", "ddp_buckets", "deepspeed_offload_buffer")
OUTSIDE = ("cuda_context", "nccl_buffers")


def overhead_pairs(prediction: dict[str, Any], summary: dict[str, Any], predicted_peak: int | None) -> dict[str, Any]:
    """Each predicted GPU term, and the measured figure it is to be calibrated against (None where not measured)."""
    terms = prediction.get("overheads")
    if not isinstance(terms, dict):
        return {}
    peaks = summary.get("peaks") or {}

    def num(v: Any) -> int | None:
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    alloc, reserved, used = num(peaks.get("allocated")), num(peaks.get("reserved")), num(peaks.get("device_used"))
    return {
        "terms": {k: v for k, v in terms.items() if k != "total"},
        "segments": {
            "predicted": terms.get("allocator_segments"),
            "measured": reserved - alloc if reserved is not None and alloc is not None else None,
        },
        "inside_allocator": {
            "predicted": sum(int(terms.get(k) or 0) for k in INSIDE),
            "measured": alloc - predicted_peak if alloc is not None and predicted_peak else None,
        },
        "outside_allocator": {
            "predicted": sum(int(terms.get(k) or 0) for k in OUTSIDE),
            "measured": used - reserved if used is not None and reserved is not None else None,
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("presets", nargs="*")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--cpu", action="store_true", help="tiny presets on the CPU: checks the script, not the GPU")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("predicted_vs_measured: needs a GPU (or --cpu to check the script on tiny presets)", file=sys.stderr)
        return 2
    presets = args.presets or (CPU_DEFAULT if args.cpu else LAB_FITS)
    device = "CPU" if args.cpu else torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        rows = []
        for p in presets:
            row = run_one(p, args.steps, out, args.cpu)
            rows.append(row)
            if not args.json:
                print(_line(row), flush=True)
    within = [r for r in rows if r.get("ratio") is not None and abs(r["ratio"] - 1) <= 0.10]
    measured = [r for r in rows if r.get("ratio") is not None]
    if args.json:
        print(json.dumps({"device": device, "rows": rows}, indent=2))
    else:
        print(f"\n{device}: predicted peak within 10 % of measured for {len(within)}/{len(measured)} runs")
        checked = [r for r in rows if "rows" in (r.get("windows") or {})]
        if checked:
            exact = sum(r["windows"]["exact"] for r in checked)
            print(
                f"{device}: every window's predicted peak equal to the independent reference for {exact}/{len(checked)}"
            )
    return 0


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['preset']:24s} ERROR {r['error']}"
    gib = lambda b: f"{b / GIB:7.2f}" if b else "      —"  # noqa: E731
    ratio = f"{r['ratio']:.3f}" if r.get("ratio") else "—"
    line = (
        f"{r['preset']:24s} {r['status']:8s} predicted {r['verdict']:4s} peak {gib(r['predicted_peak'])} GiB"
        f"  measured {gib(r['measured_peak'])} GiB  ratio {ratio}  params/grads/optim exact: {r['exact']}"
        f"  acts max error {r['acts_error_max']:.1%}"
    )
    w = r.get("windows") or {}
    if "error" in w:
        line += f"\n{'':24s} windows: no reference ({w['error']})"
    elif w:
        mib = lambda b: f"{b / 2**20:.3f}"  # noqa: E731
        line += f"\n{'':24s} window peaks, predicted / independent reference (MiB):"
        for step in sorted({x["step"] for x in w["rows"]}):
            cells = [
                f"{x['window']} {mib(x['predicted'])}/{mib(x['reference'])} ({x['error']:+.2%})"
                for x in w["rows"]
                if x["step"] == step
            ]
            line += f"\n{'':24s}   step {step}: " + ", ".join(cells)
        line += f"\n{'':24s}   every window equal to the byte: {w['exact']}"
    o = r.get("overheads") or {}
    if o:
        mib = lambda b: "—" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
        terms = ", ".join(f"{k} {mib(v)}" for k, v in o["terms"].items())
        line += f"\n{'':24s} overheads (MiB): {terms}"
        for key, what in (
            ("segments", "reserved - allocated"),
            ("inside_allocator", "allocated peak - predicted peak"),
            ("outside_allocator", "device used - reserved"),
        ):
            line += (
                f"\n{'':24s}   {key}: predicted {mib(o[key]['predicted'])}, measured {mib(o[key]['measured'])} ({what})"
            )
    return line


if __name__ == "__main__":
    sys.exit(main())
