"""Catch BLIP-2 batches without image placeholder tokens: the images then silently do nothing.

BLIP-2 writes the Q-Former's output over the ``num_query_tokens`` placeholder tokens the processor puts before
the text (``masked_scatter``). Captions tokenized with the tokenizer alone (as the seed lab does) have none, so
transformers writes the image features nowhere, without a warning: the language model sees the text only, the
vision tower and Q-Former still run (and keep their activations), their gradients are zero. That changes both
what the fine-tune learns and its memory (``num_query_tokens`` fewer tokens per sequence), so a profiler that
watches the forward says so once, in the run's notes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_BLIP2_CLASSES = {"Blip2ForConditionalGeneration"}


def _is_blip2(module: torch.nn.Module) -> bool:
    return any(c.__name__ in _BLIP2_CLASSES for c in type(module).__mro__)


def message(token_id: int, num_query: int) -> str:
    return (
        f"BLIP-2 batch without image placeholder tokens (id {token_id}): transformers writes the image features "
        "nowhere, so the language model sees the text only and the images do not affect the loss. Tokenizing with "
        f"the processor (processor(images=..., text=...)) puts {num_query} placeholders before each text "
        f"({num_query} more tokens per sequence, and more activation memory)"
    )


def _input_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if "input_ids" in kwargs:
        return kwargs["input_ids"]
    return args[1] if len(args) > 1 else None  # forward(pixel_values, input_ids, ...)


def watch_image_placeholders(model: torch.nn.Module, on_missing: Callable[[str], None]) -> list[Any]:
    """Check the first forward of every BLIP-2 model inside ``model``; returns the hooks' handles.

    ``on_missing`` gets a message (once per model) when a row of that forward's ``input_ids`` holds no
    placeholder. Each hook removes itself after the first forward, so the cost is one comparison per model and
    run; a caller that may stop before any forward removes the handles itself. The hook runs inside the user's
    forward, so nothing it does (a failing note, a warning turned into an error) reaches the model.
    """
    handles = []
    for module in model.modules():
        if not _is_blip2(module):
            continue
        cfg = getattr(module, "config", None)
        token = getattr(cfg, "image_token_id", None)
        if token is None:
            token = getattr(cfg, "image_token_index", None)
        if token is None:  # no placeholder id to look for
            continue
        handles.append(_watch(module, int(token), int(getattr(cfg, "num_query_tokens", 0) or 0), on_missing))
    return handles


def _watch(module: torch.nn.Module, token: int, num_query: int, on_missing: Callable[[str], None]) -> Any:
    def check(_mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        handle.remove()
        try:
            ids = _input_ids(args, kwargs)
            if not isinstance(ids, torch.Tensor) or ids.dim() == 0:
                return
            if not bool((ids == token).any(-1).all()):  # transformers builds the mask from input_ids when given
                on_missing(message(token, num_query))
        except Exception:  # noqa: BLE001, S110 - a diagnostic must never break the user's forward
            pass

    handle = module.register_forward_pre_hook(check, with_kwargs=True)
    return handle
