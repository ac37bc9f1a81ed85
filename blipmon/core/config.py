"""Run configuration: the TOML schema (docs/configuration.md, generated from ``SCHEMA``), ``--set`` overrides and validation.

Validation happens in the parent, before a child is started or a model is touched, so a typo
costs the user a second instead of a ten-minute load. Every error names the dotted key, the
value it got and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blipmon.core.errors import ConfigError
from blipmon.core.layout import CONFIG, EVENTS

PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-mixed")
OPTIMIZERS = ("adamw", "sgd", "adam_8bit", "paged_adamw_8bit", "deepspeed_cpu")
STRATEGIES = ("auto", "deepspeed_stage_2_offload", "ddp")
QUANTIZATIONS = ("none", "8bit", "4bit-nf4", "4bit-fp4")
WEIGHTS = ("pretrained", "random", "auto")
JOB_KINDS = ("train", "load", "generate")
DEVICE_MAP_NAMES = ("cuda", "cpu", "auto", "cpu-first")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Field:
    """One allowed key: its type(s), default and constraint, used for messages as well as checks.

    Every number has both bounds: an absurd value (``batch_size = 10**12``, ``sample_hz = 1e-300``) is refused
    here in a second, instead of costing minutes and gigabytes before failing somewhere deep in the run. ``why``
    says where a bound comes from; the refusal shows it and docs/configuration.md repeats it.
    """

    types: tuple[type, ...]
    default: Any
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    exclusive_minimum: bool = False
    maximum: float | None = None
    exclusive_maximum: bool = False
    help: str = ""
    why: str = ""
    allowed_text: str | None = None  # what is allowed, when the bounds alone do not say it (max_steps' -1)
    excluded: tuple[float, ...] = ()  # values inside the bounds that mean nothing (max_steps = 0)

    def allowed(self) -> str:
        if self.allowed_text is not None:
            return self.allowed_text
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        names = "a number" if float in self.types else " or ".join(_type_name(t) for t in self.types)
        parts = []
        if self.minimum is not None:
            parts.append(f"{'>' if self.exclusive_minimum else '>='} {_fmt_num(self.minimum)}")
        if self.maximum is not None:
            parts.append(f"{'<' if self.exclusive_maximum else '<='} {_fmt_num(self.maximum)}")
        return f"{names} {' and '.join(parts)}" if parts else names

    def out_of_range(self, value: float) -> bool:
        """True when ``value`` (a finite number) lies outside the bounds."""
        if value in self.excluded:
            return True
        if self.minimum is not None and (value <= self.minimum if self.exclusive_minimum else value < self.minimum):
            return True
        return self.maximum is not None and (value >= self.maximum if self.exclusive_maximum else value > self.maximum)


def _type_name(t: type) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a table"}.get(
        t, t.__name__
    )


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else str(x)


# Upper bounds. Each is far above any real use and far below what breaks something; the reason is in ``why``.
MAX_BATCH = 65_536  # per device: 65,536 224x224 fp32 images are 37 GiB of input alone, before any activation
MAX_ACCUMULATE = 65_536  # micro-batches per optimizer step; more only folds whole epochs into one step
MAX_EPOCHS = 100_000
MAX_STEPS = 10_000_000  # optimizer steps: weeks of training at 10 steps/s
MAX_SAMPLES = 100_000_000  # under DDP every rank's DistributedSampler lists all indices: ~4 GB of host RAM at 1e8
MAX_WORKERS = 256  # DataLoader worker processes: the core count of the largest two-socket servers
MAX_LR = 10.0  # no optimizer here trains with a larger step; SGD recipes stay below 1
MIN_LR = 1e-10  # Adam moves a weight by about lr per step: below ~1e-10 an fp32 weight of 0.01 cannot change
MAX_LORA_R = 4096  # a rank above the adapted layer's width adds nothing; the widest hidden size shipped is 4096
MAX_LORA_ALPHA = 65_536.0  # alpha / r scales the adapter's output; 65,536 / 16 = 4096x is already absurd
MAX_TOKENS = 8192  # text positions per sample; OPT's positions stop at 2048, the lab's captions take 50
MAX_DEVICES = 64  # ranks per machine: the biggest GPU servers hold 16; CPU (gloo) ranks are processes
MAX_NODES = 1024  # machines; 64 x 1024 = 65,536 ranks
MAX_SEED = 2**32 - 1  # the range every seeding API accepts (numpy, Lightning's seed_everything)
GPU_INDEX_MAX = MAX_DEVICES - 1  # the largest GPU index a device_map may name
# The timeline's rate. At most 100 Hz: peaks come from the allocator per phase, not from the timeline, so a faster
# timeline finds nothing new, while each sample takes the training process's Python time (12 us measured on a CPU,
# more with NVML's queries on a GPU; at 1e9 Hz the job ran at half speed) and a line of events.jsonl (the 1,000,000
# samples the dashboard opens in a second are 2.8 hours at 100 Hz). At least 0.1 Hz: a sample every 10 s is six
# points a minute already, and a slower rate left `watch` sleeping for days after its command had ended.
MIN_SAMPLE_HZ = 0.1
MAX_SAMPLE_HZ = 100.0

# The schema: dotted key -> Field. Order here is the order shown in the dashboard and docs.
SCHEMA: dict[str, Field] = {
    "name": Field((str,), "unnamed"),
    "description": Field((str,), ""),
    "model.id": Field((str,), "tiny/blip2-opt", help="hub id, local path, or tiny/<name>"),
    "model.weights": Field((str,), "auto", WEIGHTS),
    "model.dtype": Field((str,), "float32", DTYPES),
    "model.quantization": Field((str,), "none", QUANTIZATIONS),
    "model.device_map": Field((str, dict), "auto", help="cuda | cpu | auto | cpu-first | {module = device}"),
    "model.trust_remote_code": Field((bool,), False),
    "job.kind": Field((str,), "train", JOB_KINDS),
    "train.batch_size": Field(
        (int,), 8, minimum=1, maximum=MAX_BATCH, why="per device; 65536 images of 224x224 are 37 GiB of input alone"
    ),
    "train.accumulate_grad_batches": Field((int,), 1, minimum=1, maximum=MAX_ACCUMULATE),
    "train.precision": Field((str,), "32-true", PRECISIONS),
    "train.optim": Field((str,), "adamw", OPTIMIZERS),
    "train.lr": Field(
        (float, int), 5e-6, minimum=MIN_LR, maximum=MAX_LR, why="no optimizer here trains with a larger step"
    ),
    "train.act_ckpt": Field((bool,), False),
    "train.max_epochs": Field((int,), 2, minimum=1, maximum=MAX_EPOCHS),
    "train.max_steps": Field(
        (int,),
        -1,
        minimum=-1,
        maximum=MAX_STEPS,
        excluded=(0,),
        allowed_text=f"-1 (no limit) or a positive number of optimizer steps (an integer >= -1 and <= {MAX_STEPS}, not 0)",
    ),
    "train.num_train_samples": Field(
        (int,),
        512,
        minimum=1,
        maximum=MAX_SAMPLES,
        why="under DDP each rank lists every index of the data set in host RAM",
    ),
    "train.num_workers": Field((int,), 0, minimum=0, maximum=MAX_WORKERS, why="each worker is a process"),
    "train.strategy": Field((str,), "auto", STRATEGIES),
    "train.devices": Field((int,), 1, minimum=1, maximum=MAX_DEVICES, help="ranks (GPUs or CPU processes) per machine"),
    "train.num_nodes": Field(
        (int,),
        1,
        minimum=1,
        maximum=MAX_NODES,
        help="machines; each runs `blipmon run` with NODE_RANK set",
    ),
    "train.lora.enabled": Field((bool,), False),
    "train.lora.r": Field(
        (int,), 16, minimum=1, maximum=MAX_LORA_R, why="a rank above the adapted layer's width adds nothing"
    ),
    "train.lora.alpha": Field((int, float), 32, minimum=0, exclusive_minimum=True, maximum=MAX_LORA_ALPHA),
    "train.lora.dropout": Field(
        (float, int), 0.05, minimum=0, maximum=1, exclusive_maximum=True, allowed_text="a number in [0, 1)"
    ),
    "train.lora.target_modules": Field((list,), [], help="module names; empty = per-architecture default"),
    "train.qlora": Field((bool,), False),
    "data.source": Field((str,), "synthetic"),
    "data.max_length": Field((int,), 50, minimum=1, maximum=MAX_TOKENS, why="text positions per sample"),
    "data.caption_tokens": Field(
        (int,),
        0,
        minimum=0,
        maximum=MAX_TOKENS,
        help="synthetic caption length; 0 = every caption fills max_length (the worst case)",
    ),
    "data.image_placeholders": Field(
        (bool,),
        True,
        help="BLIP-2: image tokens before each caption, as the processor puts them; false = the caption alone, "
        "as the seed lab tokenizes it (the language model then sees only the caption)",
    ),
    "runtime.alloc_conf": Field((str,), ""),
    "runtime.sample_hz": Field(
        (float, int),
        10.0,
        minimum=MIN_SAMPLE_HZ,
        maximum=MAX_SAMPLE_HZ,
        why="peaks come from the allocator, not the timeline; faster sampling only slows the job",
    ),
    "runtime.probes": Field((bool,), True, help="per-phase attribution; off only to measure its cost"),
    "runtime.predict": Field((bool,), True, help="save the memory estimate when the run starts"),
    "runtime.seed": Field((int,), 0, minimum=0, maximum=MAX_SEED),
}

# Tables that exist as prefixes of dotted keys (for "unknown key" detection).
_TABLES = {k.rsplit(".", 1)[0] for k in SCHEMA if "." in k}
_TABLES |= {t.rsplit(".", 1)[0] for t in list(_TABLES) if "." in t}


def defaults() -> dict[str, Any]:
    """The nested default configuration."""
    out: dict[str, Any] = {}
    for key, f in SCHEMA.items():
        _set_nested(out, key, copy.deepcopy(f.default))
    return out


def _set_nested(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[:-1])}: expected a table, got {nxt!r}")
        d = nxt
    d[parts[-1]] = value


def get(cfg: Mapping[str, Any], dotted: str) -> Any:
    """Read a dotted key from a nested configuration."""
    cur: Any = cfg
    for p in dotted.split("."):
        cur = cur[p]
    return cur


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        # model.device_map is a value that may itself be a table: never descend into it. Unknown
        # tables are descended into too, so a typo in a table name ([trian]) is reported with the
        # full dotted key and a suggestion for it (trian.batch_size -> train.batch_size).
        if isinstance(v, dict) and key not in SCHEMA and (v or key in _TABLES):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, [*SCHEMA, *sorted(_TABLES)], n=1, cutoff=0.6)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in SCHEMA if k.rsplit(".", 1)[-1] == leaf][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _example_key(table: str) -> str:
    return next(k for k in SCHEMA if k.startswith(table + "."))


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``; tables merge, values replace."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict) and k != "device_map":
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def validate(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Check every key and value; return the full configuration with defaults filled in.

    All problems are reported at once so the user fixes them in one edit.
    """
    errors: list[str] = []
    for key, value in _flatten(raw):
        if key in _TABLES and key not in SCHEMA:
            errors.append(f"{key} = {value!r}: expected a table (e.g. {_example_key(key)} = ...)")
            continue
        if key not in SCHEMA:
            errors.append(f"unknown key {key!r}{_suggest(key)}")
            continue
        msg = _check_value(key, SCHEMA[key], value)
        if msg:
            errors.append(msg)
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    full = merge(defaults(), raw)
    _normalise(full)
    errors = list(_check_combinations(full))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return full


