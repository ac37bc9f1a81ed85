"""Step counting, checked against a literal walk through the training loop Lightning runs."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blipmon.core.config import validate
from blipmon.core.schedule import schedule


def cfg(n: int, bs: int, acc: int = 1, epochs: int = 1, max_steps: int = -1, **train: Any) -> dict[str, Any]:
    return validate(
        {
            "train": {
                "num_train_samples": n,
                "batch_size": bs,
                "accumulate_grad_batches": acc,
                "max_epochs": epochs,
                "max_steps": max_steps,
                **train,
            }
        }
    )


def walk(n: int, bs: int, acc: int, epochs: int, max_steps: int) -> tuple[int, list[int]]:
    """Optimizer steps and micro-batches per step, the way Lightning counts them.

    Batches are drawn without drop_last (the last one may be short); the optimizer steps after every
    ``acc`` micro-batches and at the end of each epoch (a partial accumulation still steps); training
    stops as soon as ``max_steps`` optimizer steps are done.
    """
    batches = -(-n // bs)
    steps, micro_per_step = 0, []
    for _ in range(epochs):
        micro = 0
        for i in range(batches):
            if max_steps > 0 and steps >= max_steps:
                return steps, micro_per_step
            micro += 1
            if micro == acc or i == batches - 1:
                steps += 1
                micro_per_step.append(micro)
                micro = 0
    return steps, micro_per_step


@pytest.mark.parametrize(
    ("args", "micro", "per_epoch", "total"),
    [
        ((512, 32), 16, 16, 16),
        ((512, 16, 4, 2), 32, 8, 16),  # the lab's grad-accum row
        ((512, 64, 1, 2), 8, 8, 16),  # the H100 baseline
        ((12, 2, 3), 6, 2, 2),  # the recorder test's main run
        ((16, 2, 3), 8, 3, 3),  # 3 + 3 + a trailing 2 that still steps
        ((10, 4), 3, 3, 3),  # a short last batch
        ((512, 16, 4, 2, 2), 32, 8, 2),  # max_steps caps the total (the DeepSpeed rows)
        ((1, 1, 8, 3), 1, 1, 3),  # one sample: one micro-step, one (short) optimizer step per epoch
    ],
)
def test_schedule_examples(args: tuple[int, ...], micro: int, per_epoch: int, total: int) -> None:
    s = schedule(cfg(*args))
    assert (s.micro_per_epoch, s.steps_per_epoch, s.total_steps) == (micro, per_epoch, total)


@given(
    n=st.integers(1, 3000),
    bs=st.integers(1, 128),
    acc=st.integers(1, 9),
    epochs=st.integers(1, 4),
    max_steps=st.one_of(st.just(-1), st.integers(1, 200)),
)
def test_schedule_agrees_with_the_loop(n: int, bs: int, acc: int, epochs: int, max_steps: int) -> None:
    bs = min(bs, n)  # a batch larger than the data set is refused by validation
    s = schedule(cfg(n, bs, acc, epochs, max_steps))
    steps, micro_per_step = walk(n, bs, acc, epochs, max_steps)
    assert s.total_steps == steps
    assert s.accumulate == acc
    assert s.micro_per_epoch == -(-n // bs)
    assert max(micro_per_step) <= acc


def test_ddp_ranks_share_the_samples() -> None:
    one = schedule(cfg(512, 16))
    two = schedule(cfg(512, 16, strategy="ddp", devices=2))
    assert two.micro_per_epoch * 2 == one.micro_per_epoch
    assert schedule(cfg(513, 16, strategy="ddp", devices=2)).micro_per_epoch == 17  # 257 samples on a rank
