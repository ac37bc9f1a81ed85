"""Building and loading models: the tiny built-in architectures and hub ids / local paths.

Tiny models are real transformers architectures (BLIP-2 with OPT or T5, BLIP VQA) at toy sizes
with random weights. They are saved once to a cache directory and then loaded back through
``from_pretrained``, so the tests exercise exactly the path a hub checkpoint takes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blipmon.core.config import ConfigError
from blipmon.core.presets import TINY_MODELS

TINY_VERSION = 2  # bump when a tiny architecture changes, so stale caches are rebuilt
# Bump when what a random snapshot holds changes, so stale snapshots are not loaded (estimate.load.SNAPSHOT_VERSION).
# 2: heads the real checkpoint keeps untied are untied, with values of their own (1 kept them tied).
SNAPSHOT_VERSION = 2

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_root() -> Path:
    env = os.environ.get("BLIPMON_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "blipmon"


def _vision(image_size: int = 128) -> dict[str, Any]:
    return {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": 16,
    }


def _qformer() -> dict[str, Any]:
    return {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "encoder_hidden_size": 64,
        "vocab_size": 1000,
    }


def tiny_config(name: str) -> Any:
    """The architecture config of a built-in tiny model (``tiny/blip2-opt``, ``tiny/blip2-t5``, ``tiny/blip-vqa``)."""
    from transformers import Blip2Config, BlipConfig, OPTConfig, T5Config

    if name == "tiny/blip2-opt":
        text = OPTConfig(
            vocab_size=1024,
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=256,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        )
        return Blip2Config(
            vision_config=_vision(), qformer_config=_qformer(), text_config=text.to_dict(),
            num_query_tokens=8, image_token_index=1023,
        )  # fmt: skip
    if name == "tiny/blip2-t5":
        text = T5Config(
            vocab_size=1024, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
        return Blip2Config(
            vision_config=_vision(), qformer_config=_qformer(), text_config=text.to_dict(),
            num_query_tokens=8, image_token_index=1023,
        )  # fmt: skip
    if name == "tiny/blip-vqa":
        return BlipConfig(
            vision_config=_vision(),
            text_config={
                "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 4, "encoder_hidden_size": 64, "max_position_embeddings": 128,
                "bos_token_id": 2, "sep_token_id": 3, "pad_token_id": 0,
            },
        )  # fmt: skip
    raise KeyError(name)


def model_class(config: Any) -> Any:
    """The transformers class that trains this architecture the way the seeds do."""
    from transformers import Blip2ForConditionalGeneration, BlipForQuestionAnswering

    mt = getattr(config, "model_type", "")
    if mt == "blip-2":
        return Blip2ForConditionalGeneration
    if mt == "blip":
        return BlipForQuestionAnswering
    raise ValueError(f"model_type {mt!r} is not supported yet (supported: blip-2, blip)")


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """One builder at a time per cache folder: ranks and nodes sharing a machine start together."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _save(model: Any, folder: Path) -> None:
    """``save_pretrained``, refusing to leave an empty folder behind to be renamed into the cache.

    Once a process group exists, transformers writes on global rank 0 only; the cache must be
    filled before ``torch.distributed`` starts (``prepare_files``), since every node needs its own.
    """
    model.save_pretrained(folder)
    if not (folder / "config.json").is_file():
        raise RuntimeError(f"transformers wrote no checkpoint into {folder} (a torch.distributed rank other than 0?)")


def prepare_files(cfg: dict[str, Any]) -> None:
    """Write what ``load_model`` will read from blipmon's cache (a tiny model, a random snapshot) now.

    Called before the process group starts: afterwards only global rank 0 could write it, and on a
    machine of its own node 1 would wait forever for a file that node 0 wrote elsewhere.
    """
    source, weights = resolve_source(cfg)  # builds a tiny model
    m = cfg["model"]
    if weights != "random" or Path(source).is_dir():
        return
    dm = m["device_map"]
    # accelerate's "auto" only where load_model will use it (a load/generate job on a GPU machine).
    placed = "auto" if dm == "auto" and cfg["job"]["kind"] != "train" and torch.cuda.is_available() else None
    if placed_by_accelerate(dm, placed):
        random_snapshot(source, architecture(source, weights, bool(m.get("trust_remote_code", False))))


