"""Verdicts and timings of ``blipmon estimate`` for every seed-lab preset, against what the lab reported.

Each preset is estimated in a fresh ``blipmon estimate PRESET --gpu-memory SIZE --json`` process, so the time is
what a user waits for (imports and model building included, no GPU). SIZE is the capacity torch reports for the
lab's cards (80 GB A100 and H100). The seed lab (seeds/002) reports out-of-memory for ``baseline``,
``flan-t5-xxl`` and ``flan-t5-xxl-bs1`` on both cards; every other row ran. The presets reproduce the lab's
batches (captions tokenized alone, without BLIP-2's image placeholders, padded to the batch's longest caption);
``--set data.caption_tokens=N`` or ``--set data.image_placeholders=true`` shows how the verdicts move. Each row
shows the GPU overheads the verdict adds to the allocated peak (allocator rounding and segments, cuBLAS
workspaces, the CUDA context, ...; docs/memory-model.md, "GPU overheads") and the headroom left.

    python benchmarks/estimate_presets.py [--only h100/baseline ...] [--set K=V ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from blipmon.core.presets import LAB_CARD_BYTES as CAPACITY  # total_memory of the lab's cards

GIB = 1024**3
SEED_OOM = {"baseline", "flan-t5-xxl", "flan-t5-xxl-bs1"}


def presets() -> list[str]:
    from blipmon.core import presets as p

    return p.group("h100") + p.group("a100")


def run_one(name: str, sets: list[str]) -> dict:
    gpu = name.split("/")[0]
    cmd = [sys.executable, "-m", "blipmon", "estimate", name, "--gpu-memory", f"{CAPACITY[gpu]}B", "--json"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row = {"preset": name, "wall_s": round(wall, 1), "code": proc.returncode}
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"
        return row
    out = json.loads(proc.stdout)
    overheads = int((out.get("overheads") or {}).get("total") or 0)
    row.update(
        verdict=out["verdict"],
        peak_gib=round(out["peak_bytes"] / GIB, 2),
        overheads_gib=round(overheads / GIB, 2),
        headroom_gib=round((out["gpu_memory_bytes"] - out["peak_bytes"] - overheads) / GIB, 2),
        peak_phase=out["peak_phase"],
        capacity_gib=round(out["gpu_memory_bytes"] / GIB, 2),
        estimate_s=out["seconds"],
        seed="oom" if name.split("/")[1] in SEED_OOM else "fits",
    )
    row["agrees"] = row["verdict"] == row["seed"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    names = args.only or presets()
    rows = []
    for name in names:
        row = run_one(name, args.sets)
        rows.append(row)
        if not args.json:
            if "error" in row:
                print(f"{name:28s} ERROR {row['error']}", flush=True)
            else:
                mark = "agrees" if row["agrees"] else "DISAGREES"
                print(
                    f"{name:28s} {row['verdict']:5s} peak {row['peak_gib']:7.2f} GiB at {row['peak_phase']:15s}"
                    f" + {row['overheads_gib']:.2f} overheads of {row['capacity_gib']:.2f}"
                    f" (headroom {row['headroom_gib']:6.2f})   seed: {row['seed']:5s} {mark:10s}"
                    f" {row['wall_s']:5.1f} s (estimate {row['estimate_s']:.1f} s)",
                    flush=True,
                )
    ok = [r for r in rows if r.get("agrees")]
    slow = [r for r in rows if r["wall_s"] >= 30]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(
            f"\n{len(ok)}/{len(rows)} verdicts agree with the seed lab; "
            f"slowest {max(r['wall_s'] for r in rows):.1f} s; {len(slow)} at or over 30 s"
        )
    return 0 if len(ok) == len(rows) and not slow else 1


if __name__ == "__main__":
    sys.exit(main())