def _check_value(key: str, f: Field, value: Any) -> str | None:
    ok_type = isinstance(value, f.types) and not (isinstance(value, bool) and bool not in f.types)
    if not ok_type:
        return f"{key} = {_show(value)}: expected {f.allowed()}"
    if f.choices is not None and value not in f.choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in f.choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{key} = {value!r}: expected {f.allowed()}{hint}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        msg = check_number(key, value, f)
        if msg:
            return msg
    if key == "model.device_map":
        return _check_device_map(value)
    if key == "train.lora.target_modules" and not all(isinstance(x, str) and x for x in value):
        return f"{key} = {value!r}: expected a list of module names"
    if key == "name" and not _NAME_RE.fullmatch(value):
        return f"name = {value!r}: expected letters, digits and - _ . / (no '..', not starting with '/')"
    return None


def check_number(label: str, value: float, f: Field) -> str | None:
    """Why ``value`` is not allowed for ``f`` (``None`` if it is): NaN and infinities, then the bounds.

    ``label`` names it in the message: a dotted key, or a command-line flag (``--sample-hz``) checked against
    the key it stands for, so both say the same thing.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return f"{label} = {_show(value)}: expected a finite number, {f.allowed()}"
    if f.out_of_range(value):
        why = f" ({f.why})" if f.why and f.maximum is not None and value > f.maximum else ""
        return f"{label} = {_show(value)}: expected {f.allowed()}{why}"
    return None


def _show(value: Any) -> str:
    """A value as the user wrote it, shortened: a 10,000-digit integer is not repeated whole."""
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's 4300-digit conversion limit
        return f"an integer of {value.bit_length()} bits"
    if len(text) <= 40:
        return text
    return f"{text[:20]}...{text[-10:]} ({len(value) if isinstance(value, str) else len(text)} characters)"


_NAME_RE = re.compile(r"(?!/)(?!.*\.\.)[A-Za-z0-9_.\-/ ]{1,120}")
_DEVICE_RE = re.compile(r"cpu|disk|(?:cuda:)?(\d+)|cuda")

# Why a device_map may not name "disk": accelerate offloads such modules to files through an offload folder that
# blipmon never creates, and a model built on the meta device (random weights, the estimator) has no values to
# write, so the load dies with "Cannot copy out of meta tensor" after minutes. Refused before anything loads.
DISK_OFFLOAD_REFUSED = (
    "disk offload is not supported: the load would fail (accelerate needs weights to write to an offload folder, "
    "and a random-weight model has none); put it on 'cpu' to keep it in host RAM"
)


def _device_map_key(mod: str) -> str:
    """``model.device_map.vision_model``; the whole-model key ``""`` (and any odd name) in brackets."""
    return f"model.device_map.{mod}" if re.fullmatch(r"[A-Za-z0-9_.\-]+", mod) else f"model.device_map[{mod!r}]"


def _check_device_map(value: Any) -> str | None:
    if isinstance(value, str):
        if value not in DEVICE_MAP_NAMES:
            return f"model.device_map = {value!r}: expected one of {', '.join(map(repr, DEVICE_MAP_NAMES))} or a table"
        return None
    if not value:
        return "model.device_map = {}: expected at least one module"
    for mod, dev in value.items():
        key = _device_map_key(str(mod))
        if dev == "disk":
            return f"{key} = 'disk': {DISK_OFFLOAD_REFUSED}"
        m = _DEVICE_RE.fullmatch(dev) if isinstance(dev, str) else None
        if isinstance(dev, bool) or not (isinstance(dev, int) or m):
            return f"{key} = {_show(dev)}: expected a GPU index (0), 'cuda:N' or 'cpu'"
        index = dev if isinstance(dev, int) else int(m.group(1)) if m and m.group(1) else 0
        if not 0 <= index <= GPU_INDEX_MAX:
            return f"{key} = {_show(dev)}: expected a GPU index in [0, {GPU_INDEX_MAX}]"
    return None


def _normalise(cfg: dict[str, Any]) -> None:
    cfg["train"]["lr"] = float(cfg["train"]["lr"])
    cfg["train"]["lora"]["alpha"] = float(cfg["train"]["lora"]["alpha"])
    cfg["train"]["lora"]["dropout"] = float(cfg["train"]["lora"]["dropout"])
    cfg["runtime"]["sample_hz"] = float(cfg["runtime"]["sample_hz"])


def _check_combinations(cfg: Mapping[str, Any]) -> Iterable[str]:
    t, m = cfg["train"], cfg["model"]
    if t["qlora"] and m["quantization"] == "8bit":
        yield "train.qlora = true with model.quantization = '8bit': QLoRA loads the base model in 4-bit; use 'none' or '4bit-nf4'"
    if t["optim"] == "deepspeed_cpu" and t["strategy"] != "deepspeed_stage_2_offload":
        yield "train.optim = 'deepspeed_cpu' needs train.strategy = 'deepspeed_stage_2_offload'"
    if t["strategy"] == "deepspeed_stage_2_offload" and t["optim"] not in ("deepspeed_cpu", "adamw"):
        yield f"train.strategy = 'deepspeed_stage_2_offload' with train.optim = {t['optim']!r}: use 'deepspeed_cpu'"
    if cfg["job"]["kind"] == "train" and m["quantization"] != "none" and not (t["lora"]["enabled"] or t["qlora"]):
        yield (
            f"model.quantization = {m['quantization']!r} with a full fine-tune: quantized weights cannot be trained; "
            "enable train.lora.enabled or train.qlora, or use job.kind = 'load'"
        )
    if t["devices"] > 1 and t["strategy"] == "auto":
        yield f"train.devices = {t['devices']}: several ranks need train.strategy = 'ddp'"
    if t["num_nodes"] > 1 and t["strategy"] != "ddp":
        yield f"train.num_nodes = {t['num_nodes']}: several machines need train.strategy = 'ddp'"
    msg = _batch_larger_than_data(cfg)
    if msg:
        yield msg


def _batch_larger_than_data(cfg: Mapping[str, Any]) -> str | None:
    """A training batch cannot hold more samples than a rank's share of the data set: refused, not clamped.

    Clamping would profile a smaller batch than the one asked for while the configuration (and the dashboard)
    still named the big one: the run said "batch 1000000000000" while every batch held 96 samples. Each of the
    ``devices x num_nodes`` ranks gets ceil(num_train_samples / ranks) samples (DistributedSampler pads the
    last share), which is the largest batch that exists.
    """
    t = cfg["train"]
    if cfg["job"]["kind"] != "train":
        return None  # load jobs use no batch; generate makes its own (batch_size x 3 images)
    ranks = t["devices"] * t["num_nodes"]
    per_rank = -(-t["num_train_samples"] // ranks)
    if t["batch_size"] <= per_rank:
        return None
    share = (
        f"train.num_train_samples = {t['num_train_samples']} gives each of the {ranks} ranks {per_rank}"
        if ranks > 1
        else f"train.num_train_samples = {t['num_train_samples']}"
    )
    return (
        f"train.batch_size = {t['batch_size']} is larger than the data set ({share}): "
        f"use train.batch_size <= {per_rank} or raise train.num_train_samples to at least {t['batch_size'] * ranks}"
    )


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """Turn ``--set K=V`` strings into a nested override; V is read as a TOML value, else a string."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.batch_size=16")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: the key is empty")
        _set_nested(out, key, _parse_value(text.strip()))
    return out


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except ValueError:  # not TOML (a TOMLDecodeError), or an integer past Python's 4300-digit limit
        return text


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML configuration file; syntax errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file or preset") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    except ValueError as e:  # an integer past Python's 4300-digit conversion limit
        raise ConfigError(f"{path}: cannot read a value: {e}") from None
    data.setdefault("name", _name_from_stem(path.stem))
    return data


