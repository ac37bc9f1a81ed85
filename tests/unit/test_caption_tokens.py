"""Caption length of synthetic batches: the worst case by default, the lab's padded-to-longest on its presets."""

from __future__ import annotations

import pytest

from blipmon.core import config, presets
from blipmon.core.config import ConfigError, caption_tokens


def test_default_fills_max_length() -> None:
    assert caption_tokens(config.resolve("tiny/blip2-opt", ["data.max_length=20"])) == 20


def test_caption_tokens_is_capped_by_max_length() -> None:
    cfg = config.resolve("tiny/blip2-opt", ["data.max_length=20", "data.caption_tokens=12"])
    assert caption_tokens(cfg) == 12
    cfg = config.resolve("tiny/blip2-opt", ["data.max_length=20", "data.caption_tokens=99"])
    assert caption_tokens(cfg) == 20


def test_negative_is_refused_with_the_key_named() -> None:
    with pytest.raises(ConfigError, match="data.caption_tokens"):
        config.resolve("tiny/blip2-opt", ["data.caption_tokens=-1"])


@pytest.mark.parametrize("name", presets.group("h100") + presets.group("a100"))
def test_lab_presets_keep_the_labs_max_length_and_model_its_padding(name: str) -> None:
    cfg = config.resolve(name)
    assert cfg["data"]["max_length"] == 50  # the lab's tokenizer call: padding=True, truncation, max_length=50
    assert caption_tokens(cfg) == presets.LAB_CAPTION_TOKENS < 50


@pytest.mark.parametrize("family", ["tiny/blip2-opt", "tiny/blip2-t5", "tiny/blip-vqa"])
def test_synthetic_batches_have_the_caption_length(family: str) -> None:
    from blipmon.runner.data import make_dataset
    from blipmon.runner.models import load_model

    cfg = config.resolve(family, ["data.caption_tokens=7", "train.num_train_samples=2", "model.device_map=cpu"])
    loaded = load_model(cfg, cuda=False)
    item = make_dataset(loaded.model.config, loaded.family, cfg, loaded.source)[0]
    num_query = int(getattr(loaded.model.config, "num_query_tokens", 0))
    assert item["input_ids"].shape[0] == num_query + 7
