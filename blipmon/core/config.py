"""Run configuration: the TOML schema of DESIGN.md, ``--set`` overrides and validation.

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

PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-mixed")
OPTIMIZERS = ("adamw", "sgd", "adam_8bit", "paged_adamw_8bit", "deepspeed_cpu")
STRATEGIES = ("auto", "deepspeed_stage_2_offload", "ddp")
QUANTIZATIONS = ("none", "8bit", "4bit-nf4", "4bit-fp4")
WEIGHTS = ("pretrained", "random", "auto")
JOB_KINDS = ("train", "load", "generate")
DEVICE_MAP_NAMES = ("cuda", "cpu", "auto", "cpu-first")
DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A configuration the user must fix; its message is shown as is, without a traceback."""


@dataclass(frozen=True)
class Field:
    """One allowed key: its type(s), default and constraint, used for messages as well as checks."""

    types: tuple[type, ...]
    default: Any
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    exclusive_minimum: bool = False
    help: str = ""

    def allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        names = " or ".join(_type_name(t) for t in self.types)
        if self.minimum is not None:
            op = ">" if self.exclusive_minimum else ">="
            return f"{names} {op} {_fmt_num(self.minimum)}"
        return names


def _type_name(t: type) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a table"}.get(
        t, t.__name__
    )


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


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
    "train.batch_size": Field((int,), 8, minimum=1),
    "train.accumulate_grad_batches": Field((int,), 1, minimum=1),
    "train.precision": Field((str,), "32-true", PRECISIONS),
    "train.optim": Field((str,), "adamw", OPTIMIZERS),
    "train.lr": Field((float, int), 5e-6, minimum=0, exclusive_minimum=True),
    "train.act_ckpt": Field((bool,), False),
    "train.max_epochs": Field((int,), 2, minimum=1),
    "train.max_steps": Field((int,), -1, minimum=-1),
    "train.num_train_samples": Field((int,), 512, minimum=1),
    "train.num_workers": Field((int,), 0, minimum=0),
    "train.strategy": Field((str,), "auto", STRATEGIES),
    "train.devices": Field((int,), 1, minimum=1),
    "train.num_nodes": Field((int,), 1, minimum=1, help="machines; each runs `blipmon run` with NODE_RANK set"),
    "train.lora.enabled": Field((bool,), False),
    "train.lora.r": Field((int,), 16, minimum=1),
    "train.lora.alpha": Field((int, float), 32, minimum=0, exclusive_minimum=True),
    "train.lora.dropout": Field((float, int), 0.05, minimum=0),
    "train.lora.target_modules": Field((list,), [], help="module names; empty = per-architecture default"),
    "train.qlora": Field((bool,), False),
    "data.source": Field((str,), "synthetic"),
    "data.max_length": Field((int,), 50, minimum=1),
    "data.caption_tokens": Field(
        (int,), 0, minimum=0, help="synthetic caption length; 0 = every caption fills max_length (the worst case)"
    ),
    "data.image_placeholders": Field(
        (bool,),
        True,
        help="BLIP-2: image tokens before each caption, as the processor puts them; false = the caption alone, "
        "as the seed lab tokenizes it (the language model then sees only the caption)",
    ),
    "runtime.alloc_conf": Field((str,), ""),
    "runtime.sample_hz": Field((float, int), 10.0, minimum=0, exclusive_minimum=True),
    "runtime.probes": Field((bool,), True, help="per-phase attribution; off only to measure its cost"),
    "runtime.predict": Field((bool,), True, help="save the memory estimate when the run starts"),
    "runtime.seed": Field((int,), 0, minimum=0),
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
        return f"{key} = {value!r}: expected {f.allowed()}"
    if f.choices is not None and value not in f.choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in f.choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{key} = {value!r}: expected {f.allowed()}{hint}"
    if f.minimum is not None and isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key} = {value!r}: expected a finite number"
        bad = value <= f.minimum if f.exclusive_minimum else value < f.minimum
        if bad:
            return f"{key} = {value!r}: expected {f.allowed()}"
    if key == "model.device_map":
        return _check_device_map(value)
    if key == "train.lora.target_modules" and not all(isinstance(x, str) and x for x in value):
        return f"{key} = {value!r}: expected a list of module names"
    if key == "name" and not _NAME_RE.fullmatch(value):
        return f"name = {value!r}: expected letters, digits and - _ . / (no '..', not starting with '/')"
    if key == "train.max_steps" and value == 0:
        return "train.max_steps = 0: expected -1 (no limit) or a positive number of optimizer steps"
    return None


