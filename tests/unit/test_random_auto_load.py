"""A load job with ``device_map = "auto"`` and random weights goes through accelerate (review of issue 15.4).

``model.weights = "auto"`` becomes random whenever the checkpoint is not cached (the first run on a lent GPU);
built whole on GPU 0 instead, seed 003's mT0-XL in fp32 (20 GB) would not fit a 16-24 GB card where accelerate
offloads to the CPU, and would never be split over two GPUs.
"""

from __future__ import annotations

from typing import Any

import pytest

from blipmon.core import config
from blipmon.runner import models
from blipmon.runner.models import device_map_kwarg, placed_by_accelerate


def test_accelerates_auto_and_tables_load_through_a_snapshot() -> None:
    load_auto = config.resolve("load/auto")
    placed, _ = device_map_kwarg(load_auto, cuda=True, cuda_index=0, world=1)
    assert placed_by_accelerate(load_auto["model"]["device_map"], placed)
    split = config.resolve("load/split-language-model")
    assert placed_by_accelerate(split["model"]["device_map"], None)


def test_training_and_cpu_loads_are_built_in_place() -> None:
    train = config.resolve("tiny/blip2-opt")
    placed, _ = device_map_kwarg(train, cuda=True, cuda_index=0, world=1)
    assert placed == {"": 0} and not placed_by_accelerate("auto", placed)
    load_auto = config.resolve("load/auto")
    placed, _ = device_map_kwarg(load_auto, cuda=False, world=1)  # no GPU: the CPU, nothing to split
    assert placed is None and not placed_by_accelerate("auto", placed)


@pytest.mark.parametrize(("gpu", "written"), [(True, True), (False, False)])
def test_prepare_files_writes_the_snapshot_only_where_accelerate_will_place_it(
    monkeypatch: pytest.MonkeyPatch, gpu: bool, written: bool
) -> None:
    import torch

    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(models, "resolve_source", lambda cfg: ("Gregor/mblip-mt0-xl", "random"))
    monkeypatch.setattr(models, "architecture", lambda *a: object())
    monkeypatch.setattr(models, "random_snapshot", lambda source, arch: calls.append(source))
    cfg: Any = config.resolve("load/auto")
    models.prepare_files(cfg)
    assert calls == (["Gregor/mblip-mt0-xl"] if written else [])
