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

Caption ids are drawn only from *ordinary* ids, the ones a tokenizer produces for text (``ordinary_token_ids``):
never the image placeholder, pad, bos/eos, decoder start, unk, sep/cls/mask, T5's sentinels or any other special id
of the model's configuration, and never an id past the tokenizer's own vocabulary (the embedding rows that pad it to
a multiple of 64 or 128). A stray image token in a caption would change how many positions BLIP-2 scatters the
image features into (an error or silently wrong inputs, depending on the transformers version). Which ids are
ordinary is a fact of each family's tokenizer; docs/architectures.md lists them with their sources.

Images and captions come from two random streams per item, so every caption can be checked without drawing its
image (``caption``), and the images are those of earlier blipmon versions.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from blipmon.core.config import caption_tokens


@dataclass(frozen=True)
class TextVocabulary:
    """The ids a family's tokenizer yields for text: ``[first, end)``, before the special ids are taken out."""

    first: int  # ids below are the tokenizer's special tokens (or reserved, unused entries)
    end: int  # one past the base vocabulary: above are sentinels, added tokens and embedding padding rows
    source: str


# The tokenizers of the shipped families (docs/architectures.md says where each figure comes from). They apply when
# the model's embedding is at least as large as the tokenizer (the real checkpoints); a smaller vocabulary (the tiny
# models, a custom config) is not that tokenizer's, so only GENERIC_FIRST and the configuration's special ids hold.
TEXT_VOCABULARIES: dict[str, TextVocabulary] = {
    # GPT-2 BPE as fairseq ordered it: <s> 0, <pad> 1, </s> 2, <unk> 3; 50265 entries. BLIP-2 adds <image> as 50265;
    # 50266..50303 pad the embedding to 50304.
    "opt": TextVocabulary(4, 50265, "facebook/opt tokenizer: 50265 entries, <s> <pad> </s> <unk> at 0-3"),
    # SentencePiece, 32000 pieces: <pad> 0, </s> 1, <unk> 2; <extra_id_99>..<extra_id_0> are 32000..32099 (T5's
    # sentinels); BLIP-2 adds <image> as 32100; 32101..32127 pad the embedding to 32128.
    "t5": TextVocabulary(3, 32000, "T5Tokenizer: 32000 pieces + 100 extra_ids (sentinels), <pad> </s> <unk> at 0-2"),
    # mT5 / mT0: 250000 pieces, the same three specials, sentinels 250000..250099, embedding 250112.
    "mt5": TextVocabulary(3, 250000, "mT5 tokenizer: 250000 pieces + 100 extra_ids, <pad> </s> <unk> at 0-2"),
    # BLOOM's byte-level BPE: <unk> 0, <s> 1, </s> 2, <pad> 3; 250680 entries, embedding padded to 250880.
    "bloom": TextVocabulary(4, 250680, "bigscience/bloom tokenizer: 250680 entries, <unk> <s> </s> <pad> at 0-3"),
    # BLIP's BERT (bert-base-uncased, 30522 entries): [PAD] 0, [unused0..98] 1-99, [UNK] 100, [CLS] 101, [SEP] 102,
    # [MASK] 103, [unused99..993] 104-998, text from 999 on; BLIP adds [DEC] 30522 and [ENC] 30523.
    "blip_text_model": TextVocabulary(999, 30522, "bert-base-uncased: 30522 entries, specials and [unused] below 999"),
}
# Any other vocabulary: ids 0-3 are special in every family above (pad, bos, eos, unk in some order).
GENERIC_FIRST = 4
_SPECIAL_KEY = re.compile(r"_token_(?:id|ids|index)$")
_TEXT_STREAM = 1 << 62  # captions draw from their own generator, seeded apart from the images' (no overlap)


