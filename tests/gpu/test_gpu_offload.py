"""DeepSpeed ZeRO-2 offload on a real GPU: the optimizer leaves the device, the lab's "Optim CPU" row.

Run on a machine with an NVIDIA GPU and ``blipmon[deepspeed]``: ``pytest tests/gpu -m gpu``.
"""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.timeout(900)]
pytest.importorskip("deepspeed")

OFFLOAD = ("model.device_map=cuda", "train.optim=deepspeed_cpu", "train.strategy=deepspeed_stage_2_offload",
           "train.precision=bf16-true", "train.batch_size=2", "train.accumulate_grad_batches=2",
           "train.num_train_samples=8", "train.max_steps=2")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def needs_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU visible to torch")


def test_offloaded_optimizer_state_is_on_the_host_not_the_gpu(start_run: Any) -> None:
    handle = start_run("tiny/blip2-opt", *OFFLOAD, fast=False, gpu=True)
    fin = handle.finish(timeout=880)  # the first DeepSpeed run on a machine compiles its CPU Adam
    assert fin.returncode == 0, f"{fin.stderr}\n{handle.describe()}"
    run = fin.run()
    n = run.plan["trainable_params"]
    last = run.phases[-1]
    assert last["phase"] == "after_opt_step"
    assert last["optim_host"] == last["optim"] == 12 * n  # fp32 master + both moments, all host RAM
    assert isinstance(last["allocated"], int) and last["allocated"] >= last["params"]
    assert last["params"] >= 2 * n  # bf16 weights on the GPU (one flat buffer, maybe padded)