def placed_by_accelerate(device_map: Any, placed: Any) -> bool:
    """Whether accelerate places the model (a device-map table, or its own "auto"), so random weights must
    come from a saved snapshot through ``from_pretrained`` rather than be built whole on one device."""
    return isinstance(device_map, dict) or placed == "auto"


def ensure_tiny(name: str) -> Path:
    """Build and save a tiny model once; later calls (and other processes) reuse the directory."""
    target = cache_root() / "tiny" / f"{name.split('/', 1)[1]}-v{TINY_VERSION}"
    if (target / "config.json").is_file():
        return target
    with _build_lock(target.parent):
        return _build_tiny(name, target)


def _build_tiny(name: str, target: Path) -> Path:
    if (target / "config.json").is_file():  # another process built it while this one waited
        return target
    cfg = tiny_config(name)
    torch.manual_seed(0)
    model = model_class(cfg)(cfg)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        _save(model, tmp)
        try:
            os.replace(tmp, target)  # atomic: concurrent builders race harmlessly
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class LoadedModel:
    model: Any
    family: str  # "blip2-decoder" | "blip2-encdec" | "blip-vqa"
    seconds: float
    weights: str  # "pretrained" | "random"
    device: torch.device  # where inputs go
    source: str = ""  # the directory or hub id it came from (for its processor)


def family_of(config: Any) -> str:
    if config.model_type == "blip":
        return "blip-vqa"
    return "blip2-decoder" if config.use_decoder_only_language_model else "blip2-encdec"


def weights_dtype(cfg: dict[str, Any]) -> torch.dtype:
    """Train jobs take their weight dtype from the precision mode (as Lightning does); others from model.dtype."""
    if cfg["job"]["kind"] == "train":
        return torch.bfloat16 if cfg["train"]["precision"] == "bf16-true" else torch.float32
    return DTYPES[cfg["model"]["dtype"]]


def resolve_source(cfg: dict[str, Any]) -> tuple[str, str]:
    """(path or id to load from, "pretrained" | "random")."""
    mid, weights = cfg["model"]["id"], cfg["model"]["weights"]
    if mid in TINY_MODELS:
        return str(ensure_tiny(mid)), "random"
    if Path(mid).is_dir():
        return mid, "pretrained" if weights != "random" else "random"
    if weights == "random":
        return mid, "random"
    if weights == "auto":
        return mid, "pretrained" if _cached_locally(mid) else "random"
    return mid, "pretrained"