def special_token_ids(model_config: Any) -> set[int]:
    """Every special id the configuration names: ``*_token_id(s)`` / ``*_token_index`` of the model and its text model.

    That is the image placeholder (``image_token_index``/``image_token_id``), pad, bos, eos, decoder start, unk,
    sep, cls, mask, forced bos/eos, whatever the family's config carries.
    """
    out: set[int] = set()
    for cfg in (model_config, getattr(model_config, "text_config", None)):
        if cfg is None:
            continue
        values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
        for key in dir(cfg):
            if _SPECIAL_KEY.search(key) and key not in values:
                try:
                    values[key] = getattr(cfg, key)
                except Exception:  # noqa: BLE001 - a property that cannot be read names no id
                    continue
        for key, value in values.items():
            if not _SPECIAL_KEY.search(key):
                continue
            for v in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                    out.add(v)
    return out


def text_vocabulary(model_config: Any) -> TextVocabulary:
    """The ``[first, end)`` range of ids real text can produce for this model (see ``TEXT_VOCABULARIES``)."""
    text = getattr(model_config, "text_config", model_config)
    vocab = int(text.vocab_size)
    known = TEXT_VOCABULARIES.get(str(getattr(text, "model_type", "")))
    if known is not None and vocab >= known.end:
        return known
    return TextVocabulary(min(GENERIC_FIRST, vocab), vocab, "the configuration's vocab_size (no known tokenizer)")


def ordinary_token_ids(model_config: Any) -> torch.Tensor:
    """The ids a synthetic caption may hold, sorted: the text vocabulary minus every special id of the config."""
    vocab = text_vocabulary(model_config)
    ids = torch.arange(vocab.first, vocab.end, dtype=torch.long)
    special = special_token_ids(model_config)
    image = getattr(model_config, "image_token_index", None)
    if image is not None:
        special.add(int(image))
    if special:
        ids = ids[~torch.isin(ids, torch.tensor(sorted(special), dtype=torch.long))]
    if ids.numel() == 0:
        raise ValueError(
            f"vocab_size = {vocab.end}: no ordinary token ids left for captions once the special ids are excluded"
        )
    return ids


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
        self.ordinary = ordinary_token_ids(model_config)

    def __len__(self) -> int:
        return self.n

    def _tokens(self, g: torch.Generator, length: int) -> torch.Tensor:
        return self.ordinary[torch.randint(0, self.ordinary.numel(), (length,), generator=g)]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        pixels = torch.randn(self.channels, self.image_size, self.image_size, generator=g)
        return {"pixel_values": pixels, **self.caption(i)}

    def caption(self, i: int) -> dict[str, torch.Tensor]:
        """Item ``i`` without its image: ids, mask and labels (what ``__getitem__`` returns beside the pixels)."""
        g = torch.Generator().manual_seed(_TEXT_STREAM + self.seed * 1_000_003 + i)
        text = self._tokens(g, self.max_length)
        if self.family == "blip-vqa":
            answer = self._tokens(g, self.answer_length)
            return {"input_ids": text, "attention_mask": torch.ones_like(text), "labels": answer}
        return self._blip2_text(text)

    def _blip2_item(self, pixels: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": pixels, **self._blip2_text(text)}

    def _blip2_text(self, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """BLIP-2: the processor puts num_query_tokens image placeholders before the text (unless told not to)."""
        n_image = self.num_query if self.image_placeholders else 0
        image = torch.full((n_image,), int(self.image_token), dtype=torch.long)
        ids = torch.cat([image, text])
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
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

    def __init__(self, ordinary: torch.Tensor, pad: int = 0) -> None:
        self.ordinary = ordinary  # ids a word may become (``ordinary_token_ids``): never a special one
        self.pad = pad

    def __call__(self, text: str, length: int) -> torch.Tensor:
        ids = [int(self.ordinary[zlib.crc32(w.encode()) % self.ordinary.numel()]) for w in text.split()[:length]]
        ids += [self.pad] * (length - len(ids))
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
        self.hash_tok = HashTokenizer(self.ordinary)

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
