"""The generate job: caption (or answer about) a few synthetic images; latency and memory per call."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psutil
import torch

from blipmon.runner.allocator import model_cuda_devices, read, reset_peaks
from blipmon.runner.data import SyntheticCaptions
from blipmon.runner.models import LoadedModel
from blipmon.runner.train import Cursor

CALLS = 3


def run_generate(
    loaded: LoadedModel, cfg: dict[str, Any], emit: Callable[..., Any], cursor: Cursor, *, cuda: bool
) -> None:
    model = loaded.model
    model.eval()
    batch_size = cfg["train"]["batch_size"]
    max_new = min(cfg["data"]["max_length"], 30)
    ds = SyntheticCaptions(model.config, loaded.family, batch_size * CALLS, max_length=8, seed=cfg["runtime"]["seed"])
    vision_dtype = next(p for n, p in model.named_parameters() if "vision_model" in n).dtype
    if not vision_dtype.is_floating_point:
        vision_dtype = torch.float16 if cuda else torch.float32
    proc = psutil.Process()
    # accelerate's "auto" (a load/generate job's meaning) may spread the model over several GPUs: every
    # allocator figure is summed over all of them, with each GPU's own under ``devices``.
    devices = model_cuda_devices(model, default=loaded.device.index if loaded.device.type == "cuda" else None)
    for call in range(CALLS):
        cursor.step, cursor.phase = call, "generate"
        items = [ds[call * batch_size + i] for i in range(batch_size)]
        pixels = torch.stack([it["pixel_values"] for it in items]).to(loaded.device, vision_dtype)
        kwargs: dict[str, Any] = {"pixel_values": pixels, "max_new_tokens": max_new}
        if loaded.family == "blip-vqa":
            kwargs["input_ids"] = torch.stack([it["input_ids"] for it in items]).to(loaded.device)
        else:  # the image placeholders alone: an unconditional caption
            nq = model.config.num_query_tokens
            kwargs["input_ids"] = torch.stack([it["input_ids"][:nq] for it in items]).to(loaded.device)
        if cuda:
            reset_peaks(devices)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**kwargs)
        for dev in devices if cuda else []:  # the call's latency includes its GPU work (once per call)
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        memory: dict[str, Any] = read(devices).as_record() if cuda else {"allocated": None, "peak": None}
        emit(
            "generate",
            call=call,
            seconds=round(seconds, 6),
            batch_size=batch_size,
            new_tokens=int(out.shape[-1]),
            **memory,
            host_rss=proc.memory_info().rss,
        )
