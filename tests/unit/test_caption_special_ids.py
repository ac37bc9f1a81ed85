"""Synthetic captions hold ordinary token ids only, and exactly the image placeholders they should (issue 20).

A caption drawn uniformly from the whole vocabulary can hold BLIP-2's image token (50265 for the real OPT models,
in a vocabulary of 50304), so the batch's image-token count no longer matches the Q-Former's outputs. The special
ids below are written out by hand from each family's tokenizer, not taken from blipmon's table, so a wrong table
shows up here.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import torch

from blipmon.architectures.catalog import known_ids
from blipmon.core import config, presets
from blipmon.core.config import caption_tokens
from blipmon.runner.data import HashTokenizer, SyntheticCaptions, make_dataset, ordinary_token_ids
from blipmon.runner.models import architecture, family_of, tiny_config

SAMPLES = 5000
SEEDS = (0, 1, 20251123)
GENERATE_CAPTION_TOKENS = 8  # runner/generate.py draws 8-token prompts


def _span(a: int, b: int) -> set[int]:
    return set(range(a, b))


# Special and never-produced ids of each family, by hand: the tokenizer's specials, the ids past its vocabulary
# (sentinels, added tokens, the rows that pad the embedding) and the config's own special ids.
_OPT = {0, 1, 2, 3, 50118} | _span(50265, 50304)  # <s> <pad> </s> <unk>, BLIP-2's eos "\n"; <image> 50265, padding
_T5 = {0, 1, 2} | _span(32000, 32128)  # <pad> </s> <unk>; <extra_id_99..0> 32000-32099; <image> 32100; padding
_MT5 = {0, 1, 2} | _span(250000, 250112)  # the same, 250000 pieces; mBLIP's image id is the last row, 250111
_BLOOM = {0, 1, 2, 3} | _span(250680, 250880)  # <unk> <s> </s> <pad>; 250680 entries, embedding 250880
_BERT = _span(0, 999) | {30522, 30523}  # [PAD] [unused*] [UNK] [CLS] [SEP] [MASK]; BLIP's [DEC] [ENC]
SPECIAL_BY_HAND: dict[str, set[int]] = {
    "Salesforce/blip2-opt-2.7b": _OPT,
    "Salesforce/blip2-opt-6.7b": _OPT,
    "Salesforce/blip2-opt-2.7b-coco": _OPT,
    "Salesforce/blip2-opt-6.7b-coco": _OPT,
    "Salesforce/blip2-flan-t5-xl": _T5,
    "Salesforce/blip2-flan-t5-xxl": _T5,
    "Salesforce/blip2-flan-t5-xl-coco": _T5,
    "Gregor/mblip-mt0-xl": _MT5,
    "Gregor/mblip-bloomz-7b": _BLOOM,
    "Salesforce/blip-vqa-base": _BERT,
    # tiny models (vocabulary 1024): ids 0-3 and the config's specials; BLIP-2's image token is the last id
    "tiny/blip2-opt": {0, 1, 2, 3, 1023},
    "tiny/blip2-t5": {0, 1, 2, 3, 1023},
    "tiny/blip-vqa": {0, 1, 2, 3},
}
IMAGE_TOKEN_BY_HAND = {
    **{k: 50265 for k in SPECIAL_BY_HAND if "opt" in k and k.startswith("Salesforce")},
    **{k: 32100 for k in SPECIAL_BY_HAND if "t5" in k and k.startswith("Salesforce")},
    "Gregor/mblip-mt0-xl": 250111,
    "Gregor/mblip-bloomz-7b": 250879,
    "tiny/blip2-opt": 1023,
    "tiny/blip2-t5": 1023,
}
NUM_QUERY_BY_HAND = {k: (8 if k.startswith("tiny/") else 32) for k in IMAGE_TOKEN_BY_HAND}


@cache
def _arch(model_id: str) -> Any:
    """The architecture as the runner builds it (the image token set for mBLIP, as ``load_model`` does)."""
    return tiny_config(model_id) if model_id.startswith("tiny/") else architecture(model_id, "random", False)


def _settings() -> list[tuple[str, int, bool]]:
    """(model, caption tokens, placeholders) of every preset's data, every shipped architecture, both ways."""
    out: set[tuple[str, int, bool]] = set()
    for name in presets.names():
        cfg = config.resolve(name)
        n = GENERATE_CAPTION_TOKENS if cfg["job"]["kind"] == "generate" else caption_tokens(cfg)
        out.add((cfg["model"]["id"], n, bool(cfg["data"]["image_placeholders"])))
    for model_id in [*known_ids(), *presets.TINY_MODELS]:
        for placeholders in (True, False):
            out.add((model_id, 50, placeholders))
    return sorted(out)


@cache
def _bad(model_id: str) -> torch.Tensor:
    return torch.tensor(sorted(SPECIAL_BY_HAND[model_id]))


