"""Seconds of ``blipmon fit`` for every seed-lab preset (the bar: at most 60 s each on a 2-core machine).

Each preset runs in a fresh ``blipmon fit PRESET --json`` process, so the time is what a user waits for: the
interpreter, torch and transformers imports, the meta models and every estimate the search makes, no GPU (the
presets are judged against the lab's card, as ``blipmon fit`` does on a machine without one). Prints one line per
preset (wall seconds, the search's own seconds, estimates made, verdict, largest batch, suggestions) and the
slowest; exits 1 when any preset takes longer than the bar or fails. ``cpu_s`` is the process's own CPU time
(user + system), which other work on a shared machine does not inflate the way it inflates the wall time.

``--check`` then holds every largest batch to its definition, in this process (a fresh estimator, not the fit's):
``blipmon estimate``'s verdict (``estimate.judge``) at the largest batch fits, at one more it does not.

    python benchmarks/fit_speed.py [--only h100/baseline ...] [--check] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

BAR_S = 60.0


def presets() -> list[str]:
    from blipmon.core import presets as p

    return p.group("h100") + p.group("a100")


def run_one(name: str) -> dict:
    cmd = [sys.executable, "-m", "blipmon", "fit", name, "--json"]
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row: dict = {"preset": name, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "code": proc.returncode}
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"
        return row
    out = json.loads(proc.stdout)
    row.update(
        fit_s=out["seconds"],
        estimates=out.get("estimates"),
        verdict=out["verdict"],
        max_batch_size=out["max_batch_size"],
        suggestions=len(out["suggestions"]),
        fitting=sum(1 for s in out["suggestions"] if s["verdict"] == "fits"),
    )
    return row


def check(name: str, m: int | None) -> str:
    """ "exact" when the estimate at ``m`` fits and at ``m + 1`` does not (at 1 does not, for None), else why not."""
    from blipmon.core.config import resolve
    from blipmon.estimate.judge import judge

    def verdict(b: int) -> str:
        return judge(resolve(name, [f"train.batch_size={b}"])).verdict

    if m is None:
        return "exact" if verdict(1) == "oom" else "NOT EXACT: batch 1 fits"
    if verdict(m) != "fits":
        return f"NOT EXACT: {m} does not fit"
    return "exact" if verdict(m + 1) == "oom" else f"NOT EXACT: {m + 1} fits too"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--check", action="store_true", help="verify each largest batch with two estimates")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for name in args.only or presets():
        row = run_one(name)
        if args.check and "error" not in row:
            row["check"] = check(name, row["max_batch_size"])
        rows.append(row)
        if args.json:
            continue
        if "error" in row:
            print(f"{name:28s} ERROR {row['error']}", flush=True)
            continue
        print(
            f"{name:28s} {row['wall_s']:5.1f} s wall, {row['cpu_s']:5.1f} s CPU (search {row['fit_s']:5.1f} s, "
            f"{row['estimates']:3d} estimates)  {row['verdict']:5s} largest batch {row['max_batch_size']!s:>4}"
            f"{' ' + row['check'] if 'check' in row else ''}  {row['suggestions']:2d} suggestions ({row['fitting']} fit)",
            flush=True,
        )
    slowest = max(rows, key=lambda r: r["wall_s"])
    over = [r for r in rows if r["wall_s"] > BAR_S or "error" in r or r.get("check", "exact") != "exact"]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(
            f"\nslowest {slowest['preset']} {slowest['wall_s']:.1f} s wall ({slowest.get('cpu_s', 0):.1f} s CPU); "
            f"max CPU {max(r.get('cpu_s', 0) for r in rows):.1f} s; "
            f"mean {sum(r['wall_s'] for r in rows) / len(rows):.1f} s; {len(over)} over {BAR_S:.0f} s, failed or not exact"
        )
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
