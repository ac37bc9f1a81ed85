"""Cost of blipmon's per-phase probes on a training step, as a ratio measured side by side.

The same configuration trains with probes (saved-tensor hooks, four boundaries per micro-step,
events written to a real profile file) and without (NullProbe), interleaved round by round in one
process so machine noise hits both alike. Prints median step time with / without.

    python benchmarks/overhead.py [CONFIG] [--rounds N] [--set K=V ...]

Goal (BENCHMARKS.md): <= 1.05 on CPU with the tiny model, <= 1.02 on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from blipmon.core.config import resolve
from blipmon.core.profile import EventWriter
from blipmon.runner.models import load_model
from blipmon.runner.train import Cursor, run_train


def measure(cfg: dict, probes: bool, cuda: bool, tmp: Path) -> list[float]:
    cfg = {**cfg, "runtime": {**cfg["runtime"], "probes": probes}}
    loaded = load_model(cfg, cuda=cuda)
    writer = EventWriter(tmp / f"events-{probes}.jsonl")
    steps: list[float] = []

    def emit(kind: str, **fields: object) -> None:
        writer.write(kind, **fields)
        if kind == "step":
            steps.append(float(fields["seconds"]))  # type: ignore[arg-type]

    run_train(loaded, cfg, emit, Cursor(), cuda=cuda)
    writer.close()
    return steps[1:]  # the first step pays for lazy initialisation in both arms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="tiny/blip2-opt")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    overrides = ["train.num_train_samples=256", "train.max_epochs=1", *args.overrides]
    cfg = resolve(args.config, overrides)
    cuda = torch.cuda.is_available() and cfg["model"]["device_map"] != "cpu"
    with_p: list[float] = []
    without: list[float] = []
    paired: list[float] = []  # each round's ratio of medians: drift between rounds cancels out
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            medians = {}
            for probes in order:
                steps = measure(cfg, probes, cuda, Path(d))
                (with_p if probes else without).extend(steps)
                medians[probes] = statistics.median(steps)
            paired.append(medians[True] / medians[False])
    a, b = statistics.median(with_p), statistics.median(without)
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"config {args.config} on {device}; {len(with_p)} steps per arm, {args.rounds} interleaved rounds")
    print(f"median step with probes    {a * 1000:8.2f} ms")
    print(f"median step without probes {b * 1000:8.2f} ms")
    print(f"overhead ratio {a / b:.3f}")
    print(
        f"per-round ratios: median {statistics.median(paired):.3f}, "
        f"min {min(paired):.3f}, max {max(paired):.3f} ({len(paired)} rounds)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