def _name_from_stem(stem: str) -> str:
    """A file's stem as a valid ``name`` (``exp (v2).toml`` -> ``exp-v2``), so an unnamed file never fails on it."""
    name = re.sub(r"[^A-Za-z0-9_.\- ]+", "-", stem)
    name = re.sub(r"\.{2,}", ".", name).strip(" -.")[:120]
    return name or "unnamed"


def resolve(source: str, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Preset name, TOML path or saved run directory plus ``--set`` overrides -> validated configuration.

    A run directory stands for the configuration it ran ("this again, with a bigger batch"): its
    ``config.json`` is read as data, validated like any file.
    """
    from blipmon.core import presets

    path = Path(source)
    if presets.exists(source):
        raw = presets.get(source)
    elif is_run_dir(path):
        raw = load_run_config(path)
    elif source.endswith(".toml") or path.is_file():
        raw = load_toml(path)
    else:
        close = difflib.get_close_matches(source, presets.names(), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See `blipmon presets`."
        raise ConfigError(f"{source!r} is neither a preset, a TOML file nor a run directory.{hint}")
    sets = parse_set(overrides)
    full = validate(merge(raw, sets))
    # A saved run's config.json always spells out device_map (the default filled in), so only an explicit
    # --set counts there; a preset or a TOML file says "auto" only when its author chose it.
    explicit = sets if is_run_dir(path) and not presets.exists(source) else merge(raw, sets)
    msg = _explicit_auto_with_ranks(explicit, full)
    if msg:
        raise ConfigError("invalid configuration:\n  " + msg)
    return full


def _explicit_auto_with_ranks(explicit: Mapping[str, Any], full: Mapping[str, Any]) -> str | None:
    """``device_map = "auto"`` written by the user, in a job of several training ranks: refused.

    Left unset, a training job's "auto" (the default) means each process's own GPU. Written out, it means
    accelerate's placement (GPUs first, then the CPU), which may split the model across GPUs, and DDP
    refuses a module spread over several devices, on every rank but the last to find out.
    """
    model = explicit.get("model")
    if not isinstance(model, Mapping) or model.get("device_map") != "auto":
        return None
    t = full["train"]
    if full["job"]["kind"] != "train" or (t["strategy"] != "ddp" and t["devices"] * t["num_nodes"] == 1):
        return None
    return (
        "model.device_map = 'auto' with several training ranks (train.strategy = 'ddp'): accelerate's 'auto' may "
        "split the model across GPUs, which DDP refuses; leave model.device_map unset (each rank uses its own "
        "GPU) or set 'cuda'"
    )


def is_run_dir(path: Path) -> bool:
    """A blipmon run (its configuration and events), not just any folder with a config.json (a model's, say)."""
    return path.is_dir() and (path / CONFIG).is_file() and (path / EVENTS).is_file()


def load_run_config(run_dir: Path) -> dict[str, Any]:
    """The configuration a saved run ran with, its name included (a new run gets its own directory)."""
    f = run_dir / CONFIG
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{f}: cannot read the run's configuration: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{f}: not a configuration object")
    return data


def to_toml(cfg: Mapping[str, Any]) -> str:
    """Render a configuration as TOML so a user can save and edit what the dashboard shows."""
    lines: list[str] = []
    scalars = {k: v for k, v in cfg.items() if not isinstance(v, dict)}
    for k, v in scalars.items():
        lines.append(f"{k} = {toml_value(v)}")
    for table, body in cfg.items():
        if not isinstance(body, dict):
            continue
        lines.append(f"\n[{table}]")
        for k, v in body.items():
            lines.append(f"{k} = {toml_value(v)}")
    return "\n".join(lines) + "\n"


def toml_value(v: Any) -> str:
    """One value as TOML writes it (what the dashboard's settings show, and what ``to_toml`` writes)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # JSON's string escapes (\n, \t, \uXXXX, ...) are all valid in a TOML basic string; DEL is
        # the one character TOML forbids raw that JSON leaves alone.
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else toml_value(k)


def caption_tokens(cfg: dict[str, Any]) -> int:
    """Tokens in each synthetic caption: ``data.caption_tokens`` up to ``max_length``, or ``max_length`` itself.

    The seed lab's tokenizer pads each batch to its longest caption (``padding=True``), so its
    batches are shorter than ``max_length`` unless a caption reaches it. ``caption_tokens`` models
    that longest caption; 0 keeps the worst case, every caption ``max_length`` long.
    """
    d = cfg["data"]
    return min(d.get("caption_tokens") or d["max_length"], d["max_length"])
