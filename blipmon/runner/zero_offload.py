"""DeepSpeed ZeRO-2 with the optimizer offloaded to the host, as the seed lab's last row runs it.

The lab uses Lightning's ``strategy="deepspeed_stage_2_offload"`` with ``DeepSpeedCPUAdam``; blipmon
drives DeepSpeed's engine directly with the same ZeRO settings, so the phase boundaries stay where
the plain loop puts them. DeepSpeed moves gradients and the optimizer out of ``.grad`` and
``optimizer.state`` into its own flat partitions, so this module also says where to find them:
a probe that only looked at ``.grad`` would report no gradients at all.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import torch

# Lightning's DeepSpeedStrategy defaults for "deepspeed_stage_2_offload" (bucket sizes in elements).
BUCKET_ELEMENTS = 200_000_000


def ds_config(cfg: dict[str, Any], *, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed configuration for a blipmon train configuration."""
    t = cfg["train"]
    precision = t["precision"]
    return {
        "train_micro_batch_size_per_gpu": t["batch_size"],
        "gradient_accumulation_steps": t["accumulate_grad_batches"],
        "zero_optimization": {
            "stage": 2,
            "offload_optimizer": {"device": "cpu", "pin_memory": cuda},
            "contiguous_gradients": True,
            "overlap_comm": cuda,
            "allgather_partitions": True,
            "reduce_scatter": True,
            "allgather_bucket_size": BUCKET_ELEMENTS,
            "reduce_bucket_size": BUCKET_ELEMENTS,
        },
        "bf16": {"enabled": precision in ("bf16-true", "bf16-mixed")},
        "fp16": {"enabled": precision == "16-mixed"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_process_group(*, cuda: bool) -> None:
    """DeepSpeed needs a process group even for one rank; give it a local one unless torchrun did."""
    import deepspeed

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)


def initialize(
    model: torch.nn.Module, params: list[torch.nn.Parameter], cfg: dict[str, Any], *, cuda: bool
) -> tuple[Any, Any]:
    """(engine, ZeRO optimizer) with DeepSpeedCPUAdam over ``params``."""
    import deepspeed
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    init_process_group(cuda=cuda)
    optimizer = DeepSpeedCPUAdam(params, lr=cfg["train"]["lr"])
    engine, zero_opt, _loader, _sched = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config(cfg, cuda=cuda), dist_init_required=False
    )
    return engine, zero_opt


def inner_optimizer(zero_opt: Any) -> Any:
    """The torch optimizer DeepSpeed wraps (its ``step`` hooks fire when the state changes)."""
    return getattr(zero_opt, "optimizer", zero_opt)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def grad_tensors(zero_opt: Any) -> Iterator[torch.Tensor]:
    """Gradients ZeRO-2 keeps outside ``.grad``: reduce buckets on the device during backward, averaged
    partitions, host accumulators (accumulation > 1) and the fp32 partition grads the CPU Adam reads."""
    for bucket in getattr(zero_opt, "ipg_buckets", {}).values():
        yield from _tensors(getattr(bucket, "buffer", None))
    yield from _tensors(getattr(zero_opt, "averaged_gradients", None))
    yield from _tensors(getattr(zero_opt, "accumulated_grads_in_cpu", None))
    for master in getattr(zero_opt, "single_partition_of_fp32_groups", ()):
        if master.grad is not None:
            yield master.grad


def optim_tensors(zero_opt: Any) -> Iterator[torch.Tensor]:
    """Optimizer memory: Adam's moments plus the fp32 master partitions they update (host RAM when offloaded)."""
    inner = inner_optimizer(zero_opt)
    for state in inner.state.values():
        yield from _tensors(state)
    yield from getattr(zero_opt, "single_partition_of_fp32_groups", ())
