"""DeepSpeed ZeRO-2 offload on a real GPU: the optimizer leaves the device, the lab's "Optim CPU" row.

Run on a machine with an NVIDIA GPU: ``pytest tests/gpu -m gpu`` (the test extra installs DeepSpeed; the first run
on a machine compiles its CPU Adam, a minute or two, hence the long timeout).

The model is BLIP-2 with the tiny vision tower and Q-Former but a wider OPT decoder (hidden 1024, 8 layers, about
100M parameters), saved in bf16 by the test. The tiny model's optimizer state (12 B x 383k parameters, 4.6 MB)
would be lost among what every CUDA process holds anyway (cuBLAS workspaces of tens of MiB); at 100M parameters the
state is 1.2 GB and a GPU that held any of it would show it. Expected values come from the model built here and
from ``catalog.param_bytes``, never from the run's own plan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from blipmon.core.run import RunData

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.timeout(900)]

HIDDEN, LAYERS = 1024, 8
OFFLOAD = ("model.device_map=cuda", "train.optim=deepspeed_cpu", "train.strategy=deepspeed_stage_2_offload",
           "train.precision=bf16-true", "train.batch_size=2", "train.accumulate_grad_batches=2",
           "train.num_train_samples=8", "train.max_steps=2")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def needs_cuda() -> None:
    """``-m gpu`` on a machine whose torch sees no GPU (a CPU build of torch, no driver) is a broken set-up: fail."""
    import torch

    if not torch.cuda.is_available():
        pytest.fail("a gpu test needs an NVIDIA GPU visible to torch (a CUDA build of torch and a driver)")


def wide_blip2(folder: Path) -> tuple[Path, int]:
    """Save tiny BLIP-2 OPT with a 1024-wide, 8-layer decoder in bf16 into ``folder``; (folder, parameters)."""
    import torch

    from blipmon.runner.models import model_class, tiny_config

    cfg = tiny_config("tiny/blip2-opt")
    text = cfg.text_config
    text.hidden_size = text.word_embed_proj_dim = HIDDEN
    text.ffn_dim = 4 * HIDDEN
    text.num_hidden_layers = LAYERS
    text.num_attention_heads = HIDDEN // 64
    torch.manual_seed(0)
    model = model_class(cfg)(cfg)
    n = sum(p.numel() for p in model.parameters())  # unique parameters: the tied head once
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder, n


def at(run: RunData, phase: str, step: int, micro: int) -> dict[str, Any]:
    return next(p for p in run.phases if (p["phase"], p["step"], p["micro_step"]) == (phase, step, micro))


def test_offloaded_optimizer_state_is_on_the_host_not_the_gpu(start_run: Any, tmp_path: Path) -> None:
    # The test extra installs DeepSpeed: without it this test fails (never skips). Imported here, not at the top, so
    # a GPU image without it fails this test alone and the rest of tests/gpu still runs.
    import deepspeed  # noqa: F401

    from blipmon.architectures import catalog

    folder, n = wide_blip2(tmp_path / "wide-blip2-opt")
    raw = json.loads((folder / "config.json").read_text())
    assert catalog.param_bytes(raw, "bfloat16") == 2 * n  # the catalog's count of the same architecture
    # ZeRO-2 flattens the parameters into one group padded to an even count (2 elements x world size 1).
    flat = n + (-n) % 2

    handle = start_run("tiny/blip2-opt", f"model.id={folder}", *OFFLOAD, fast=False, gpu=True)
    fin = handle.finish(timeout=880)  # the first DeepSpeed run on a machine compiles its CPU Adam
    assert fin.returncode == 0, f"{fin.stderr}\n{handle.describe()}"
    run = fin.run()
    assert run.plan["trainable_params"] == n  # a full fine-tune: every parameter trains

    last = run.phases[-1]
    assert (last["phase"], last["step"]) == ("after_opt_step", 1)
    assert last["optim_host"] == last["optim"] == 12 * flat  # fp32 master + both Adam moments, all host RAM
    for p in run.phases:
        where = (p["step"], p["micro_step"], p["phase"])
        assert p["params"] == 2 * flat, where  # bf16 weights on the GPU: 2 bytes a parameter (fp32 would be 4)
        assert isinstance(p["allocated"], int) and p["allocated"] >= p["params"], where

    # What the GPU holds between micro-steps, once the optimizer has stepped: the bf16 weights plus what any CUDA
    # training process keeps (cuBLAS workspaces, DeepSpeed's bf16 staging buffer for the largest parameter,
    # 2 x 4M elements = 8 MiB): tens of MiB. Had the GPU kept the fp32 master weights (4 B a parameter), the fp32
    # gradient partition (4 B) or Adam's two fp32 moments (8 B), it would hold at least 4 B a parameter more
    # (400 MB here). The reduce buckets of backward are released at its end, before these boundaries.
    for step, micro in [(1, 0), (1, 1)]:
        p = at(run, "before_fwd", step, micro)
        assert p["acts"] == 0
        assert p["allocated"] - p["params"] < 4 * flat, (step, micro, p["allocated"], p["params"], flat)