def _check_captions(model_id: str, items: list[dict[str, torch.Tensor]], placeholders: bool, where: str) -> None:
    """Every item: the placeholders it should have, first, and no special id in its caption or labels."""
    image = IMAGE_TOKEN_BY_HAND.get(model_id)
    want = NUM_QUERY_BY_HAND[model_id] if (placeholders and image is not None) else 0
    ids = torch.stack([it["input_ids"] for it in items])
    labels = torch.stack([it["labels"] for it in items])
    if image is not None:
        counts = (ids == image).sum(1)
        wrong = (counts != want).nonzero().flatten().tolist()
        assert not wrong, f"{where}: items {wrong[:5]} have {counts[wrong[:5]].tolist()} image tokens, not {want}"
        assert bool((ids[:, :want] == image).all()), f"{where}: the placeholders are not the first {want} ids"
    for key, t in (("input_ids", ids[:, want:]), ("labels", labels)):
        hit = torch.isin(t, _bad(model_id)) & (t != -100)
        rows = hit.any(1).nonzero().flatten().tolist()
        assert not rows, f"{where}: {key} of items {rows[:5]} hold special ids {t[hit][:5].tolist()}"


def test_every_architecture_has_its_hand_listed_facts() -> None:
    assert set(SPECIAL_BY_HAND) == set(known_ids()) | set(presets.TINY_MODELS)
    for model_id, image in IMAGE_TOKEN_BY_HAND.items():
        assert int(_arch(model_id).image_token_index) == image


@pytest.mark.parametrize("model_id", sorted(SPECIAL_BY_HAND))
def test_ordinary_ids_are_the_vocabulary_minus_every_special_id(model_id: str) -> None:
    """Exactly the ids that are neither special nor past the tokenizer: none left out needlessly, none let in."""
    arch = _arch(model_id)
    vocab = int(arch.text_config.vocab_size)
    expected = sorted(set(range(vocab)) - SPECIAL_BY_HAND[model_id])
    assert ordinary_token_ids(arch).tolist() == expected


@pytest.mark.parametrize(("model_id", "tokens", "placeholders"), _settings())
def test_no_caption_of_any_preset_or_architecture_holds_a_special_id(
    model_id: str, tokens: int, placeholders: bool
) -> None:
    arch = _arch(model_id)
    for seed in SEEDS:
        ds = SyntheticCaptions(arch, family_of(arch), SAMPLES, tokens, seed, image_placeholders=placeholders)
        _check_captions(model_id, [ds.caption(i) for i in range(SAMPLES)], placeholders, f"{model_id} seed {seed}")


@pytest.mark.parametrize("model_id", sorted(SPECIAL_BY_HAND))
def test_an_item_is_its_caption_beside_its_image(model_id: str) -> None:
    """What the captions test checks is what ``__getitem__`` (the DataLoader's call) returns."""
    arch = _arch(model_id)
    ds = SyntheticCaptions(arch, family_of(arch), 4, 6, seed=3)
    for i in range(4):
        item, text = ds[i], ds.caption(i)
        vision = arch.vision_config
        assert item["pixel_values"].shape == (3, vision.image_size, vision.image_size)
        assert set(item) == {"pixel_values", *text}
        assert all(torch.equal(item[k], text[k]) for k in text)


def test_the_issue_reproducer_has_no_stray_image_token() -> None:
    """h100/baseline, 5000 samples, captions of max_length: items 1685, 3081, 4186 and 4489 held image token 50265."""
    cfg = config.resolve("h100/baseline", ["train.num_train_samples=5000", "data.caption_tokens=0"])
    arch = _arch(cfg["model"]["id"])
    ds = make_dataset(arch, family_of(arch), cfg)
    assert len(ds) == 5000 and ds.max_length == 50 and ds.image_placeholders is False
    assert int(arch.image_token_index) == 50265 and int(arch.text_config.vocab_size) == 50304
    reported = [ds[i] for i in (1685, 3081, 4186, 4489)]
    assert [int((item["input_ids"] == 50265).sum()) for item in reported] == [0, 0, 0, 0]
    _check_captions(cfg["model"]["id"], reported, False, "the reported items")
    _check_captions(cfg["model"]["id"], [ds.caption(i) for i in range(5000)], False, "h100/baseline")


@pytest.mark.parametrize("name", [n for n in presets.names() if config.resolve(n)["job"]["kind"] == "train"])
def test_the_estimators_batches_hold_no_special_id(name: str) -> None:
    """The estimator traces batches from the same data, on its own copy of the architecture."""
    from blipmon.estimate.activations import caption_dataset
    from blipmon.estimate.build import resolve_spec

    cfg = config.resolve(name)
    spec = resolve_spec(cfg)
    ds = caption_dataset(cfg, spec, n=SAMPLES)
    items = [ds.caption(i) for i in range(SAMPLES)]
    _check_captions(cfg["model"]["id"], items, bool(cfg["data"]["image_placeholders"]), name)


@pytest.mark.parametrize("model_id", ["Salesforce/blip2-opt-2.7b", "Gregor/mblip-bloomz-7b", "tiny/blip2-opt"])
def test_an_image_folder_without_a_tokenizer_maps_words_to_ordinary_ids(model_id: str) -> None:
    """The hash tokenizer (random weights, no tokenizer files) never turns a word into a special id either."""
    tok = HashTokenizer(ordinary_token_ids(_arch(model_id)))
    words = " ".join(f"w{i}" for i in range(SAMPLES))
    ids = tok(words, SAMPLES)
    assert not set(ids.tolist()) & SPECIAL_BY_HAND[model_id]
    assert tok("two words", 4).tolist()[2:] == [0, 0]  # padding after the words