def _cached_locally(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:
        return False


def architecture(source: str, weights: str, trust: bool) -> Any:
    """The architecture config: shipped with blipmon for known ids, else from the path or the HF cache."""
    from transformers import AutoConfig

    arch = None
    if not Path(source).is_dir():
        from blipmon.architectures.catalog import architecture_config

        arch = architecture_config(source)
    if arch is None:
        arch = AutoConfig.from_pretrained(source, trust_remote_code=trust)
    if getattr(arch, "model_type", "") == "blip-2" and getattr(arch, "image_token_index", None) is None:
        # Older checkpoints (mBLIP) predate the image placeholder token: use the last vocabulary id,
        # whose embedding the image features replace anyway.
        arch.image_token_index = int(arch.text_config.vocab_size) - 1
    return arch


def snapshot_dir(model_id: str) -> Path:
    """The cache folder of ``model_id``'s random snapshot, versioned so a snapshot of an older layout is not reused."""
    return cache_root() / "random" / f"{model_id.replace('/', '--')}-v{SNAPSHOT_VERSION}"


def random_snapshot(model_id: str, arch: Any) -> Path:
    """A random-weight checkpoint of a real-size architecture, written once to the cache.

    Quantized loading and explicit device maps only exist on ``from_pretrained``'s path, so a
    model that must be quantized or split is materialised once (in bfloat16, to halve the disk)
    and then loaded exactly as its real checkpoint would be.
    """
    target = snapshot_dir(model_id)
    if (target / "config.json").is_file():
        return target
    with _build_lock(target.parent):
        if (target / "config.json").is_file():
            return target
        return _save_random(model_id, arch, target)


def _save_random(model_id: str, arch: Any, target: Path) -> Path:
    """Build ``arch`` with random bfloat16 weights, its heads untied as ``model_id``'s checkpoint stores them, and save it.

    A model built from its config ties the language model's head to its input embedding, and ``save_pretrained``
    stores a tied pair once; loading that would hold fewer parameters than the real checkpoint where the checkpoint
    keeps its own head (mT0-XL's ``lm_head``: 250,112 x 2,048). So the head is untied as the checkpoint has it
    (``catalog.untie_like_checkpoint``, the estimator's rule) and given random values of its own: ``from_pretrained``
    re-ties a stored pair whose values are equal, whatever the config's ``tie_word_embeddings`` says (T5's config
    forces it true), and keeps it untied only when they differ.
    """
    from blipmon.architectures.catalog import raw_config, untie_like_checkpoint

    torch.manual_seed(0)
    model = model_class(arch)._from_config(arch, dtype=torch.bfloat16)
    if untie_like_checkpoint(model, raw_config(model_id) or {}):
        with torch.no_grad():
            model.get_output_embeddings().weight.normal_()
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        _save(model, tmp)
        del model
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class PlacementError(ConfigError):
    """A device map this job cannot run with, said before anything is loaded."""


def world_size(cfg: dict[str, Any]) -> int:
    """Ranks a train configuration runs (``train.devices`` x ``train.num_nodes``); 1 for load and generate."""
    if cfg["job"]["kind"] != "train":
        return 1
    return int(cfg["train"].get("devices", 1)) * int(cfg["train"].get("num_nodes", 1))


def check_device_map(cfg: dict[str, Any], world: int | None = None) -> None:
    """Refuse a device map that several training ranks cannot share (raises ``PlacementError``).

    DDP keeps one whole replica per rank, on the rank's own GPU (its ``LOCAL_RANK``), and refuses a module
    spread over devices. A table names fixed devices, the same for every rank: every rank's replica would land
    on the same GPU(s), or be split, or be partly on the CPU. ``"cuda"`` and ``"auto"`` (which a train job
    reads as the rank's own GPU, see ``device_map_kwarg``) are what DDP can run.
    """
    world = world_size(cfg) if world is None else world
    dm = cfg["model"]["device_map"]
    if world > 1 and isinstance(dm, dict):
        from blipmon.core.safe_text import one_line

        shown = one_line(", ".join(f"{k or '(whole model)'} = {v!r}" for k, v in list(dm.items())[:6]))
        raise PlacementError(
            f"model.device_map = {{{shown}}} with {world} training ranks: DDP keeps a whole copy of the model on "
            "each rank's own GPU, and a table names the same devices for every rank. "
            "Use model.device_map = 'cuda' (each rank's own GPU) or train on one rank (train.devices = 1)"
        )


def device_map_kwarg(
    cfg: dict[str, Any], *, cuda: bool, cuda_index: int = 0, world: int | None = None
) -> tuple[Any, bool]:
    """(``device_map`` for ``from_pretrained`` or None, whether to move the model to the GPU after loading).

    - a table: as written (accelerate places each module; CPU/disk parts are offloaded with hooks);
    - ``"cuda"``: the whole model on this process's GPU (``{"": cuda_index}``);
    - ``"auto"`` in a train job: the same, the process's own GPU. blipmon's training loop runs one device per
      process (and DDP one replica per rank), so the train default must not be accelerate's "auto", which on a
      machine with several GPUs splits the model across all of them (and with DDP gave rank 0 a split model
      that DDP then refused);
    - ``"auto"`` in a load or generate job: accelerate's meaning, every visible GPU first and then the CPU,
      as seed 003's loads use it;
    - ``"cpu-first"``: loaded on the CPU, moved to the GPU after; ``"cpu"``: the CPU.

    Without a GPU, ``"auto"`` and ``"cpu-first"`` load on the CPU. Refuses what several ranks cannot share
    (``check_device_map``) before anything is loaded.
    """
    if world is None:
        from blipmon.runner.distributed import Dist

        world = max(Dist.from_env().world, world_size(cfg))
    check_device_map(cfg, world)
    dm = cfg["model"]["device_map"]
    if isinstance(dm, dict):
        return dict(dm), False
    if dm == "cuda":
        return {"": cuda_index}, False
    if dm == "auto":
        if not cuda:
            return None, False
        return ({"": cuda_index} if cfg["job"]["kind"] == "train" else "auto"), False
    if dm == "cpu-first":
        return None, cuda
    return None, False


def load_model(cfg: dict[str, Any], *, cuda: bool, cuda_index: int = 0) -> LoadedModel:
    """Load as configured: dtype, quantization, device map; time it."""
    from transformers import BitsAndBytesConfig

    source, weights = resolve_source(cfg)
    mcfg = cfg["model"]
    trust = bool(mcfg.get("trust_remote_code", False))
    arch = architecture(source, weights, trust)
    cls = model_class(arch)
    dtype = weights_dtype(cfg)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust}
    quant = mcfg["quantization"]
    if cfg["train"]["qlora"] and cfg["job"]["kind"] == "train" and quant == "none":
        quant = "4bit-nf4"
    if quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quant.startswith("4bit"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.split("-")[1],
            bnb_4bit_compute_dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32,
            bnb_4bit_use_double_quant=False,
        )
    dm = mcfg["device_map"]
    placed, move_after = device_map_kwarg(cfg, cuda=cuda, cuda_index=cuda_index)
    if placed is not None:
        kwargs["device_map"] = placed
    if quant != "none" and "device_map" not in kwargs:
        kwargs["device_map"] = {"": cuda_index} if cuda else {"": "cpu"}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}

    shipped = weights == "random" and not Path(source).is_dir()
    if shipped and placed_by_accelerate(dm, placed):
        # A split (an explicit table, or accelerate's "auto": GPUs first, then the CPU) exists only on
        # from_pretrained's path: load a random snapshot through it.
        source = str(random_snapshot(source, arch))
        shipped = False
    t0 = time.perf_counter()
    if shipped:
        # Real-size random weights built straight on their device, with the storages (dtypes, tied
        # heads, fp32-kept modules, bitsandbytes layers) from_pretrained would allocate.
        from blipmon.architectures.build import build_random
        from blipmon.architectures.catalog import raw_config

        on_gpu = cuda and (quant != "none" or dm in ("cuda", "auto"))
        model = build_random(
            raw_config(source) or arch,  # the raw config also says which heads the checkpoint keeps untied
            dtype=str(dtype).removeprefix("torch."),
            quantization=quant,
            compute_dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
            device=f"cuda:{cuda_index}" if on_gpu else "cpu",
        )
        if getattr(arch, "image_token_index", None) is not None:
            model.config.image_token_index = arch.image_token_index
    else:
        model = cls.from_pretrained(source, **kwargs)
    if move_after:
        model = model.to(f"cuda:{cuda_index}")
    if cuda:  # once per load, on every GPU the model landed on: the load time includes its copies
        from blipmon.runner.allocator import model_cuda_devices

        for dev in model_cuda_devices(model, default=cuda_index):
            torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    return LoadedModel(
        model=model,
        family=family_of(arch),
        seconds=seconds,
        weights=weights,
        device=input_device(model),
        source=source,
    )


