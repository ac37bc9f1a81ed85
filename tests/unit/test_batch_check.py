"""BLIP-2 batches without image placeholders are noticed on the first forward, once, at the cost of one check."""

from __future__ import annotations

import warnings

import pytest
import torch

from blipmon.runner.batch_check import watch_image_placeholders
from blipmon.runner.data import SyntheticCaptions
from blipmon.runner.models import family_of, model_class, tiny_config


def _model_and_batches(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    cfg = tiny_config(name)
    torch.manual_seed(0)
    model = model_class(cfg)(cfg)

    def batch(placeholders: bool) -> dict[str, torch.Tensor]:
        ds = SyntheticCaptions(cfg, family_of(cfg), n=2, max_length=6, image_placeholders=placeholders)
        return {k: torch.stack([ds[0][k], ds[1][k]]) for k in ds[0]}

    return model, batch(True), batch(False)


def test_a_batch_without_placeholders_is_reported_once() -> None:
    model, _, bare = _model_and_batches("tiny/blip2-opt")
    seen: list[str] = []
    assert len(watch_image_placeholders(model, seen.append)) == 1
    model(**bare)
    model(**bare)
    assert len(seen) == 1
    assert "without image placeholder tokens" in seen[0] and "8 placeholders" in seen[0]  # tiny: 8 query tokens


def test_a_batch_with_placeholders_says_nothing_and_stops_watching() -> None:
    model, good, bare = _model_and_batches("tiny/blip2-t5")
    seen: list[str] = []
    watch_image_placeholders(model, seen.append)
    model(**good)
    model(**bare)  # the hook removed itself after the first forward: no cost, no report
    assert seen == []
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_positional_input_ids_are_found() -> None:
    model, _, bare = _model_and_batches("tiny/blip2-opt")
    seen: list[str] = []
    watch_image_placeholders(model, seen.append)
    model(bare["pixel_values"], bare["input_ids"], labels=bare["labels"])
    assert len(seen) == 1


def test_models_without_blip2_are_not_watched() -> None:
    cfg = tiny_config("tiny/blip-vqa")
    model = model_class(cfg)(cfg)
    assert watch_image_placeholders(model, lambda _m: None) == []
    assert watch_image_placeholders(torch.nn.Linear(2, 2), lambda _m: None) == []


def test_a_wrapper_module_is_searched() -> None:
    """Lightning modules and DDP hold the model as a child: the check finds it inside."""
    model, _, bare = _model_and_batches("tiny/blip2-opt")
    wrapper = torch.nn.ModuleDict({"model": model})
    seen: list[str] = []
    assert len(watch_image_placeholders(wrapper, seen.append)) == 1
    model(**bare)
    assert len(seen) == 1


def test_one_row_without_placeholders_is_enough() -> None:
    model, good, bare = _model_and_batches("tiny/blip2-opt")
    mixed = {**good, "input_ids": good["input_ids"].clone()}
    mixed["input_ids"][1] = 5  # the second row lost its placeholders (same length, so the batch still stacks)
    seen: list[str] = []
    watch_image_placeholders(model, seen.append)
    model(**{k: v for k, v in mixed.items() if k != "labels"})
    assert len(seen) == 1


@pytest.mark.parametrize("failure", ["raises", "warning-as-error"])
def test_nothing_the_check_does_reaches_the_forward(failure: str) -> None:
    """A failing note or a warning made an error (``-W error``) must not break the user's training step."""
    model, _, bare = _model_and_batches("tiny/blip2-opt")
    model.eval()  # no dropout: the same batch gives the same loss with and without the check
    expected = model(**bare).loss
    calls: list[str] = []

    def failing(text: str) -> None:
        calls.append(text)
        if failure == "raises":
            raise OSError("disk full")
        warnings.warn(text, UserWarning, stacklevel=2)

    watch_image_placeholders(model, failing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(**bare)
    assert len(calls) == 1 and "without image placeholder tokens" in calls[0]  # the check ran, and its note failed
    assert torch.equal(out.loss, expected)  # the forward went on as if nothing had been watching


def test_handles_remove_a_hook_that_never_ran() -> None:
    model, _, _ = _model_and_batches("tiny/blip2-t5")
    for handle in watch_image_placeholders(model, lambda _m: None):
        handle.remove()
    assert not any(m._forward_pre_hooks for m in model.modules())
