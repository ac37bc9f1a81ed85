"""Run configuration: validation against the schema (``core/schema.py``), ``--set`` overrides, TOML, resolving a CONFIG.

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
from pathlib import Path
from typing import Any

from blipmon.core.errors import ConfigError
from blipmon.core.layout import CONFIG, EVENTS
from blipmon.core.schema import DEVICE_MAP_NAMES, GPU_INDEX_MAX, SCHEMA, Field, fmt_num  # noqa: F401 - read as config.SCHEMA

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
    # device_map = "auto" in a train job is each process's own GPU, written out or not (runner/models.py,
    # device_map_kwarg): DDP never sees a split model, so nothing here depends on who wrote "auto".
    return validate(merge(raw, parse_set(overrides)))


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