_NAME_RE = re.compile(r"(?!/)(?!.*\.\.)[A-Za-z0-9_.\-/ ]{1,120}")
_DEVICE_RE = re.compile(r"(cpu|disk|cuda(:\d+)?|\d+)")


def _check_device_map(value: Any) -> str | None:
    if isinstance(value, str):
        if value not in DEVICE_MAP_NAMES:
            return f"model.device_map = {value!r}: expected one of {', '.join(map(repr, DEVICE_MAP_NAMES))} or a table"
        return None
    if not value:
        return "model.device_map = {}: expected at least one module"
    for mod, dev in value.items():
        if isinstance(dev, bool) or not (isinstance(dev, int) or (isinstance(dev, str) and _DEVICE_RE.fullmatch(dev))):
            return f"model.device_map.{mod} = {dev!r}: expected a GPU index (0), 'cuda:N', 'cpu' or 'disk'"
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
    if t["lora"]["dropout"] >= 1:
        yield f"train.lora.dropout = {t['lora']['dropout']!r}: expected a number in [0, 1)"
    if cfg["job"]["kind"] == "train" and m["quantization"] != "none" and not (t["lora"]["enabled"] or t["qlora"]):
        yield (
            f"model.quantization = {m['quantization']!r} with a full fine-tune: quantized weights cannot be trained; "
            "enable train.lora.enabled or train.qlora, or use job.kind = 'load'"
        )
    if t["devices"] > 1 and t["strategy"] == "auto":
        yield f"train.devices = {t['devices']}: several ranks need train.strategy = 'ddp'"
    if t["num_nodes"] > 1 and t["strategy"] != "ddp":
        yield f"train.num_nodes = {t['num_nodes']}: several machines need train.strategy = 'ddp'"


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
    except tomllib.TOMLDecodeError:
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
    return validate(merge(raw, parse_set(overrides)))


RUN_CONFIG = "config.json"  # what a run directory keeps of its configuration (core/profile.py writes it)
RUN_EVENTS = "events.jsonl"  # its event stream


def is_run_dir(path: Path) -> bool:
    """A blipmon run (its configuration and events), not just any folder with a config.json (a model's, say)."""
    return path.is_dir() and (path / RUN_CONFIG).is_file() and (path / RUN_EVENTS).is_file()


def load_run_config(run_dir: Path) -> dict[str, Any]:
    """The configuration a saved run ran with, its name included (a new run gets its own directory)."""
    f = run_dir / RUN_CONFIG
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
        lines.append(f"{k} = {_toml_value(v)}")
    for table, body in cfg.items():
        if not isinstance(body, dict):
            continue
        lines.append(f"\n[{table}]")
        for k, v in body.items():
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # JSON's string escapes (\n, \t, \uXXXX, ...) are all valid in a TOML basic string; DEL is
        # the one character TOML forbids raw that JSON leaves alone.
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def caption_tokens(cfg: dict[str, Any]) -> int:
    """Tokens in each synthetic caption: ``data.caption_tokens`` up to ``max_length``, or ``max_length`` itself.

    The seed lab's tokenizer pads each batch to its longest caption (``padding=True``), so its
    batches are shorter than ``max_length`` unless a caption reaches it. ``caption_tokens`` models
    that longest caption; 0 keeps the worst case, every caption ``max_length`` long.
    """
    d = cfg["data"]
    return min(d.get("caption_tokens") or d["max_length"], d["max_length"])
