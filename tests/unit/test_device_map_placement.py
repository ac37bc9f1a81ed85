"""Where a job places its model (issue 15, item 4): a train job on its process's own GPU, accelerate's "auto"
kept for loads and generation, and device maps that several training ranks cannot share refused before loading.

Pure functions of the configuration: no GPU is needed to say what ``from_pretrained`` would be asked for.
"""

from __future__ import annotations

from typing import Any

import pytest

from blipmon.core.config import ConfigError, resolve
from blipmon.runner.models import PlacementError, check_device_map, device_map_kwarg


def cfg_of(*overrides: str, preset: str = "tiny/blip2-opt") -> dict[str, Any]:
    return resolve(preset, list(overrides))


def test_the_tiny_presets_default_is_auto() -> None:
    """The premise: the tiny and default configurations say "auto" (core/config.py and core/presets.py)."""
    assert cfg_of()["model"]["device_map"] == "auto"


@pytest.mark.parametrize("local_rank", [0, 1, 3])
def test_a_train_job_reads_auto_as_its_own_gpu(local_rank: int) -> None:
    placed, move_after = device_map_kwarg(cfg_of(), cuda=True, cuda_index=local_rank, world=1)
    assert placed == {"": local_rank}  # never accelerate's split, on rank 0 no more than on the others
    assert move_after is False


def test_a_ddp_rank_reads_auto_as_its_own_gpu() -> None:
    cfg = cfg_of("train.devices=2", "train.strategy=ddp")
    assert device_map_kwarg(cfg, cuda=True, cuda_index=0, world=2) == ({"": 0}, False)
    assert device_map_kwarg(cfg, cuda=True, cuda_index=1, world=2) == ({"": 1}, False)


@pytest.mark.parametrize("kind", ["load", "generate"])
def test_load_and_generate_keep_accelerates_auto(kind: str) -> None:
    """Seed 003's loads: accelerate places modules on the GPUs first, then the CPU."""
    cfg = cfg_of(f"job.kind={kind}")
    assert device_map_kwarg(cfg, cuda=True, cuda_index=0, world=1) == ("auto", False)


def test_without_a_gpu_auto_and_cpu_first_load_on_the_cpu() -> None:
    assert device_map_kwarg(cfg_of(), cuda=False, world=1) == (None, False)
    assert device_map_kwarg(cfg_of("job.kind=load"), cuda=False, world=1) == (None, False)
    assert device_map_kwarg(cfg_of("model.device_map=cpu-first"), cuda=False, world=1) == (None, False)
    assert device_map_kwarg(cfg_of("model.device_map=cpu-first"), cuda=True, world=1) == (None, True)


def test_cuda_and_tables_are_as_written() -> None:
    assert device_map_kwarg(cfg_of("model.device_map=cuda"), cuda=True, cuda_index=2, world=1) == ({"": 2}, False)
    split = cfg_of(preset="load/split-language-model")
    placed, _ = device_map_kwarg(split, cuda=True, world=1)
    assert placed == split["model"]["device_map"] and placed is not split["model"]["device_map"]


def test_ddp_with_a_table_is_refused_before_loading() -> None:
    cfg = cfg_of("train.devices=2", "train.strategy=ddp")
    cfg["model"]["device_map"] = {"vision_model": "cpu", "language_model": 0, "qformer": 1}
    with pytest.raises(PlacementError) as err:
        check_device_map(cfg)  # the world size comes from the configuration: 2 ranks
    msg = str(err.value)
    assert "2 training ranks" in msg and "vision_model = 'cpu'" in msg and "model.device_map = 'cuda'" in msg
    assert isinstance(err.value, ConfigError)  # shown as a configuration error, without a traceback
    with pytest.raises(PlacementError):
        device_map_kwarg(cfg, cuda=True, cuda_index=1)
    check_device_map(cfg, world=1)  # the same table on one rank is fine


def test_the_world_size_comes_from_torchrun_when_the_child_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg_of()
    cfg["model"]["device_map"] = {"": 0}
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PlacementError):
        device_map_kwarg(cfg, cuda=True, cuda_index=1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert device_map_kwarg(cfg, cuda=True, cuda_index=1) == ({"": 0}, False)


def test_a_table_in_the_message_is_one_printable_line() -> None:
    cfg = cfg_of("train.devices=2", "train.strategy=ddp")
    cfg["model"]["device_map"] = {"vision\x1b[31m\nmodel": "cpu"}
    with pytest.raises(PlacementError) as err:
        check_device_map(cfg)
    assert "\x1b" not in str(err.value) and "\n" not in str(err.value)
