"""The training loop's cost and intervals on the GPU, emulated on the CPU (issue 15, items 6 and 11).

``blipmon run``'s real loop trains the real tiny model here; only what cannot exist on this machine is stood
in for: the CUDA allocator's counters (``FakeAllocator`` below, the caching allocator's bookkeeping of one
GPU) and ``torch.cuda.synchronize`` (counted). The loop is told it runs on CUDA, so every GPU-only branch of
it runs.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from blipmon.core.config import resolve
from blipmon.runner import train as train_mod
from blipmon.runner.models import load_model
from blipmon.runner.probes import PhaseProbe
from blipmon.runner.train import Cursor, mean_loss, run_train

MIB = 1024**2
STEPS, ACC = 2, 4
TRAIN_PY = str(Path(train_mod.__file__))


class FakeAllocator:
    """One GPU's allocator counters, read and reset as torch does; ``log`` keeps the order of the calls."""

    def __init__(self, current: int) -> None:
        self.current, self.peak = current, current
        self.log: list[str] = []

    def memory_stats(self, dev: int) -> dict[str, int]:
        self.log.append(f"stats:{dev}")
        return {
            "allocated_bytes.all.current": self.current,
            "allocated_bytes.all.peak": self.peak,
            "reserved_bytes.all.current": self.current + 2 * MIB,
        }

    def reset_peak(self, dev: int) -> None:
        self.log.append(f"reset:{dev}")
        self.peak = self.current


@pytest.fixture(scope="module")
def cuda_loop(tiny_models: dict[str, Path]) -> Iterator[dict[str, Any]]:
    """Run the train loop "on CUDA" once: fake allocator counters for GPU 0, synchronize counted, events kept."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _run_on_fake_cuda(monkeypatch)


def _run_on_fake_cuda(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    cfg = resolve(
        "tiny/blip2-opt",
        ["train.num_train_samples=16", "train.batch_size=2", f"train.accumulate_grad_batches={ACC}",
         "train.max_epochs=1", "runtime.sample_hz=2"],
    )  # fmt: skip
    loaded = load_model(cfg, cuda=False)
    fake = FakeAllocator(current=10 * MIB)
    fake.current, fake.peak = 10 * MIB, 510 * MIB  # loading peaked at 510 MiB, before the loop
    syncs: list[Any] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: (syncs.append(device), fake.log.append("sync")))

    def probe(*args: Any, **kwargs: Any) -> PhaseProbe:
        kwargs.update(devices=[0], memory_stats=fake.memory_stats, reset_peak=fake.reset_peak)
        return PhaseProbe(*args, **kwargs)

    monkeypatch.setattr(train_mod, "PhaseProbe", probe)
    conversions: list[str] = []
    for method in ("__float__", "item", "tolist"):
        real = getattr(torch.Tensor, method)

        def counted(self: torch.Tensor, *a: Any, __real: Any = real, __name: str = method, **k: Any) -> Any:
            if sys._getframe(1).f_code.co_filename == TRAIN_PY:  # only the loop's own conversions
                conversions.append(__name)
            return __real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, method, counted)
    events: list[tuple[str, dict[str, Any]]] = []

    def emit(kind: str, **kw: Any) -> None:
        events.append((kind, kw))
        if kind == "phase":
            fake.log.append("phase")

    run_train(loaded, cfg, emit, Cursor(), cuda=True)
    return {"fake": fake, "syncs": syncs, "events": events, "conversions": conversions}


def test_step_0_first_peak_is_not_the_load_peak(cuda_loop: dict[str, Any]) -> None:
    fake, events = cuda_loop["fake"], cuda_loop["events"]
    phases = [kw for kind, kw in events if kind == "phase"]
    assert (phases[0]["step"], phases[0]["micro_step"], phases[0]["phase"]) == (0, 0, "before_fwd")
    assert phases[0]["peak"] == 10 * MIB  # the interval since setup ended, not the load's 510 MiB
    assert fake.log[0] == "reset:0"  # the reset came before the first boundary's reading
    assert fake.log.index("reset:0") < fake.log.index("stats:0") < fake.log.index("phase")


def test_one_memory_stats_per_boundary_and_one_synchronize_per_step(cuda_loop: dict[str, Any]) -> None:
    fake, events, syncs = cuda_loop["fake"], cuda_loop["events"], cuda_loop["syncs"]
    phases = [kw for kind, kw in events if kind == "phase"]
    steps = [kw for kind, kw in events if kind == "step"]
    assert len(steps) == STEPS and len(phases) == STEPS * (3 * ACC + 1)
    calls = Counter(entry for entry in fake.log if entry != "phase")
    assert calls["stats:0"] == len(phases)  # exactly one memory_stats per boundary (one GPU)
    assert calls["reset:0"] == len(phases) + 1  # each boundary, and the start of the first interval
    assert syncs == [0] * STEPS  # once per optimizer step, for its time: never per phase
    between = fake.log[fake.log.index("phase") : fake.log.index("sync")]
    assert between.count("phase") == 3 * ACC + 1  # all of step 0's phases came before its one synchronize


def test_losses_become_numbers_once_per_optimizer_step(cuda_loop: dict[str, Any]) -> None:
    """Each micro-step's loss stays a tensor; one host copy per step (the step record needs the number)."""
    assert cuda_loop["conversions"] == ["tolist"] * STEPS
    steps = [kw for kind, kw in cuda_loop["events"] if kind == "step"]
    assert all(isinstance(s["loss"], float) and s["micro_steps"] == ACC for s in steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_loss_equals_converting_each_micro_step(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    losses = [torch.rand((), dtype=dtype) * 7 for _ in range(5)]
    assert mean_loss(losses, scale=ACC) == sum(float(x) * ACC for x in losses) / len(losses)
    assert mean_loss([]) is None
