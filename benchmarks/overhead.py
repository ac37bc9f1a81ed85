"""Cost of blipmon's per-phase probes on a training step, as a ratio measured side by side.

The same configuration trains with probes (four boundaries per micro-step; saved-tensor hooks, grads, optimizer
state and per-module attribution at its default depth on the steps counted in full, steps 0, 1 and every
``runtime.module_every``-th; events written to a real profile file) and without (NullProbe),
interleaved round by round in one process so machine noise hits both alike. Prints median step time with /
without, and the per-round ratios.

    python benchmarks/overhead.py [CONFIG] [--rounds N] [--whole-arms] [--set K=V ...]

Wall time is what a user waits for; on a machine other jobs share it swings with their load. So each step's CPU
time of this process (``time.process_time``, the training thread's work plus the sampler's) is measured too, and
its ratio printed beside: with ``OMP_NUM_THREADS=1`` it is the work the probes add, whoever else runs.

The process is pinned to one core (both modes). By default the two arms run side by side, one step of each in turn
(two threads passing a baton, so one runs at a time and the process's CPU time of a step is that step's): a swing
in the machine's load lasts many steps, so it hits both arms of a pair of steps alike. ``--whole-arms`` runs each
arm's steps one after the other instead, as this benchmark did before 2026-12: on a shared VM its rounds swing by
10-50 %. The loop is the same ``run_train``.

Goal (BENCHMARKS.md, issue 12): <= 1.03 on CPU with the tiny model, module attribution on; <= 1.02 on a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from blipmon.core.config import resolve
from blipmon.core.profile import EventWriter
from blipmon.runner.models import load_model
from blipmon.runner.train import Cursor, run_train


def measure(cfg: dict, probes: bool, cuda: bool, tmp: Path) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds) of each step after the first."""
    cfg = {**cfg, "runtime": {**cfg["runtime"], "probes": probes}}
    loaded = load_model(cfg, cuda=cuda)
    writer = EventWriter(tmp / f"events-{probes}.jsonl")
    steps: list[float] = []
    cpu: list[float] = []
    last = [time.process_time()]

    def emit(kind: str, **fields: object) -> None:
        writer.write(kind, **fields)
        if kind == "step":
            now = time.process_time()
            steps.append(float(fields["seconds"]))  # type: ignore[arg-type]
            cpu.append(now - last[0])
            last[0] = now

    run_train(loaded, cfg, emit, Cursor(), cuda=cuda)
    writer.close()
    return steps[1:], cpu[1:]  # the first step pays for lazy initialisation in both arms


