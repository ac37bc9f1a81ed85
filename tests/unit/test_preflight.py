"""Refused before anything loads: a device map naming a module the model lacks, bfloat16 where the GPU has none."""

from __future__ import annotations

import pytest

from blipmon.core.config import ConfigError, resolve
from blipmon.runner.preflight import preflight

SPLIT = (
    '{language_model = "cpu", vision_model = "cpu", qformer = "cpu", query_tokens = "cpu", language_projection = "cpu"}'
)


def test_a_device_map_naming_a_missing_module_is_refused(tiny_models: dict) -> None:
    cfg = resolve("tiny/blip2-opt", ['model.device_map={language_model = "cpu", vison_model = "cpu"}'])
    with pytest.raises(ConfigError, match="'vison_model'.*top-level modules are: .*vision_model"):
        preflight(cfg, cuda=False)


def test_a_device_map_of_real_modules_passes(tiny_models: dict) -> None:
    preflight(resolve("tiny/blip2-opt", [f"model.device_map={SPLIT}"]), cuda=False)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_on_a_gpu_without_it_is_refused(precision: str) -> None:
    cfg = resolve("tiny/blip2-opt", [f"train.precision={precision}"])
    with pytest.raises(ConfigError, match="no bfloat16 support.*16-mixed"):
        preflight(cfg, cuda=True, bf16=False)
    preflight(cfg, cuda=True, bf16=True)  # an Ampere or newer GPU
    preflight(cfg, cuda=False)  # the CPU has bfloat16


def test_bf16_on_the_cpu_device_map_is_fine() -> None:
    preflight(resolve("tiny/blip2-opt", ["train.precision=bf16-true", "model.device_map=cpu"]), cuda=True, bf16=False)
