"""Everything refused before a child starts and a model loads (exit 2): the run's preflight.

A GPU-only configuration without a GPU, bf16 on a GPU that lacks it (from NVML's compute
capability: never ``torch.cuda`` in the parent, which would create a CUDA context there), DeepSpeed
missing, device-map modules the model does not have, a data folder that is not one. Used by
``blipmon run``, ``blipmon sweep`` (per configuration) and the dashboard before it launches anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blipmon.core.config import ConfigError
from blipmon.core.safe_text import one_line
from blipmon.runner.launch import multi_node_env


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def needs_gpu(cfg: dict[str, Any]) -> str | None:
    """Why this configuration cannot run without a GPU, or None."""
    m = cfg["model"]
    dm = m["device_map"]
    if dm == "cuda":
        return "model.device_map = 'cuda'"
    if isinstance(dm, dict):
        gpu = [k for k, v in dm.items() if isinstance(v, int) or (isinstance(v, str) and v.startswith("cuda"))]
        if gpu:
            return f"model.device_map puts {', '.join(gpu)} on a GPU"
    return None


def preflight(cfg: dict[str, Any], *, cuda: bool | None = None, bf16: bool | None = None) -> None:
    """Everything that can be refused before a child starts and a model loads (exit 2)."""
    # First: a map transformers or accelerate refuses is wrong on any machine, so it is said before what a machine
    # lacks (no GPU here), not after.
    check_map_loadable(cfg)
    t = cfg["train"]
    is_train = cfg["job"]["kind"] == "train"
    unavailable: list[str] = []
    if is_train and (t["strategy"] == "deepspeed_stage_2_offload" or t["optim"] == "deepspeed_cpu"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                "train.strategy = 'deepspeed_stage_2_offload' needs DeepSpeed, which is not installed: "
                "pip install 'blipmon[deepspeed]'"
            )
        if t["devices"] > 1:
            unavailable.append(
                "DeepSpeed ZeRO-2 offload with train.devices > 1 (one rank offloads; use ddp for several)"
            )
    if t["num_nodes"] > 1:
        if cfg["job"]["kind"] != "train":
            unavailable.append(f"train.num_nodes = {t['num_nodes']} for a {cfg['job']['kind']} job")
        else:
            multi_node_env(cfg)
    if t["devices"] > 1 and cfg["job"]["kind"] != "train":
        unavailable.append(f"train.devices = {t['devices']} for a {cfg['job']['kind']} job (several ranks train only)")
    if unavailable:
        raise ConfigError(
            "not available in this version of blipmon yet: "
            + "; ".join(unavailable)
            + ". The preset validates and is listed so you can see it; run the others meanwhile."
        )
    reason = needs_gpu(cfg)
    if reason:
        has_cuda = cuda_available() if cuda is None else cuda
        if not has_cuda:
            raise ConfigError(
                f"this configuration needs an NVIDIA GPU ({reason}), and none is available here. "
                "To run it on the CPU instead: --set model.device_map=cpu"
            )
    _check_model_source(cfg)
    _check_bf16(cfg, cuda, bf16)
    if isinstance(cfg["model"]["device_map"], dict):
        _check_device_map_modules(cfg)
    if is_train and cfg["data"]["source"] != "synthetic":
        from blipmon.runner.data import read_metadata

        try:
            read_metadata(Path(cfg["data"]["source"]))
        except ValueError as e:
            raise ConfigError(str(e)) from None


HOST_DEVICES = ("cpu", "disk")  # where a device-map table keeps modules off every GPU


def _is_host(device: Any) -> bool:
    return isinstance(device, str) and device in HOST_DEVICES


def _entries(dm: dict[str, Any], keys: list[str]) -> str:
    """``vision_model = 'cpu', '' = 'cpu'``: table entries as the user wrote them, printable, on one line."""
    shown = ", ".join(f"{k if k else repr(k)} = {dm[k]!r}" for k in keys[:6])
    more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
    return one_line(shown) + more


def load_quantization(cfg: dict[str, Any]) -> str:
    """The quantization the model is loaded with: ``model.quantization``, or 4-bit NF4 for a QLoRA train job.

    Mirrors ``runner.models.load_model``, which loads a QLoRA base model in 4-bit NF4 when no other is set.
    """
    quant = str(cfg["model"]["quantization"])
    if quant == "none" and cfg["job"]["kind"] == "train" and cfg["train"]["qlora"]:
        return "4bit-nf4"
    return quant


def check_map_loadable(cfg: dict[str, Any]) -> None:
    """Refuse a device-map table that transformers or accelerate refuses, before anything loads (exit 2).

    - 8-bit and 4-bit loads (``model.quantization``, or ``train.qlora``): transformers'
      ``Bnb8BitHfQuantizer``/``Bnb4BitHfQuantizer.validate_environment`` raise "Some modules are dispatched on the
      CPU or the disk" for a table whose values are not all ``"cpu"`` but include ``"cpu"`` or ``"disk"``, unless
      ``llm_int8_enable_fp32_cpu_offload`` is set, which blipmon does not set. Checked as transformers checks it, on
      the table as written (``runner.models.device_map_kwarg`` passes it unchanged).
    - A table whose ``""`` entry is ``"cpu"`` (or ``"disk"``) beside a GPU entry: accelerate's offloading hooks for
      the ``""`` entry set every tensor of the model to the meta device, and the GPU entry's hook then fails to move
      them ("weight is on the meta device").

    Both used to load the whole model (minutes for a real one) and then exit 1; the estimator refuses the same maps
    (``estimate.load``, the JSON's ``refused``).
    """
    dm = cfg["model"]["device_map"]
    if not isinstance(dm, dict) or not dm:
        return
    keys = [str(k) for k in dm]
    table = {str(k): v for k, v in dm.items()}
    host = [k for k in keys if _is_host(table[k])]
    gpu = [k for k in keys if not _is_host(table[k])]
    quant = load_quantization(cfg)
    if quant != "none" and host and gpu:
        if quant == cfg["model"]["quantization"]:
            which, instead = f"model.quantization = {quant!r}", "load unquantized (model.quantization = 'none')"
        else:
            which, instead = (
                f"train.qlora = true (the base model in {quant})",
                "train without QLoRA (train.qlora = false)",
            )
        bits = "8-bit" if quant == "8bit" else "4-bit"
        raise ConfigError(
            f"model.device_map puts {_entries(table, host)} on the host beside a GPU ({_entries(table, gpu)}), with "
            f"{which}: transformers refuses {bits} modules dispatched on the CPU or the disk before loading "
            "(bitsandbytes: 'Some modules are dispatched on the CPU or the disk'; blipmon does not set "
            f"llm_int8_enable_fp32_cpu_offload). Map every module to a GPU, every module to 'cpu', or {instead}"
        )
    if "" in table and _is_host(table[""]) and gpu:
        raise ConfigError(
            f"model.device_map[''] = {table['']!r} beside GPU entries ({_entries(table, gpu)}): accelerate offloads "
            "the whole model for the '' entry, and then cannot move the GPU modules' weights to the GPU (ValueError: "
            "'weight is on the meta device'). Name the modules that go to the host instead of '' "
            "(e.g. {vision_model = 'cpu', qformer = 'cpu', ...})"
        )


def _check_model_source(cfg: dict[str, Any]) -> None:
    from blipmon.core.presets import TINY_MODELS

    mid = cfg["model"]["id"]
    if mid in TINY_MODELS or mid.startswith("tiny/"):
        if mid not in TINY_MODELS:
            raise ConfigError(f"model.id = {mid!r}: no such tiny model; expected one of {', '.join(TINY_MODELS)}")
        return
    if Path(mid).exists():
        if not (Path(mid) / "config.json").is_file():
            raise ConfigError(f"model.id = {mid!r}: a local path without config.json")
        return
    # A hub id: transformers resolves it (from the cache, or the network where there is one).


def _check_bf16(cfg: dict[str, Any], cuda: bool | None, bf16: bool | None) -> None:
    """bfloat16 on a GPU that has none (before Ampere) fails deep inside the first step: refuse it here.

    The GPU's compute capability comes from NVML, never from ``torch.cuda``: ``is_bf16_supported()``
    now counts emulation (True on a T4 or V100), and any such call creates a CUDA context in this
    parent, on GPU 0, held for the whole run (and by the dashboard, which runs this preflight too).
    """
    # A train job's weights follow train.precision (model.dtype is for load and generate jobs only).
    if cfg["job"]["kind"] == "train":
        wants = cfg["train"]["precision"].startswith("bf16")
    else:
        wants = cfg["model"]["dtype"] == "bfloat16"
    if not wants or cfg["model"]["device_map"] == "cpu":
        return
    detail = "this GPU has no bfloat16 support"
    if cuda is None and bf16 is None:
        if not cuda_available():
            return  # bfloat16 runs on the CPU
        check = bf16_capability(target_cuda_indices(cfg))
        if check.supported is not False:
            return  # supported, or NVML cannot say (the child then finds out on its own)
        bf16, detail = False, check.reason
    elif cuda is False:
        return
    if bf16 is False:
        raise ConfigError(
            f"train.precision = {cfg['train']['precision']!r} / model.dtype = {cfg['model']['dtype']!r}: {detail}; "
            "use '16-mixed' (fp16 with a gradient scaler) or '32-true'"
        )


BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bfloat16 arithmetic of their own


@dataclass(frozen=True)
class Bf16Check:
    """Whether the GPUs a run will use have bfloat16 (``None``: cannot tell), and why, in the user's terms."""

    supported: bool | None
    reason: str


def target_cuda_indices(cfg: dict[str, Any]) -> list[int] | None:
    """The torch CUDA indices a run will use (``None``: every visible GPU, as a load job's ``"auto"`` may).

    Mirrors ``runner.models.load_model``: one process loads onto its own device (torch index 0, or
    the local rank under torchrun; a train job's ``"auto"`` means that too), an explicit map onto the
    indices it names, a load or generate job's ``"auto"`` onto every visible GPU.
    """
    t = cfg["train"]
    if cfg["job"]["kind"] == "train" and t["strategy"] == "ddp" and t["devices"] > 1:
        return list(range(t["devices"]))
    dm = cfg["model"]["device_map"]
    if isinstance(dm, dict):
        found: set[int] = set()
        for where in dm.values():
            if isinstance(where, int) and not isinstance(where, bool):
                found.add(where)
            elif isinstance(where, str) and (where == "cuda" or where.startswith("cuda:")):
                found.add(int(where[5:]) if where[5:].isdigit() else 0)
        return sorted(found)
    if dm == "auto" and cfg["job"]["kind"] != "train":
        return None  # accelerate's "auto": every visible GPU, then the CPU
    return [0]  # "auto" in a train job is the process's own GPU, as "cuda" is


def bf16_capability(
    targets: list[int] | None, *, nvml: Any = None, environ: Mapping[str, str] | None = None
) -> Bf16Check:
    """Compute capability of the GPUs ``targets`` (torch indices) name, read from NVML without touching CUDA.

    NVML numbers GPUs in PCI bus order and ignores ``CUDA_VISIBLE_DEVICES``; torch index ``i`` is the
    ``i``-th entry of that variable (a number, a ``GPU-``/``MIG-`` UUID or a prefix of one), and a
    number is an NVML index only under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (CUDA's default order is
    "fastest first", which NVML cannot reproduce). A GPU whose identity is not known that way could be
    any of the host's others: the answer is still certain when they all agree, else it is ``None``
    and nothing is refused. ``nvml`` and ``environ`` replace ``pynvml`` and ``os.environ`` in tests.
    """
    env = os.environ if environ is None else environ
    try:
        if nvml is None:
            import pynvml as nvml  # type: ignore[no-redef]
        nvml.nvmlInit()
    except Exception as e:  # no driver, no library: say nothing rather than guess
        return Bf16Check(None, f"NVML unavailable ({type(e).__name__})")
    try:
        gpus: list[_Gpu] = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            gpus.append(_Gpu(i, _text(nvml.nvmlDeviceGetName(h)), _text(nvml.nvmlDeviceGetUUID(h)), h))
        visible = _visible_gpus(gpus, env, nvml)
        if visible is None:
            return Bf16Check(None, "CUDA_VISIBLE_DEVICES names a GPU NVML does not list")
        wanted = range(len(visible)) if targets is None else targets
        if any(t >= len(visible) for t in wanted):
            return Bf16Check(None, "the run names more GPUs than are visible")
        named = {id(g) for g in visible if g is not None}
        unknown = [g for g in gpus if id(g) not in named]  # what a position CUDA orders itself could be
        chosen: list[_Gpu] = []
        for t in wanted:
            chosen.extend([visible[t]] if visible[t] is not None else unknown)  # type: ignore[list-item]
        known = {id(g) for t in wanted if (g := visible[t]) is not None}
        caps = {id(g): tuple(nvml.nvmlDeviceGetCudaComputeCapability(g.handle)) for g in chosen}
    except Exception as e:  # one NVML error (a MIG parent without permission, a driver mismatch)
        return Bf16Check(None, f"NVML could not say ({type(e).__name__}: {e})")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down is best effort
            pass
    if not chosen:
        return Bf16Check(None, "no GPU visible")
    lacking = [g for g in chosen if caps[id(g)] < BF16_MIN_CAPABILITY]
    if not lacking:
        return Bf16Check(True, "every GPU the run uses has compute capability 8.0 or more")
    certain = [g for g in lacking if id(g) in known]
    if not certain and len(lacking) < len(chosen):
        return Bf16Check(None, "the GPUs CUDA may pick differ, and CUDA's order is not known without CUDA")
    g = (certain or lacking)[0]
    major, minor = caps[id(g)]
    where = f"NVML GPU {g.index}, " if g.index >= 0 else ""
    return Bf16Check(
        False,
        f"{one_line(g.name)} ({where}compute capability {major}.{minor}) has no bfloat16 support "
        f"(it needs {BF16_MIN_CAPABILITY[0]}.{BF16_MIN_CAPABILITY[1]}, Ampere or newer)",
    )


@dataclass(frozen=True, eq=False)
class _Gpu:
    index: int  # NVML's index (PCI bus order); -1 for a MIG instance named by its UUID
    name: str
    uuid: str
    handle: Any


def _visible_gpus(gpus: list[_Gpu], env: Mapping[str, str], nvml: Any) -> list[_Gpu | None] | None:
    """Torch's GPUs in torch's order: each one NVML identifies, or ``None`` where CUDA's own order decides.

    ``None`` as a whole when a UUID names no GPU (or several): then nothing is certain.
    """
    pci_order = env.get("CUDA_DEVICE_ORDER", "") == "PCI_BUS_ID"
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return list(gpus) if pci_order else [None] * len(gpus)
    out: list[_Gpu | None] = []
    for entry in (e.strip() for e in raw.split(",")):
        if entry.isdigit():
            if int(entry) >= len(gpus):
                break  # CUDA stops at the first entry that names no device
            out.append(gpus[int(entry)] if pci_order else None)
        elif entry.startswith("MIG-"):
            try:
                h = nvml.nvmlDeviceGetHandleByUUID(entry)
            except Exception:  # noqa: BLE001 - an unknown MIG instance: CUDA stops there too
                break
            out.append(_Gpu(-1, f"MIG instance {entry}", entry, h))
        elif entry.startswith("GPU-"):
            match = [g for g in gpus if g.uuid.startswith(entry)]
            if len(match) != 1:
                return None
            out.append(match[0])
        else:
            break
    return out


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _check_device_map_modules(cfg: dict[str, Any]) -> None:
    """Every module an explicit device map names must exist in the model (checked on the meta device)."""
    from blipmon.architectures.catalog import meta_model
    from blipmon.runner.models import architecture, resolve_source

    source, weights = resolve_source(cfg)
    try:
        arch = architecture(source, weights, bool(cfg["model"]["trust_remote_code"]))
    except Exception:  # the architecture is not available offline: transformers will say so at load time
        return
    model = meta_model(arch)
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    missing = [k for k in cfg["model"]["device_map"] if k not in names and k != ""]
    if missing:
        top = sorted({n.split(".")[0] for n in names if n})
        raise ConfigError(
            f"model.device_map names {', '.join(map(repr, missing))}, which {cfg['model']['id']} does not have; "
            f"its top-level modules are: {', '.join(top)}"
        )