def measure_per_step(cfg: dict, cuda: bool, tmp: Path) -> dict[bool, tuple[list[float], list[float]]]:
    """Both arms at once, a step of one then a step of the other: {probes: (wall seconds, CPU seconds)} of each
    step after the first. Each arm's training runs in its own thread; a baton lets one thread run at a time, from
    its first record to the end of its step."""
    import threading

    batons = {True: threading.Event(), False: threading.Event()}
    done = {True: False, False: False}
    out: dict[bool, tuple[list[float], list[float]]] = {True: ([], []), False: ([], [])}
    loaded = {probes: load_model({**cfg, "runtime": {**cfg["runtime"], "probes": probes}}, cuda=cuda)
              for probes in (True, False)}  # fmt: skip
    errors: list[BaseException] = []

    def arm(probes: bool) -> None:
        arm_cfg = {**cfg, "runtime": {**cfg["runtime"], "probes": probes}}
        writer = EventWriter(tmp / f"events-step-{probes}.jsonl")
        started = [False]
        last = [0.0, 0.0]

        def hand_over() -> None:
            batons[probes].clear()
            batons[not probes].set()
            if not done[not probes]:
                batons[probes].wait()
            last[0], last[1] = time.perf_counter(), time.process_time()

        def emit(kind: str, **fields: object) -> None:
            if not started[0]:  # everything before the first record ran alongside the other arm's
                started[0] = True
                batons[probes].wait()
                last[0], last[1] = time.perf_counter(), time.process_time()
            writer.write(kind, **fields)
            if kind == "step":
                out[probes][0].append(time.perf_counter() - last[0])
                out[probes][1].append(time.process_time() - last[1])
                hand_over()

        try:
            run_train(loaded[probes], arm_cfg, emit, Cursor(), cuda=cuda)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            writer.close()
            done[probes] = True
            batons[not probes].set()

    threads = [threading.Thread(target=arm, args=(probes,)) for probes in (True, False)]
    batons[True].set()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {probes: (walls[1:], cpus[1:]) for probes, (walls, cpus) in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="tiny/blip2-opt")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument(
        "--whole-arms",
        dest="per_step",
        action="store_false",
        help="run each arm's steps one after the other in a round (swings with the machine's load)",
    )
    ap.add_argument("--per-step", dest="per_step", action="store_true",
                    help="alternate the arms step by step (the default, see above)")  # fmt: skip
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    overrides = ["train.num_train_samples=256", "train.max_epochs=1", *args.overrides]
    cfg = resolve(args.config, overrides)
    cuda = torch.cuda.is_available() and cfg["model"]["device_map"] != "cpu"
    # One core for the whole benchmark (threads started later inherit it): the scheduler never moves a step to a
    # core whose caches hold none of it, which on a shared 2-core VM swung the ratios by +-20 % from step to step.
    pinned = ""
    if hasattr(os, "sched_setaffinity"):
        core = max(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        pinned = f", pinned to core {core}"
    with_p: list[float] = []
    without: list[float] = []
    cpu_with: list[float] = []
    cpu_without: list[float] = []
    paired: list[float] = []  # each round's ratio of medians: drift between rounds cancels out
    paired_cpu: list[float] = []
    step_pairs: list[float] = []  # per step: CPU time of each step with probes / the next step without
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            medians = {}
            cpu_medians = {}
            both = measure_per_step(cfg, cuda, Path(d)) if args.per_step else {}
            if both:  # each step with probes over the step without that ran right after it
                step_pairs.extend(a / b for a, b in zip(both[True][1], both[False][1], strict=False))
            for probes in order:
                steps, cpu = both[probes] if args.per_step else measure(cfg, probes, cuda, Path(d))
                (with_p if probes else without).extend(steps)
                (cpu_with if probes else cpu_without).extend(cpu)
                medians[probes] = statistics.median(steps)
                cpu_medians[probes] = statistics.median(cpu)
            paired.append(medians[True] / medians[False])
            paired_cpu.append(cpu_medians[True] / cpu_medians[False])
            print(
                f"round {r}: CPU ms with {cpu_medians[True] * 1000:.2f}, without {cpu_medians[False] * 1000:.2f}",
                flush=True,
            )
    a, b = statistics.median(with_p), statistics.median(without)
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    rt = cfg["runtime"]
    how = "rounds of steps alternating between the arms" if args.per_step else "interleaved rounds"
    print(f"config {args.config} on {device}{pinned}; {len(with_p)} steps per arm, {args.rounds} {how}")
    print(f"module attribution: depth {rt['module_depth']}, every {rt['module_every']} steps (0 = off)")
    print(f"median step with probes    {a * 1000:8.2f} ms")
    print(f"median step without probes {b * 1000:8.2f} ms")
    print(f"overhead ratio {a / b:.3f}")
    print(f"per-round ratios: median {statistics.median(paired):.3f}, min {min(paired):.3f}, max {max(paired):.3f}")
    print("  " + " ".join(f"{x:.3f}" for x in paired))
    ca, cb = statistics.median(cpu_with), statistics.median(cpu_without)
    print(f"CPU time per step: with {ca * 1000:.2f} ms, without {cb * 1000:.2f} ms, ratio {ca / cb:.3f}")
    print(f"per-round CPU ratios: median {statistics.median(paired_cpu):.3f}")
    print("  " + " ".join(f"{x:.3f}" for x in paired_cpu))
    # Medians leave out the steps counted in full (1 in runtime.module_every): the mean says what they add.
    print(f"mean CPU time per step (the steps counted in full included): ratio "
          f"{statistics.fmean(cpu_with) / statistics.fmean(cpu_without):.3f}")  # fmt: skip
    if step_pairs:
        q = statistics.quantiles(step_pairs, n=4)
        print(f"per-step CPU ratios (a step with probes / the next without): median {statistics.median(step_pairs):.3f}"
              f", quartiles {q[0]:.3f} {q[2]:.3f}, {len(step_pairs)} pairs")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
