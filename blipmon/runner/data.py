"""Training batches shaped like the seeds' data: image size and token lengths from the model config.

Memory depends on tensor shapes, not on pixel values, so synthetic batches give the real memory of
an image-caption fine-tune without a dataset. Every batch has the full ``max_length`` (the seed
lab pads to it), which makes the step's memory the worst case rather than a lucky short caption.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset


class SyntheticCaptions(Dataset[dict[str, torch.Tensor]]):
    """Deterministic random images and captions; item ``i`` is the same in every process."""

    def __init__(self, model_config: Any, family: str, n: int, max_length: int, seed: int = 0) -> None:
        self.family = family
        self.n = n
        self.max_length = max_length
        self.seed = seed
        vision = model_config.vision_config
        self.image_size = int(vision.image_size)
        self.channels = int(getattr(vision, "num_channels", 3))
        text = model_config.text_config
        self.vocab = int(text.vocab_size)
        self.num_query = int(getattr(model_config, "num_query_tokens", 0))
        self.image_token = getattr(model_config, "image_token_index", None)
        self.answer_length = min(8, max_length)

    def __len__(self) -> int:
        return self.n

    def _tokens(self, g: torch.Generator, length: int) -> torch.Tensor:
        hi = self.vocab - 1 if self.image_token == self.vocab - 1 else self.vocab
        return torch.randint(4, hi, (length,), generator=g)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        pixels = torch.randn(self.channels, self.image_size, self.image_size, generator=g)
        text = self._tokens(g, self.max_length)
        if self.family == "blip-vqa":
            answer = self._tokens(g, self.answer_length)
            return {
                "pixel_values": pixels,
                "input_ids": text,
                "attention_mask": torch.ones_like(text),
                "labels": answer,
            }
        # BLIP-2: the processor puts num_query_tokens image placeholders before the text.
        image = torch.full((self.num_query,), int(self.image_token), dtype=torch.long)
        ids = torch.cat([image, text])
        item = {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.family == "blip2-decoder":
            labels = ids.clone()
            labels[: self.num_query] = -100
            item["labels"] = labels
        else:  # encoder-decoder (T5): the caption is the target, as in the seed lab
            item["labels"] = text.clone()
        return item


def make_dataset(model_config: Any, family: str, cfg: dict[str, Any]) -> SyntheticCaptions:
    source = cfg["data"]["source"]
    if source != "synthetic":
        raise NotImplementedError(
            f"data.source = {source!r}: image-folder datasets are not available yet; use 'synthetic'"
        )
    t = cfg["train"]
    return SyntheticCaptions(
        model_config, family, t["num_train_samples"], cfg["data"]["max_length"], cfg["runtime"]["seed"]
    )
