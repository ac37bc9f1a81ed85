"""Training batches shaped like the seeds' data: image size and token lengths from the model config.

Memory depends on tensor shapes, not on pixel values, so synthetic batches give the real memory of
an image-caption fine-tune without a dataset. Every caption has the same length, so every batch has
the memory of the longest: ``max_length`` by default (the worst case), or ``data.caption_tokens``,
the longest caption a real batch holds once the tokenizer pads it to its longest, as the seed lab's does.

BLIP-2's processor puts ``num_query_tokens`` image placeholders before the text, and the model writes the
Q-Former's output over them (``masked_scatter``). The seed lab tokenizes the captions with the tokenizer alone,
so its batches have no placeholders: transformers then scatters into nothing, without a warning, and the language
model sees the caption only, while the vision encoder and Q-Former still run and keep their activations.
``data.image_placeholders = false`` reproduces those batches, and with them the lab's memory.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from blipmon.core.config import caption_tokens


class SyntheticCaptions(Dataset[dict[str, torch.Tensor]]):
    """Deterministic random images and captions; item ``i`` is the same in every process."""

    def __init__(
        self,
        model_config: Any,
        family: str,
        n: int,
        max_length: int,
        seed: int = 0,
        image_placeholders: bool = True,
    ) -> None:
        self.family = family
        self.image_placeholders = image_placeholders
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
        return self._blip2_item(pixels, text)

    def _blip2_item(self, pixels: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """BLIP-2: the processor puts num_query_tokens image placeholders before the text (unless told not to)."""
        n_image = self.num_query if self.image_placeholders else 0
        image = torch.full((n_image,), int(self.image_token), dtype=torch.long)
        ids = torch.cat([image, text])
        item = {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.family == "blip2-decoder":
            labels = ids.clone()
            labels[:n_image] = -100
            item["labels"] = labels
        else:  # encoder-decoder (T5): the caption is the target, as in the seed lab
            item["labels"] = text.clone()
        return item


# The normalisation BLIP and BLIP-2 processors use (OpenAI CLIP statistics).
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


def read_metadata(folder: Path) -> list[dict[str, str]]:
    """Records of an image folder in Hugging Face's imagefolder convention; errors name file and line."""
    meta = folder / "metadata.jsonl"
    if not folder.is_dir():
        raise ValueError(f"data.source = {str(folder)!r}: not a directory")
    if not meta.is_file():
        raise ValueError(f"data.source = {str(folder)!r}: no metadata.jsonl in it (lines of file_name + text)")
    records: list[dict[str, str]] = []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise ValueError(f"{meta}:{n}: not a JSON object") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("file_name"), str):
            raise ValueError(f"{meta}:{n}: expected an object with a 'file_name'")
        if not isinstance(rec.get("text"), str) and not (
            isinstance(rec.get("question"), str) and isinstance(rec.get("answer"), str)
        ):
            raise ValueError(f"{meta}:{n}: expected 'text' (captions) or 'question' and 'answer' (VQA)")
        path = (folder / rec["file_name"]).resolve()
        if folder.resolve() not in path.parents:
            raise ValueError(f"{meta}:{n}: file_name {rec['file_name']!r} points outside the folder")
        records.append({k: v for k, v in rec.items() if isinstance(v, str)})
    if not records:
        raise ValueError(f"{meta}: no records")
    return records


class HashTokenizer:
    """Stands in for a tokenizer when weights are random and none is cached: same lengths, stable ids.

    Memory depends on sequence length, not on which ids fill it, so this keeps a real dataset's
    shapes without needing the model's vocabulary files.
    """

    def __init__(self, vocab: int, reserved: set[int]) -> None:
        self.vocab = vocab
        self.reserved = reserved

    def __call__(self, text: str, length: int) -> torch.Tensor:
        ids = []
        for word in text.split()[:length]:
            i = 4 + zlib.crc32(word.encode()) % (self.vocab - 5)
            ids.append(i if i not in self.reserved else 4)
        ids += [0] * (length - len(ids))
        return torch.tensor(ids, dtype=torch.long)


class ImageFolderCaptions(SyntheticCaptions):
    """A real image folder: images resized and normalised like the BLIP processors do, text tokenised."""

    def __init__(
        self,
        model_config: Any,
        family: str,
        folder: Path,
        n: int,
        max_length: int,
        processor: Any = None,
        image_placeholders: bool = True,
    ) -> None:
        records = read_metadata(folder)[:n]
        super().__init__(model_config, family, len(records), max_length, image_placeholders=image_placeholders)
        self.folder = folder
        self.records = records
        self.processor = processor
        reserved = {int(self.image_token)} if self.image_token is not None else set()
        self.hash_tok = HashTokenizer(self.vocab, reserved)

    def _image(self, name: str) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.folder / name) as im:
            im = im.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        x = data.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(_MEAN).view(3, 1, 1)
        std = torch.tensor(_STD).view(3, 1, 1)
        return (x - mean) / std

    def _tok(self, text: str, length: int) -> torch.Tensor:
        if self.processor is not None:
            tok = getattr(self.processor, "tokenizer", self.processor)
            out = tok(text, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
            return out["input_ids"][0]
        return self.hash_tok(text, length)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rec = self.records[i]
        pixels = self._image(rec["file_name"])
        if self.family == "blip-vqa":
            q = self._tok(rec.get("question", rec.get("text", "")), self.max_length)
            a = self._tok(rec.get("answer", ""), self.answer_length)
            return {"pixel_values": pixels, "input_ids": q, "attention_mask": (q != 0).long(), "labels": a}
        return self._blip2_item(pixels, self._tok(rec.get("text", rec.get("question", "")), self.max_length))


def load_processor(source: str) -> Any:
    """The model's own processor when it is available locally, else None (the hash tokenizer is used)."""
    try:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source, local_files_only=True)
    except Exception:
        return None


def make_dataset(
    model_config: Any, family: str, cfg: dict[str, Any], source_path: str | None = None
) -> SyntheticCaptions:
    t, d = cfg["train"], cfg["data"]
    source = d["source"]
    placeholders = bool(d.get("image_placeholders", True))
    if source == "synthetic":
        return SyntheticCaptions(
            model_config,
            family,
            t["num_train_samples"],
            caption_tokens(cfg),
            cfg["runtime"]["seed"],
            image_placeholders=placeholders,
        )
    processor = load_processor(source_path) if source_path else None
    return ImageFolderCaptions(
        model_config,
        family,
        Path(source),
        t["num_train_samples"],
        d["max_length"],
        processor,
        image_placeholders=placeholders,
    )
