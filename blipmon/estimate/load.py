"""Load and generate jobs: what loading a model, and generating with it, puts on every GPU and on the host.

This module mirrors ``blipmon.runner.models.load_model`` decision by decision (it may not import the runner, so the
few decisions it needs are restated here, and ``tests/unit/test_estimate_load.py`` holds them to the runner's):

- **where each parameter goes**: ``cpu``; ``cuda`` (GPU 0); ``cpu-first`` (loaded on the host, moved to GPU 0
  after); a table (each parameter to the longest module prefix naming it, as accelerate does); ``auto`` on a GPU
  machine (transformers' own ``infer_auto_device_map`` run on the model as ``from_pretrained`` builds it, with each
  GPU's capacity and 90 % of the host's, as ``from_pretrained`` passes them). Without a GPU, ``auto`` and
  ``cpu-first`` are the CPU. A bitsandbytes load without a map goes whole to GPU 0 (or the CPU);
- **how the bytes arrive** (transformers 5.25, ``modeling_utils._load_pretrained_model`` and
  ``core_model_loading.convert_and_load_state_dict_in_model``): a checkpoint's safetensors files are memory-mapped
  and every tensor is materialised from its slice. A tensor kept on the host in the file's dtype is a view of the
  mapping: it costs no anonymous memory, and its file pages become resident only when something reads them (a
  forward, a move to the GPU). A tensor cast to another dtype, quantized or sent to a GPU is read (its file pages
  resident until the files are closed at the end of loading) and copied. So the host's loading peak is the copies
  kept on the host plus the file pages read; a GPU's is its parameters (plus one layer in the load dtype while
  bitsandbytes quantizes it). Random weights of a shipped architecture are either built in place
  (``architectures.build.build_random``: every parameter straight on its device) or, where accelerate must place
  them (a table, ``auto`` on a GPU), saved once as a bfloat16 snapshot and loaded like a checkpoint; making the
  snapshot holds the whole model in bfloat16 on the host, once per machine;
- **what runs on the GPU when modules sit on the host** (accelerate 1.16's ``dispatch_model``, which transformers
  calls for a map with several devices): a module mapped to ``cpu`` beside GPU modules is *offloaded*, not run on the
  CPU. Its execution device is the first GPU; ``attach_align_device_hook`` puts an ``AlignDevicesHook(offload=True)``
  on every module below the map key that has tensors of its own, whose ``pre_forward`` copies just that module's own
  parameters to the GPU and whose ``post_forward`` sets them back to the meta device. So the GPU holds one module's
  weights at a time (with those of its offloaded ancestors, whose forward is still running: ``offload_stream_bytes``),
  the host keeps the weights (the hooks' weights map references the loaded tensors), and the offloaded modules'
  buffers and the root module's own host-mapped tensors (BLIP-2's ``query_tokens``: the root's non-offloading hook)
  move to the GPU for good. A map whose ``""`` entry is ``cpu`` beside GPU entries cannot be dispatched (the root's
  offloading hook sets every tensor to meta, then the GPU module's hook cannot move them: ``ValueError``), and
  bitsandbytes (8-bit and 4-bit alike) refuses any map mixing the host and a GPU.

``generate`` adds the batch's working memory on the device that runs it (``runner.generate``: ``batch_size``
images, the query tokens as the prompt, ``min(data.max_length, 30)`` new tokens): the key/value cache at full
length, the vision tower's output kept through generation, and the largest transient of one layer (its
projections, MLP and attention scores) or the logits of one step. This part is a model of the kernels' working
set, not a trace: docs/memory-model.md says what it covers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blipmon.core.config import ConfigError
from blipmon.core.units import MIB

_GPU_RE = re.compile(r"(?:cuda:)?(\d+)|cuda")

# Host memory of the runner child besides the model, while it loads: Python, torch, transformers and the model's
# modules, psutil, the sampler (measured: 366 MB peak RSS of ``blipmon run tiny/blip2-opt`` as a CPU load job,
# whose 1.5 MB of weights stay unread in their mapping).
LOAD_RUNTIME_BYTES = 350 * MIB
# What the first ``generate`` call imports and keeps besides the batch (generation utilities, logits processors;
# measured: +27 MB of peak RSS over the load on the tiny CPU generate job).
GENERATE_RUNTIME_BYTES = 24 * MIB
# Host memory the CUDA runtime takes in a process that initialises it (driver and runtime libraries, cuBLAS
# handles, module images): not measurable here; calibrated by tests/gpu/test_gpu_load_estimate.py.
CUDA_HOST_BYTES = 1024 * MIB
# transformers leaves 10 % of the host's available memory free when it infers an "auto" map by itself.
AUTO_HOST_SHARE = 0.90
# ``runner.generate``: new tokens per call and the prompt of a BLIP VQA question.
MAX_NEW_TOKENS = 30
VQA_QUESTION_TOKENS = 8

from blipmon.estimate.gpu import CUDA_CONTEXT_BYTES  # noqa: E402 - the context a fresh process creates

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def gpu_index(device: Any) -> int | None:
    """The GPU index a device-map value names (``0``, ``"cuda:1"``, ``"cuda"``), or None for "cpu"/"disk"."""
    if isinstance(device, bool):
        return None
    if isinstance(device, int):
        return device
    m = _GPU_RE.fullmatch(str(device))
    if m is None:
        return None
    return int(m.group(1)) if m.group(1) else 0


def _dev(device: Any) -> str:
    idx = gpu_index(device)
    return "cpu" if idx is None else f"cuda:{idx}"


# ---------------------------------------------------------------------------------------------------------------
# The model's tensors, by name


@dataclass(frozen=True)
class Tensor:
    """One unique parameter (or buffer) and what decides its bytes under each load."""

    name: str
    numel: int
    itemsize: int  # as built (buffers; non-float parameters)
    floating: bool
    keep_fp32: bool  # _keep_in_fp32_modules: fp32 when loading in float16
    keep_fp32_strict: bool  # _keep_in_fp32_modules_strict: fp32 in float16 and bfloat16
    quant_shape: tuple[int, int] | None  # (out, in) when bitsandbytes replaces its Linear
    buffer: bool = False

    def nbytes(self, dtype: str, quantization: str) -> int:
        """Bytes as ``from_pretrained(dtype=..., quantization_config=...)`` stores it (``catalog.param_bytes``' rule)."""

        if self.buffer or not self.floating:
            return self.numel * self.itemsize
        if quantization != "none" and self.quant_shape is not None:
            return quantized_linear_bytes(*self.quant_shape, quantization)
        if (self.keep_fp32 and dtype == "float16") or (self.keep_fp32_strict and dtype in ("float16", "bfloat16")):
            return 4 * self.numel
        return _ITEMSIZE[dtype] * self.numel

    def top(self) -> str:
        return self.name.split(".", 1)[0]


def quantized_linear_bytes(out_f: int, in_f: int, quantization: str) -> int:
    """A bitsandbytes Linear's weight with its state, as stored (no double quantization, as blipmon loads):
    8-bit, int8 weights and one fp32 scale per output row; 4-bit, two weights per byte, one fp32 absmax per block
    of ``catalog.BNB_4BIT_BLOCKSIZE`` and the 16-entry fp32 code (``catalog.param_bytes`` counts the same)."""
    from blipmon.architectures import catalog

    n = out_f * in_f
    if quantization == "8bit":
        return n + 4 * out_f
    blocks = -(-n // catalog.BNB_4BIT_BLOCKSIZE)
    return (n + 1) // 2 + 4 * blocks + 4 * catalog.BNB_4BIT_CODE_ENTRIES


@dataclass(frozen=True)
class Model:
    """A model's architecture as loading sees it: its tensors, its config, its modules (for device-map keys)."""

    model_id: str
    config: Any
    tensors: tuple[Tensor, ...]
    modules: frozenset[str]
    family: str
    names: frozenset[str] = frozenset()  # parameter and buffer names (a map may place a lone parameter)


def _architecture(model_id: str) -> tuple[Any, dict[str, Any] | None]:
    """(config, raw config.json or None): blipmon's tiny and shipped architectures, or a local checkpoint's."""
    from blipmon.architectures import catalog
    from blipmon.estimate import build

    raw = catalog.raw_config(model_id)
    if raw is not None:
        return catalog.resolve_config(raw)
    config, _known = build.architecture(model_id)
    path = Path(model_id) / "config.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return config, data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return config, None
    return config, None


@functools.lru_cache(maxsize=16)
def model_tensors(model_id: str, untie: bool = True) -> Model:
    """Every unique parameter and buffer of ``model_id`` with its full name (built once on the meta device, cached).

    The rules are ``architectures.catalog``'s (which Linear layers bitsandbytes replaces, decided on the tied model;
    heads untied as the checkpoint stores them; the fp32-kept modules), kept per name because device maps place
    names, not top-level modules. ``untie=False`` keeps the heads tied (a model built from its config alone); blipmon's
    random snapshots store untied heads with values of their own, as the real checkpoint does
    (``runner.models._save_random``), so loads count them untied.
    """
    from torch import nn

    from blipmon.architectures import catalog

    config, raw = _architecture(model_id)
    try:
        catalog.model_class(config)
    except ValueError as e:
        raise ConfigError(f"model.id = {model_id!r}: {e}") from None
    if getattr(config, "model_type", "") == "blip-2" and getattr(config, "image_token_index", None) is None:
        config.image_token_index = int(config.text_config.vocab_size) - 1  # as the runner does (mBLIP)
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = catalog.meta_model(config)  # a config object: built tied, as from_pretrained builds it
    # Which Linear layers bitsandbytes replaces is decided on the tied model, by transformers' own helpers.
    not_convert = HfQuantizer.get_modules_to_not_convert(model, None, list(model._keep_in_fp32_modules or []))
    quantized: dict[int, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and should_convert_module(name, not_convert):
            quantized[id(module.weight)] = (int(module.out_features), int(module.in_features))
    if raw is not None and untie:
        catalog.untie_like_checkpoint(model, raw)
    keep = catalog.module_pattern(model._keep_in_fp32_modules)
    strict = catalog.module_pattern(getattr(model, "_keep_in_fp32_modules_strict", None))
    tensors = [
        Tensor(
            name=name,
            numel=int(p.numel()),
            itemsize=int(p.element_size()),
            floating=bool(p.is_floating_point()),
            keep_fp32=bool(keep and keep.search(name)),
            keep_fp32_strict=bool(strict and strict.search(name)),
            quant_shape=quantized.get(id(p)),
        )
        for name, p in model.named_parameters()
    ]
    tensors += [
        Tensor(name, int(b.numel()), int(b.element_size()), False, False, False, None, buffer=True)
        for name, b in model.named_buffers()
    ]
    modules = frozenset(n for n, _ in model.named_modules())
    names = frozenset(t.name for t in tensors)
    return Model(model_id, config, tuple(tensors), modules, catalog.family_of(config), names)


# ---------------------------------------------------------------------------------------------------------------
# Mirrors of the runner's decisions (held to the runner's by tests/unit/test_estimate_load.py)

TINY_IDS = ("tiny/blip2-opt", "tiny/blip2-t5", "tiny/blip-vqa")
TINY_VERSION = 2  # runner.models.TINY_VERSION


def cache_root() -> Path:
    """``runner.models.cache_root``: where tiny models and random snapshots are written."""
    env = os.environ.get("BLIPMON_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "blipmon"


SNAPSHOT_VERSION = 2  # runner.models.SNAPSHOT_VERSION: snapshots of an older layout (heads tied) are not reused


def snapshot_dir(model_id: str) -> Path:
    """``runner.models.snapshot_dir``: the folder of a shipped architecture's random bfloat16 snapshot.

    Versioned as the runner names it, so a snapshot made before heads were untied (tied, 512M parameters short for
    mT0-XL) reads as not there yet and its making is counted, as the runner will make it again.
    """
    return cache_root() / "random" / f"{model_id.replace('/', '--')}-v{SNAPSHOT_VERSION}"


def _cached_locally(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - no cache, no hub library: not cached
        return False


def weights_path(cfg: dict[str, Any]) -> str:
    """How the child gets its weights: "checkpoint" (from_pretrained of real files), "random" (built in place by
    ``build_random``) or "snapshot" (a saved random bfloat16 snapshot, loaded through from_pretrained)."""
    m = cfg["model"]
    mid, weights = m["id"], m["weights"]
    if mid in TINY_IDS or Path(mid).is_dir():
        return "checkpoint"  # tiny models are saved once and loaded back, as a hub checkpoint would be
    if weights == "pretrained" or (weights == "auto" and _cached_locally(mid)):
        return "checkpoint"
    dm = m["device_map"]
    if isinstance(dm, dict):
        return "snapshot"
    return "random"  # "auto" on a GPU machine is decided by the caller (it knows whether a GPU is meant)


def file_dtype(cfg: dict[str, Any], path: str, model: Model) -> str:
    """The dtype the weights are stored in: a snapshot's bfloat16, a tiny model's float32, else the config's."""
    if path == "snapshot":
        return "bfloat16"
    if cfg["model"]["id"] in TINY_IDS:
        return "float32"
    name = str(getattr(model.config, "dtype", None) or "float32")
    name = name.removeprefix("torch.")
    return name if name in _ITEMSIZE else "float32"


# ---------------------------------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class DevicePeak:
    """One device's predicted memory in each phase of the job (bytes, without the runtime)."""

    device: str
    params: int  # parameter bytes placed here (the run's ``load.placement``)
    buffers: int
    load: int  # peak while loading
    generate: int = 0  # peak during a generate call (0 for a load job)
    acts: int = 0  # the generate call's working memory here (activations, key/value cache, logits)
    offload_transient: int = 0  # weights of a host-mapped block copied here for its forward
    runtime: int = 0  # GPU: context, allocator rounding, cuBLAS workspace; host: the interpreter (+ CUDA runtime)
    capacity_note: str = ""

    @property
    def peak(self) -> int:
        return max(self.load, self.generate)

    @property
    def phase(self) -> str:
        return "generate" if self.generate > self.load else "load"


@dataclass(frozen=True)
class LoadEstimate:
    """A load or generate job's predicted memory per device. ``to_json()`` is the estimate JSON's body."""

    name: str
    model_id: str
    kind: str  # "load" | "generate"
    path: str  # "checkpoint" | "random" | "snapshot"
    dtype: str
    quantization: str
    placement: dict[str, str]  # device-map key (or top-level module) -> device
    devices: tuple[DevicePeak, ...]  # GPUs first, then "cpu"
    total_params: int
    notes: tuple[str, ...] = ()
    snapshot_bytes: int = 0  # host bytes of making the random snapshot (0 when it exists or is not needed)
    gpu_ok: bool = True  # False when the load cannot run as placed (8-bit with modules on the host)
    gpu_problem: str = ""
    seconds: float = 0.0
    overheads: dict[str, Any] = field(default_factory=dict)  # GPU -> gpu.Overheads

    def device(self, name: str) -> DevicePeak:
        return next(d for d in self.devices if d.device == name)

    @property
    def main(self) -> str:
        gpus = [d.device for d in self.devices if d.device != "cpu"]
        return gpus[0] if gpus else "cpu"

    def to_json(self) -> dict[str, Any]:
        main = self.device(self.main)
        phases = []
        for d in self.devices:
            phases.append(_phase("load", d, d.load, 0))
            if self.kind == "generate":
                phases.append(_phase("generate", d, d.generate, d.acts))
        out: dict[str, Any] = {
            "phases": phases,
            "peak_bytes": int(main.peak),
            "peak_phase": main.phase,
            "placement": {d.device: int(d.params) for d in self.devices if d.params},
        }
        if self.overheads:
            first = self.overheads.get(self.main)
            if first is not None:
                out["overheads"] = first.to_json()
        return out

    def explain(self) -> str:
        from blipmon.core.units import fmt_bytes

        lines = [
            f"{self.name}: {self.model_id}, {self.kind} job ({self.dtype}"
            + (f", {self.quantization}" if self.quantization != "none" else "")
            + f", {self.path} weights)",
            "  parameters: "
            + ", ".join(f"{d.device} {fmt_bytes(d.params)}" for d in self.devices if d.params or d.device == "cpu"),
        ]
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def render_lines(self) -> list[str]:
        """The human table: per device, its parameters, the loading peak and the generate peak."""
        from blipmon.core.units import fmt_bytes

        head = ["device", "params", "load peak", "generate peak" if self.kind == "generate" else ""]
        rows = [head]
        for d in self.devices:
            rows.append(
                [
                    d.device,
                    fmt_bytes(d.params),
                    fmt_bytes(d.load),
                    fmt_bytes(d.generate) if self.kind == "generate" else "",
                ]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        where = "; ".join(_placement_summary(self.placement))
        lines = [
            f"estimate {self.name}   {self.model_id}, {self.kind} job, {self.dtype}"
            + (f" {self.quantization}" if self.quantization != "none" else "")
            + f", {self.path} weights",
            f"params   {self.total_params:,}",
            f"placed   {where}",
            "devices  (peaks without the runtime; load = while loading, generate = during a generate call)",
        ]
        for r in rows:
            lines.append(
                "  "
                + "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
                ).rstrip()
            )
        for d in self.devices:
            if d.device != "cpu" and self.overheads.get(d.device) is not None:
                lines.append(f"note     {d.device}: {self.overheads[d.device].describe()}")
        lines.extend(f"note     {n}" for n in self.notes)
        return lines

    def runs_out_text(self, lim: Any) -> str:
        from blipmon.core.units import fmt_bytes

        if lim.device != "cpu" and not self.gpu_ok:
            return f"{lim.device} cannot load as mapped: {self.gpu_problem}"
        d = self.device(lim.device)
        what = "host RAM" if lim.device == "cpu" else lim.device
        return f"{what} in the {d.phase} phase, short by {fmt_bytes(-(lim.headroom_bytes or 0))}"


def _placement_summary(placement: dict[str, str]) -> list[str]:
    """Per device, the map entries placed there: a few names, then how many more."""
    by: dict[str, list[str]] = {}
    for k, v in placement.items():
        by.setdefault(v, []).append(k or ("(whole model)" if len(placement) == 1 else "the rest"))
    out = []
    for dev, keys in by.items():
        more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
        out.append(f"{dev} <- {', '.join(keys[:4])}{more}")
    return out


def _phase(phase: str, d: DevicePeak, total: int, acts: int) -> dict[str, Any]:
    return {
        "phase": phase,
        "step": 0,
        "device": d.device,
        "params": int(d.params),
        "grads": 0,
        "optim": 0,
        "acts": int(acts),
        "total": int(total),
    }


# ---------------------------------------------------------------------------------------------------------------


def _check_load_config(cfg: dict[str, Any]) -> None:
    """Refuse what a load or generate job cannot use: training knobs set, a training strategy, several ranks."""
    from blipmon.core.config import defaults

    t, d = cfg["train"], defaults()["train"]
    kind = cfg["job"]["kind"]
    bad = []
    for key in ("lora", "qlora", "act_ckpt", "strategy", "optim", "precision", "accumulate_grad_batches", "devices",
                "num_nodes"):  # fmt: skip
        if key == "lora":
            if t["lora"]["enabled"]:
                bad.append("train.lora.enabled = true")
        elif t[key] != d[key]:
            bad.append(f"train.{key} = {t[key]!r}")
    if bad:
        raise ConfigError(
            f"job.kind = {kind!r} with training settings ({', '.join(bad)}): a {kind} job trains nothing; "
            "remove them, or use job.kind = 'train'"
        )


def _resolve_map(cfg: dict[str, Any], model: Model) -> dict[str, str]:
    """A device-map table checked against the model: every key names a module, every parameter is covered."""
    dm = cfg["model"]["device_map"]
    from blipmon.core.safe_text import one_line

    out: dict[str, str] = {}
    tops = sorted({t.top() for t in model.tensors if not t.buffer})
    for key, dev in dm.items():
        k = str(key)
        if k and k not in model.modules and k not in model.names:
            raise ConfigError(
                f"model.device_map: no module {one_line(repr(k))} in {model.model_id} "
                f"(its top-level modules: {', '.join(tops)})"
            )
        out[k] = _dev(dev)
    missing = [t.name for t in model.tensors if not t.buffer and _owner(t.name, out) is None]
    if missing:
        raise ConfigError(
            f"model.device_map places no device for {len(missing)} parameters of {model.model_id} "
            f"(e.g. {missing[0]}): add their module (top-level modules: {', '.join(tops)}) or a '' entry"
        )
    return out


def _owner(name: str, table: dict[str, str]) -> str | None:
    """The table key placing ``name``: the longest module prefix (accelerate's rule), "" for the whole model."""
    best = None
    for k in table:
        covers = k == "" or name == k or name.startswith(k + ".")
        if covers and (best is None or len(k) > len(best)):
            best = k
    return best


def _auto_map(cfg: dict[str, Any], model: Model, gpus: list[int], gpu_cap: int, host_cap: int) -> dict[str, str]:
    """transformers' own ``infer_auto_device_map`` on the model as from_pretrained builds it (load dtype, quantized
    layers, heads still tied), with each GPU's capacity and 90 % of the host's."""
    import copy

    import torch

    from blipmon.estimate import build

    spec = build.resolve_spec(cfg)
    spec = copy.copy(spec)
    spec.untie_from = None  # the map is inferred before the checkpoint unties anything
    meta = _meta_for_auto(
        cfg["model"]["id"], spec.quantization, str(spec.dtype), lambda: build.build_meta(spec, spec.arch, cfg)
    )
    from transformers.integrations.accelerate import infer_auto_device_map

    quantizer = None
    if spec.quantization != "none":
        from transformers import BitsAndBytesConfig
        from transformers.quantizers import AutoHfQuantizer

        if spec.quantization == "8bit":
            bnb = BitsAndBytesConfig(load_in_8bit=True)
        else:  # as runner.models.load_model configures 4-bit
            bnb = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=spec.quantization.split("-")[1],
                bnb_4bit_compute_dtype=torch.bfloat16 if spec.dtype == torch.bfloat16 else torch.float32,
                bnb_4bit_use_double_quant=False,
            )
        quantizer = AutoHfQuantizer.from_config(bnb, pre_quantized=False)
    max_memory: dict[Any, int] = {i: gpu_cap for i in gpus}
    max_memory["cpu"] = int(host_cap * AUTO_HOST_SHARE)
    if quantizer is not None:
        max_memory = quantizer.adjust_max_memory(max_memory)
    with torch.device("meta"), _quiet_accelerate():
        found = infer_auto_device_map(
            meta, max_memory=max_memory, no_split_module_classes=meta._no_split_modules, hf_quantizer=quantizer
        )
    return {str(k): _dev(v) for k, v in found.items()}


@contextlib.contextmanager
def _quiet_accelerate() -> Iterator[None]:
    """accelerate warns that GPU 0 "is not available" when the map is inferred on a machine without it."""
    import logging

    log = logging.getLogger("accelerate.utils.modeling")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


_AUTO_MODELS: dict[tuple[str, str, str], Any] = {}


def _meta_for_auto(model_id: str, quant: str, dtype: str, make: Any) -> Any:
    key = (model_id, quant, dtype)
    if key not in _AUTO_MODELS:
        if len(_AUTO_MODELS) >= 8:
            _AUTO_MODELS.pop(next(iter(_AUTO_MODELS)))
        _AUTO_MODELS[key] = make()
    return _AUTO_MODELS[key]


def estimate_load(
    cfg: dict[str, Any], *, gpus: int = 0, gpu_cap: int | None = None, host_cap: int | None = None,
    local_gpu: Any = None,
) -> LoadEstimate:  # fmt: skip
    """Predict a load or generate job's memory on every device. ``gpus`` is how many GPUs the machine has (0: a CPU
    machine), ``gpu_cap`` each one's capacity and ``host_cap`` the host's (both only used to infer an "auto" map)."""
    import time

    from blipmon.core import config as config_mod

    t0 = time.perf_counter()
    cfg = config_mod.validate(cfg)
    _check_load_config(cfg)
    m = cfg["model"]
    kind = cfg["job"]["kind"]
    path = weights_path(cfg)
    if dm_is_auto_on_gpu(m["device_map"], gpus) and path == "random":
        path = "snapshot"  # accelerate places it: the runner loads a saved random snapshot
    # Heads untied as the real checkpoint stores them, on every path: a random snapshot must hold what the
    # checkpoint holds (runner.models._save_random gives the untied head its own values, or from_pretrained re-ties it)
    model = model_tensors(m["id"])
    dtype, quant = m["dtype"], m["quantization"]
    dm = m["device_map"]
    cuda = gpus > 0 and dm != "cpu"
    notes: list[str] = []

    # -- where each tensor ends up, and where it is while loading
    table: dict[str, str]
    move_after = False
    if isinstance(dm, dict):
        table = _resolve_map(cfg, model)
        if any(v != "cpu" for v in table.values()) and not cuda:
            raise ConfigError(
                "this configuration's device map names a GPU and no GPU is visible here: give its memory with "
                "--gpu-memory (e.g. --gpu-memory 80GiB)"
            )
    elif dm == "auto" and cuda:
        import psutil

        context = 0 if local_gpu is not None and getattr(local_gpu, "own_context", False) else CUDA_CONTEXT_BYTES
        table = _auto_map(
            cfg,
            model,
            list(range(gpus)),
            int(gpu_cap or 0) - context,
            int(host_cap or psutil.virtual_memory().available),
        )
    elif dm == "cuda" or (quant != "none" and cuda):
        table = {"": "cuda:0"}
    elif dm == "cpu-first" and cuda:
        table, move_after = {"": "cuda:0"}, True
    else:
        table = {"": "cpu"}
    if dm == "cuda" and not cuda:
        raise ConfigError(
            "this configuration runs on a GPU and no GPU is visible here: give its memory with --gpu-memory "
            "(e.g. --gpu-memory 80GiB)"
        )
    fdtype = file_dtype(cfg, path, model)
    params = [t for t in model.tensors if not t.buffer]
    buffers = [t for t in model.tensors if t.buffer]
    final = {
        t.name: table[_owner(t.name, table) or ""] if _owner(t.name, table) is not None else "cpu"
        for t in model.tensors
    }
    loading_at = {n: ("cpu" if move_after else d) for n, d in final.items()}
    dispatched = len(set(table.values())) > 1 and any(v != "cpu" for v in table.values())
    if dispatched:
        # dispatch_model moves what no offloading hook streams to its module's execution device for good: buffers of
        # offloaded modules (offload_buffers is off) and host-mapped tensors outside an offloaded module (the root's
        # own parameters, e.g. query_tokens). Loaded where the map says, moved at the end of from_pretrained.
        main_gpu = sorted((v for v in table.values() if v != "cpu"), key=lambda d: int(d.split(":")[1]))[0]
        for t in model.tensors:
            if final[t.name] == "cpu" and (t.buffer or _offloaded_module_key(t.name, table, model) is None):
                final[t.name] = _execution_device(t.name, table, model, main_gpu)
    gpu_names = sorted({d for d in final.values() if d != "cpu"}, key=lambda s: int(s.split(":")[1]))
    names = [*gpu_names, "cpu"]
    moved = {n: sum(t.nbytes(dtype, quant) for t in model.tensors if loading_at[t.name] == "cpu" and final[t.name] == n)
             for n in gpu_names} if dispatched else dict.fromkeys(gpu_names, 0)  # fmt: skip

    def nbytes(t: Tensor) -> int:
        return t.nbytes(dtype, quant)

    placed = {n: sum(nbytes(t) for t in params if final[t.name] == n) for n in names}
    bufs = {n: sum(nbytes(t) for t in buffers if final[t.name] == n) for n in names}
    largest_q = max((t.numel * _ITEMSIZE[dtype] for t in params if t.quant_shape is not None), default=0)
    q_transient = largest_q if quant != "none" else 0

    # -- loading peaks
    load = dict.fromkeys(names, 0)
    host_after = 0  # host bytes resident once loaded (before anything reads the mapped weights)
    host_mapped = 0  # host tensors left as views of the mapped files (resident once read)
    snapshot = 0
    if path == "random":
        # build_random: every tensor drawn straight on its device (runner.models.load_model's ``on_gpu``)
        everything = sum(nbytes(t) for t in model.tensors)
        if cuda and (quant != "none" or dm == "cuda"):
            load["cuda:0"] = everything + q_transient
            load["cpu"] = (
                largest_q if quant == "8bit" else 0
            )  # 8-bit weights are drawn on the host, quantized on the move
        else:
            load["cpu"] = everything + q_transient
            if move_after:  # built on the host, then moved to the GPU tensor by tensor
                load["cuda:0"] = everything
        host_after = 0 if gpu_names else everything
    else:
        if path == "snapshot" and not (snapshot_dir(m["id"]) / "config.json").is_file():
            snapshot = sum(t.nbytes("bfloat16", "none") for t in model.tensors)
            notes.append(
                f"the random bfloat16 snapshot is made once on this machine first: {_fmt(snapshot)} of host RAM then "
                f"({snapshot_dir(m['id'])})"
            )
        copies = 0
        file_pages = 0
        for t in model.tensors:
            at = loading_at[t.name]
            size = nbytes(t)
            fsize = t.nbytes(fdtype, "none") if not t.buffer else size
            same = not t.buffer and size == fsize and (quant == "none" or t.quant_shape is None)
            if at == "cpu" and same:
                host_mapped += size  # a view of the mapping: nothing read yet
                if move_after:
                    file_pages += fsize  # read by the move to the GPU
                continue
            if t.buffer and at == "cpu":
                copies += size  # buffers are made in memory
                continue
            if not t.buffer:
                file_pages += fsize
            if at == "cpu":
                copies += size
            else:
                load[at] += size
        for n in gpu_names:
            load[n] += (q_transient if quant != "none" else 0) + moved[n]
        load["cpu"] = max(snapshot, copies + file_pages)
        host_after = 0 if move_after else copies
        if move_after:
            host_mapped = 0  # moved to the GPU: nothing of the model stays on the host
    # -- generate
    gen = dict.fromkeys(names, 0)
    acts = dict.fromkeys(names, 0)
    transient = dict.fromkeys(names, 0)
    if kind == "generate":
        runs_on = gpu_names[0] if gpu_names else "cpu"
        work = generate_bytes(model, cfg, compute_dtype(cfg, model))
        acts[runs_on] = work
        if runs_on != "cpu" and final_has_host_modules(final):
            # accelerate copies an offloaded module's own weights to the GPU for its forward, module by module
            transient[runs_on] = offload_stream_bytes(model, table, final, dtype, quant)
        for n in names:
            resident = placed[n] + bufs[n] if n != "cpu" else host_after + host_mapped
            gen[n] = resident + acts[n] + transient[n]
        notes.append(
            f"generate: batch {cfg['train']['batch_size']}, {max_new_tokens(cfg)} new tokens; the working memory "
            f"({_fmt(work)} on {runs_on}) is the key/value cache at full length, the vision tower's output and one "
            "layer's or one step's largest transient (a model, not a trace)"
        )
    # -- problems the load would meet
    gpu_ok, problem = True, ""
    values = set(table.values())
    host_keys = [k for k, v in table.items() if v == "cpu"]
    if quant != "none" and values != {"cpu"} and "cpu" in values:
        # transformers' Bnb8BitHfQuantizer/Bnb4BitHfQuantizer.validate_environment, before anything loads: a map
        # (written, or inferred by "auto") mixing the host and a GPU is a ValueError without
        # llm_int8_enable_fp32_cpu_offload, which blipmon does not set
        gpu_ok = False
        bits = "8-bit" if quant == "8bit" else "4-bit"
        shown = _keys_text(host_keys)
        if isinstance(dm, dict):
            problem = (
                f"transformers refuses {'an' if bits == '8-bit' else 'a'} {bits} load whose model.device_map puts {shown} on the host beside a GPU "
                "(bitsandbytes: 'Some modules are dispatched on the CPU or the disk'; blipmon does not set "
                f"llm_int8_enable_fp32_cpu_offload): map every module to the GPU, or load {m['id']} unquantized"
            )
        else:
            problem = (
                f"transformers refuses this {bits} load: device_map = 'auto' would put {shown} on the host "
                f"({_fmt(placed['cpu'])} that does not fit the GPU beside the rest), and bitsandbytes refuses modules "
                "on the CPU beside a GPU (llm_int8_enable_fp32_cpu_offload is off)"
            )
        notes.append(problem)
    elif isinstance(dm, dict) and table.get("") == "cpu" and values != {"cpu"}:
        # accelerate's attach_align_device_hook_on_blocks: the "" entry's offloading hooks set every tensor of the
        # model to meta, then a GPU entry's hook must move meta tensors: "weight is on the meta device"
        gpu_ok = False
        gpu_keys = _keys_text([k for k, v in table.items() if v != "cpu"])
        problem = (
            f"accelerate cannot dispatch this model.device_map: its '' = 'cpu' entry offloads every module, {gpu_keys} "
            "included, and dispatch_model then fails moving them to the GPU (ValueError: 'weight is on the meta "
            "device'): name the modules that go to the host instead of ''"
        )
        notes.append(problem)
    if path == "checkpoint" and fdtype != dtype and quant == "none":
        notes.append(f"weights stored in {fdtype}, loaded in {dtype}: each is read and converted on the way")
    # -- runtime per device
    from blipmon.estimate import gpu as gpu_mod

    overheads: dict[str, Any] = {}
    runtime = dict.fromkeys(names, 0)
    for n in gpu_names:
        sizes = [nbytes(t) for t in model.tensors if final[t.name] == n]
        packed = gpu_mod.pack(sizes)
        own = local_gpu is not None and getattr(local_gpu, "own_context", False) and local_gpu.free is not None
        o = gpu_mod.Overheads(
            allocator_rounding=packed.rounding,
            allocator_segments=packed.segments,
            cublas_workspaces=gpu_mod.cublas_workspace_bytes(
                getattr(local_gpu, "capability", None), gpu_mod.cublas_env()
            )
            if kind == "generate"
            else 0,
            ddp_buckets=0,
            deepspeed_offload_buffer=0,
            nccl_buffers=0,
            cuda_context=0 if own else gpu_mod.CUDA_CONTEXT_BYTES,
        )
        overheads[n] = o
        runtime[n] = o.total
    runtime["cpu"] = (
        LOAD_RUNTIME_BYTES + (GENERATE_RUNTIME_BYTES if kind == "generate" else 0) + (CUDA_HOST_BYTES if cuda else 0)
    )
    devices = tuple(
        DevicePeak(n, placed[n], bufs[n], load[n], gen[n], acts[n], transient[n], runtime[n]) for n in names
    )
    where = {k: v for k, v in table.items()}
    return LoadEstimate(
        name=str(cfg.get("name", "")),
        model_id=m["id"],
        kind=kind,
        path=path,
        dtype=dtype,
        quantization=quant,
        placement=where,
        devices=devices,
        total_params=sum(t.numel for t in params),
        notes=tuple(notes),
        snapshot_bytes=snapshot,
        gpu_ok=gpu_ok,
        gpu_problem=problem,
        seconds=time.perf_counter() - t0,
        overheads=overheads,
    )


def _keys_text(keys: list[str]) -> str:
    """Map keys for a sentence: a few names, then how many more ("" is the rest of the model)."""
    from blipmon.core.safe_text import one_line

    shown = [one_line(k) if k else "the rest of the model" for k in keys[:4]]
    more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
    return ", ".join(shown) + more


def _offloaded_module_key(name: str, table: dict[str, str], model: Model) -> str | None:
    """The host-mapped *module* key whose offloading hooks stream ``name``'s module, or None.

    accelerate puts offloading hooks on the modules below a key that names a module mapped to the host; a key that
    names a lone parameter gets no hook of its own (its module's hook places it)."""
    module = name.rsplit(".", 1)[0] if "." in name else ""
    best = None
    for k in table:
        covers = (k == "" or module == k or module.startswith(k + ".")) and (k == "" or k in model.modules)
        if covers and (best is None or len(k) > len(best)):
            best = k
    return best if best is not None and table[best] == "cpu" else None


def _execution_device(name: str, table: dict[str, str], model: Model, main_gpu: str) -> str:
    """Where a tensor no offloading hook streams ends up after dispatch: its module's execution device."""
    module = name.rsplit(".", 1)[0] if "." in name else ""
    best = None
    for k in table:
        covers = (k == "" or module == k or module.startswith(k + ".")) and (k == "" or k in model.modules)
        if covers and (best is None or len(k) > len(best)):
            best = k
    dev = table.get(best, "cpu") if best is not None else "cpu"
    return main_gpu if dev == "cpu" else dev


def offload_stream_bytes(model: Model, table: dict[str, str], final: dict[str, str], dtype: str, quant: str) -> int:
    """The largest set of offloaded weights on the GPU at once during a forward (accelerate's offloading hooks).

    Each module below a host-mapped key that has parameters of its own gets a hook that copies them to the GPU in
    ``pre_forward`` and frees them in ``post_forward``; a child's forward runs inside its parent's, so while the
    deepest module runs, its own weights and those of every offloaded ancestor with weights are there. The peak is
    the largest such chain (one Linear of the vision tower's MLP for BLIP-2, not the whole tower)."""
    own: dict[str, int] = {}
    for t in model.tensors:
        if t.buffer or final[t.name] != "cpu":
            continue
        key = _offloaded_module_key(t.name, table, model)
        if key is None:
            continue
        module = t.name.rsplit(".", 1)[0] if "." in t.name else ""
        own[module] = own.get(module, 0) + t.nbytes(dtype, quant)
    best = 0
    for module in own:
        parts = module.split(".") if module else []
        chain = own.get("", 0) + sum(own.get(".".join(parts[:i]), 0) for i in range(1, len(parts) + 1))
        best = max(best, chain)
    return best


def dm_is_auto_on_gpu(dm: Any, gpus: int) -> bool:
    return dm == "auto" and gpus > 0


def final_has_host_modules(final: dict[str, str]) -> bool:
    return any(d == "cpu" for d in final.values())


def _fmt(n: int) -> str:
    from blipmon.core.units import fmt_bytes

    return fmt_bytes(n)


def max_new_tokens(cfg: dict[str, Any]) -> int:
    """``runner.generate``: ``min(data.max_length, 30)`` new tokens per call."""
    return min(int(cfg["data"]["max_length"]), MAX_NEW_TOKENS)


def compute_dtype(cfg: dict[str, Any], model: Model) -> str:
    """The dtype activations are in: the load dtype, or for a quantized load its compute dtype (fp16 for 8-bit)."""
    dtype, quant = cfg["model"]["dtype"], cfg["model"]["quantization"]
    if quant == "8bit":
        return "float16"
    if quant != "none":
        return "bfloat16" if dtype == "bfloat16" else "float32"
    return dtype


def kv_cache_bytes(model: Model, cfg: dict[str, Any], dtype: str) -> int:
    """The key/value cache at the end of a generate call: keys and values of every decoder layer for every
    position it attends to (decoder-only: the query-token prompt and the new tokens; T5: its own tokens, the
    decoder start token included, plus the cross-attention over the encoded prompt; BLIP VQA's text decoder:
    the answer plus the cross-attention over the image)."""
    c, t = model.config, model.config.text_config
    s = _ITEMSIZE[dtype]
    b = int(cfg["train"]["batch_size"])
    new = max_new_tokens(cfg)
    hidden = int(getattr(t, "d_model", None) or t.hidden_size)
    heads = int(getattr(t, "num_heads", None) or getattr(t, "n_head", None) or t.num_attention_heads)
    inner = int(getattr(t, "d_kv", 0) or 0) * heads or hidden
    if model.family == "blip-vqa":
        v = c.vision_config
        tokens_v = (int(v.image_size) // int(v.patch_size)) ** 2 + 1
        return int(t.num_hidden_layers) * b * 2 * inner * s * (new + tokens_v)
    if model.family == "blip2-encdec":
        layers = int(getattr(t, "num_decoder_layers", None) or t.num_layers)
        return layers * b * 2 * inner * s * (new + 1 + int(c.num_query_tokens))
    return int(t.num_hidden_layers) * b * 2 * inner * s * (int(c.num_query_tokens) + new)


def generate_bytes(model: Model, cfg: dict[str, Any], dtype: str) -> int:
    """The working memory of one generate call (see the module docstring): the key/value cache at full length,
    the vision tower's output, and the largest of one layer's transients and one step's logits."""
    c = model.config
    s = _ITEMSIZE[dtype]
    b = int(cfg["train"]["batch_size"])
    new = max_new_tokens(cfg)
    v = c.vision_config
    tokens_v = (int(v.image_size) // int(v.patch_size)) ** 2 + 1
    hv, fv, heads_v = int(v.hidden_size), int(v.intermediate_size), int(v.num_attention_heads)
    vision_out = b * tokens_v * hv * s
    vision_layer = b * tokens_v * (4 * hv + fv) * s + b * heads_v * tokens_v * tokens_v * s
    t = c.text_config
    hidden = int(getattr(t, "d_model", None) or t.hidden_size)
    heads = int(getattr(t, "num_heads", None) or getattr(t, "n_head", None) or t.num_attention_heads)
    ffn = int(
        getattr(t, "d_ff", None) or getattr(t, "ffn_dim", None) or getattr(t, "intermediate_size", None) or 4 * hidden
    )
    vocab = int(t.vocab_size)
    seq = VQA_QUESTION_TOKENS if model.family == "blip-vqa" else int(c.num_query_tokens)
    kv = kv_cache_bytes(model, cfg, dtype)
    lm_layer = b * seq * (4 * hidden + ffn) * s + b * heads * seq * (seq + new) * s
    logits = b * vocab * (s + 4 + 4)  # the last position's logits, their fp32 scores and the processed copy
    return vision_out + max(vision_layer, kv + max(lm_layer, logits))


# ---------------------------------------------------------------------------------------------------------------


def judge_load(cfg: dict[str, Any], *, gpu_memory: int | None, host_memory: int | None, t0: float) -> Any:
    """``judge`` for load and generate jobs: every GPU against its capacity, the host against ``--host-memory``
    (or the memory available now, when the job runs on the CPU). A load that cannot run as mapped (bitsandbytes
    with modules on the host, a map accelerate cannot dispatch) is refused on its GPU with the reason, judged
    against the capacity as given."""
    import dataclasses

    from blipmon.estimate import judge as judge_mod
    from blipmon.estimate import timeline

    device, capacity, source = judge_mod.choose_gpu(cfg, gpu_memory)
    dm = cfg["model"]["device_map"]
    here = judge_mod.gpu_here()
    local = None
    gpus = 0
    if dm != "cpu" and (capacity is not None or here):
        gpus = 1
    if dm != "cpu" and capacity is None and here:
        from blipmon.estimate.gpu import local_gpu

        capacity, source = timeline.capacity("cuda", None)  # the local GPU's free memory, as for training
        local = local_gpu(0)
    import psutil

    avail = int(psutil.virtual_memory().available)
    est = estimate_load(cfg, gpus=gpus, gpu_cap=capacity, host_cap=host_memory or avail, local_gpu=local)
    if device is None and capacity is not None and source is None:
        source = "given"
    if dm == "cpu" and gpu_memory is not None:
        note = "--gpu-memory is not used: model.device_map = 'cpu' loads and runs everything on the host"
        est = dataclasses.replace(est, notes=(*est.notes, note))
    judged = []
    for d in est.devices:
        if d.device == "cpu":
            if host_memory is not None:
                cap, src = host_memory, "--host-memory"
            elif est.main == "cpu":
                cap, src = avail, "available host memory"
            else:
                cap, src = None, ""
            what = "host peak"
        else:
            cap, src = capacity, source or "given"
            what = "peak"
        # A load that cannot run as mapped is refused on its first GPU, against the capacity as given
        refused = est.gpu_problem if not est.gpu_ok and d.device == est.main and d.device != "cpu" else ""
        judged.append(judge_mod.DeviceJudgement(d.device, d.peak, d.runtime, cap, src, what, refused))
    return judge_mod.conclude(
        est, judged, "cuda" if est.main != "cpu" else "cpu", gpu_memory, host_memory, t0, est.notes
    )
