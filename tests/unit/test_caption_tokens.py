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
    # ... and tokenizer(captions) alone: no image placeholders, the language model sees the caption only
    assert cfg["data"]["image_placeholders"] is False


@pytest.mark.parametrize("family", ["tiny/blip2-opt", "tiny/blip2-t5", "tiny/blip-vqa"])
def test_synthetic_batches_have_the_caption_length(family: str) -> None:
    from blipmon.runner.data import make_dataset
    from blipmon.runner.models import load_model

    cfg = config.resolve(
        family, ["data.caption_tokens=7", "train.num_train_samples=2", "train.batch_size=2", "model.device_map=cpu"]
    )
    loaded = load_model(cfg, cuda=False)
    item = make_dataset(loaded.model.config, loaded.family, cfg, loaded.source)[0]
    num_query = int(getattr(loaded.model.config, "num_query_tokens", 0))
    assert item["input_ids"].shape[0] == num_query + 7


@pytest.mark.parametrize("family", ["tiny/blip2-opt", "tiny/blip2-t5", "tiny/blip-vqa"])
def test_without_image_placeholders_the_batch_is_the_caption_alone(family: str) -> None:
    """The seed lab's batches: BLIP-2 finds no placeholders and its language model sees only the caption."""
    from blipmon.runner.data import make_dataset
    from blipmon.runner.models import load_model

    sets = ["data.caption_tokens=7", "train.num_train_samples=2", "train.batch_size=2", "model.device_map=cpu"]
    cfg = config.resolve(family, [*sets, "data.image_placeholders=false"])
    loaded = load_model(cfg, cuda=False)
    item = make_dataset(loaded.model.config, loaded.family, cfg, loaded.source)[0]
    assert item["input_ids"].shape[0] == 7
    image_token = getattr(loaded.model.config, "image_token_index", None)
    assert image_token is None or int(image_token) not in item["input_ids"].tolist()
    if "labels" in item and family == "tiny/blip2-opt":
        assert (item["labels"] != -100).all()  # the lab's labels are its input ids, every position counted


def test_the_model_runs_on_batches_without_placeholders() -> None:
    """transformers scatters the image features into no position, silently, as in the lab: the step still runs."""
    import torch

    from blipmon.runner.data import make_dataset
    from blipmon.runner.models import load_model

    cfg = config.resolve(
        "tiny/blip2-opt",
        [
            "data.caption_tokens=6",
            "train.num_train_samples=2",
            "train.batch_size=2",
            "model.device_map=cpu",
            "data.image_placeholders=false",
        ],
    )
    loaded = load_model(cfg, cuda=False)
    batch = {k: torch.stack([v, v]) for k, v in make_dataset(loaded.model.config, loaded.family, cfg)[0].items()}
    out = loaded.model(**batch)
    assert out.logits.shape[1] == 6
    out.loss.backward()
    # the vision tower still runs and takes part in backward (its activations are kept), with zero gradients
    vision_grads = [p.grad for p in loaded.model.vision_model.parameters() if p.grad is not None]
    assert vision_grads
