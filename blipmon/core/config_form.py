"""The launcher's settings form without the widgets: each schema key as text, edits validated, errors by key.

Kept out of ``ui/`` because none of it draws anything: it turns a configuration into the text each
field shows (``settings_of``), validates what the user typed with the same code as a TOML file
(``validate_edits``), and attaches each line of a refusal to the setting it names (``split_errors``).
"""

from __future__ import annotations

from typing import Any

from blipmon.core import config
from blipmon.core.safe_text import one_line

HIDDEN_KEYS = ("description",)


def display_value(v: Any) -> str:
    """A setting as the user types it: the TOML value, without quotes around plain strings.

    An empty string stays empty (the field shows nothing, and its hint is shown apart: ``setting_hint``).
    A saved run's configuration is someone else's text: control characters are made visible.
    """
    if isinstance(v, str):
        return one_line(v)
    return one_line(config.toml_value(v))


# What a setting means where the schema has no help of its own (shown when its field has focus).
_HINTS = {
    "runtime.alloc_conf": "PYTORCH_CUDA_ALLOC_CONF for the child, e.g. max_split_size_mb:128; empty = PyTorch's default",
}


def setting_hint(key: str) -> str:
    """What is allowed in ``key`` and what it means: the settings box shows it while the field has focus.

    Never inside the field (as a placeholder): in an empty field, a placeholder such as ``a string``
    reads as the value.
    """
    f = config.SCHEMA[key]
    about = f.help or _HINTS.get(key, "")
    return f"{key}: {f.allowed()}" + (f" — {about}" if about else "")


def settings_of(cfg: dict[str, Any]) -> dict[str, str]:
    """Every schema key's current text for the form."""
    out = {}
    for key in config.SCHEMA:
        if key in HIDDEN_KEYS:
            continue
        try:
            out[key] = display_value(config.get(cfg, key))
        except (KeyError, TypeError):
            out[key] = display_value(config.SCHEMA[key].default)
    return out


def validate_edits(
    base: dict[str, Any], original: dict[str, str], edited: dict[str, str]
) -> tuple[dict[str, Any] | None, dict[str, str], list[str]]:
    """Apply the changed fields to ``base`` and validate: (config or None, errors by key, other errors)."""
    items = [f"{k}={v}" for k, v in edited.items() if v != original.get(k)]
    try:
        override = config.parse_set(items)
        return config.validate(config.merge(base, override)), {}, []
    except config.ConfigError as e:
        return None, *split_errors(str(e))


def split_errors(message: str) -> tuple[dict[str, str], list[str]]:
    """Attach each line of a ConfigError to the setting it names (the longest key it mentions)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip() and not ln.startswith("invalid configuration")]
    by_key: dict[str, str] = {}
    rest: list[str] = []
    keys = sorted(config.SCHEMA, key=len, reverse=True)
    for line in lines:
        key = next((k for k in keys if line.startswith(k) or line.startswith(f"--set {k}")), None)
        key = key or next((k for k in keys if k in line), None)
        if key is not None and key not in HIDDEN_KEYS:
            by_key[key] = (by_key[key] + "; " if key in by_key else "") + line
        else:
            rest.append(line)
    return by_key, rest
