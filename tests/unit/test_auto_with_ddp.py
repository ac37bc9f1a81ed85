"""``device_map = "auto"`` in a training job: each process's own GPU, written out or not (issue 15.4).

accelerate's "auto" splits a model over every visible GPU, and DDP refuses a module on several devices (rank 0
got the split, the other ranks their own GPU). blipmon's training loop runs one device per process, so a train
job's "auto" is ``{"": local index}`` on every rank; load and generate jobs keep accelerate's meaning (seed
003's loads). A device-map *table* with several ranks is still refused before anything loads.
"""

from __future__ import annotations

import pytest

from blipmon.core import config
from blipmon.runner.models import device_map_kwarg


def _ddp(*extra: str) -> dict:
    return config.resolve("tiny/blip2-opt", ["train.strategy=ddp", "train.devices=2", "train.batch_size=2", *extra])


@pytest.mark.parametrize("extra", [(), ("model.device_map=auto",)], ids=["default", "written-out"])
def test_each_rank_of_a_ddp_job_gets_its_own_gpu(extra: tuple[str, ...]) -> None:
    cfg = _ddp(*extra)
    assert [device_map_kwarg(cfg, cuda=True, cuda_index=rank, world=2) for rank in (0, 1)] == [
        ({"": 0}, False),
        ({"": 1}, False),
    ]


def test_a_load_job_keeps_accelerates_auto() -> None:
    cfg = config.resolve("load/auto")
    assert device_map_kwarg(cfg, cuda=True, cuda_index=0, world=1) == ("auto", False)


def test_a_device_map_table_with_several_ranks_is_refused_before_loading() -> None:
    cfg = _ddp("model.device_map.language_model=0", "model.device_map.vision_model=1")
    with pytest.raises(config.ConfigError, match="device"):
        device_map_kwarg(cfg, cuda=True, cuda_index=0, world=2)
