"""How much per-module attribution grows a profile: a long tiny run recorded with and without it (issue 12).

The same configuration trains twice in this process through the child's training loop, writing its records to a
real profile file: once with ``runtime.module_depth`` at its default (attribution on, at its default cadence) and
once with 0. Prints both files' sizes and their ratio (goal: at most 2x for 1,000 steps).

    python benchmarks/profile_size.py [CONFIG] [--steps N] [--set K=V ...]

The memory timeline's samples (written by the child's sampler thread, at ``runtime.sample_hz``) are not part of
either file: they are the same with and without attribution, so leaving them out makes the ratio larger, never
smaller, than a real run's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from blipmon.core.config import resolve
from blipmon.core.profile import EventWriter
from blipmon.runner.models import load_model
from blipmon.runner.train import Cursor, run_train


def record(cfg: dict, path: Path) -> int:
    """Train ``cfg`` into the profile at ``path``; its size in bytes."""
    loaded = load_model(cfg, cuda=False)
    writer = EventWriter(path)
    run_train(loaded, cfg, writer.write, Cursor(), cuda=False)
    writer.close()
    return path.stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="tiny/blip2-opt")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    base = ["train.batch_size=1", f"train.num_train_samples={args.steps}", "train.max_epochs=1", *args.overrides]
    sizes = {}
    with tempfile.TemporaryDirectory() as d:
        for depth in ("default", "0"):
            sets = base if depth == "default" else [*base, "runtime.module_depth=0"]
            cfg = resolve(args.config, sets)
            sizes[depth] = record(cfg, Path(d) / f"events-{depth}.jsonl")
            rt = cfg["runtime"]
            print(f"module_depth {rt['module_depth']} (every {rt['module_every']}): {sizes[depth]:,} bytes")
    print(f"{args.steps} steps of {args.config}: attribution on / off = {sizes['default'] / sizes['0']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