def input_device(model: Any) -> torch.device:
    """Where batches go: where the module that takes the inputs (the vision tower) runs.

    A module accelerate offloaded to the host sits on the meta device; its hook's execution device (or the
    ``hf_device_map`` entry) says where it runs and so where its inputs must be (``probes.param_device``).
    """
    from blipmon.runner.probes import execution_device, param_device

    names = [n for n, _ in model.named_parameters()]
    modules = dict(model.named_modules())
    for name in names:
        if "vision_model" in name:
            dev = param_device(model, name, modules)
            if dev is not None:
                return dev
            break
    return execution_device(model) or torch.device("cpu")


def placement(model: Any) -> dict[str, int]:
    """Parameter bytes per device (unique storages), the figure seeds 000 and 001 care about.

    Parameters accelerate offloaded (on the meta device, their weights in a hook's weights map) count where
    their weights are: ``"cpu"`` for host RAM, ``"disk"`` for an offload folder; a meta parameter nothing
    holds counts under ``"meta"``. Counting meta storages instead would collapse them all into one key.
    """
    from blipmon.runner.probes import offloaded_params

    seen: set[tuple[str, int]] = set()
    out: dict[str, int] = {}
    for p in model.parameters():
        if p.device.type == "meta":
            continue
        st = p.untyped_storage()
        key = (str(p.device), st.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        out[str(p.device)] = out.get(str(p.device), 0) + st.nbytes()
    for o in offloaded_params(model):
        if o.tensor is not None:
            key = (o.where, o.tensor.untyped_storage().data_ptr())
            if key in seen:
                continue
            seen.add(key)
        out[o.where] = out.get(o.where, 0) + o.nbytes
    return out
