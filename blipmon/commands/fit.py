"""``blipmon fit CONFIG [--set K=V]... [--gpu-memory SIZE] [--host-memory SIZE] [--sweep DIR] [--json]``.

The largest batch that fits, and the ranked changes that make a configuration fit (``blipmon.estimate.fit``).
Exit codes as ``blipmon estimate``: 0 whenever the search ran, whatever the verdict (scripts read ``--json``'s
``verdict``); 2 for a bad configuration, a bad size, a GPU configuration with nothing to judge it against, or a
``--sweep`` folder that cannot be written. ``--sweep DIR`` writes each suggestion as a complete configuration file,
named so that they sort best first, and prints the ``blipmon sweep DIR`` that runs them.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from blipmon.core.config import ConfigError, to_toml, toml_value


def run(args: Any) -> int:
    from blipmon.commands.estimate import memory_arg
    from blipmon.core.config import resolve
    from blipmon.estimate.fit import fit

    gpu = memory_arg("--gpu-memory", args.gpu_memory)
    host = memory_arg("--host-memory", getattr(args, "host_memory", None))
    cfg = resolve(args.config, args.overrides)
    sweep_dir: Path | None = getattr(args, "sweep", None)
    if sweep_dir is not None:
        check_sweep_dir(sweep_dir)
    result = fit(cfg, gpu_memory=gpu, host_memory=host)
    files: list[Path] = []
    if sweep_dir is not None and result.suggestions:
        files = write_sweep(sweep_dir, cfg, result)
    if args.json:
        data = result.to_json()
        if sweep_dir is not None:
            data["sweep_files"] = [str(f) for f in files]
        print(json.dumps(data, indent=1))
        return 0
    sys.stdout.write(render(result, config_arg=args.config, overrides=list(args.overrides), gpu_memory=args.gpu_memory))
    if sweep_dir is not None:
        sys.stdout.write(render_sweep(sweep_dir, files))
    return 0


def check_sweep_dir(path: Path) -> None:
    """Refuse a ``--sweep`` folder before the search runs: it must be a folder (or not exist) with no ``.toml`` in it.

    ``blipmon sweep DIR`` runs every ``.toml`` of the folder, so configurations already there would run among the
    suggestions, and a suggestion file written over one would lose it.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--sweep {path}: not a folder")
    if path.is_dir() and any(path.glob("*.toml")):
        raise ConfigError(
            f"--sweep {path}: the folder already holds .toml configurations, which `blipmon sweep` would run with "
            "the suggestions; give an empty or new folder"
        )


def sweep_files(cfg: dict[str, Any], result: Any) -> list[tuple[str, dict[str, Any]]]:
    """(file name, complete configuration) for each suggestion, best first: ``01-batch-16x4.toml``, ...

    Each is the configuration with the suggestion's changes applied and validated, renamed ``<name>-fitNN`` so its
    runs are told apart, with a description that says which suggestion it is.
    """
    from blipmon.estimate.fit_search import Probe, describe_changes

    probe = Probe(cfg, judge=lambda c: {})
    name = str(cfg.get("name", "config"))[:110].rstrip(" -.") or "config"
    out: list[tuple[str, dict[str, Any]]] = []
    for i, s in enumerate(result.suggestions, 1):
        full = probe.config(s.changes)
        full["name"] = f"{name}-fit{i:02d}"
        full["description"] = (
            f"blipmon fit suggestion {i} for {name}: {describe_changes(s.changes)} "
            f"(predicted {s.verdict}, effective batch {s.effective_batch})"
        )
        out.append((f"{i:02d}-{_slug(s)}.toml", full))
    return out


def write_sweep(path: Path, cfg: dict[str, Any], result: Any) -> list[Path]:
    try:
        path.mkdir(parents=True, exist_ok=True)
        written = []
        for fname, full in sweep_files(cfg, result):
            f = path / fname
            f.write_text(to_toml(full), encoding="utf-8")
            written.append(f)
    except OSError as e:
        raise ConfigError(f"--sweep {path}: cannot write the configurations: {e}") from None
    return written


def _slug(s: Any) -> str:
    parts = []
    for knob in s.knobs:
        if knob == "batch":
            b = s.changes.get("train.batch_size")
            acc = s.changes.get("train.accumulate_grad_batches")
            parts.append(f"batch-{b}" + (f"x{acc}" if acc is not None else ""))
        else:
            parts.append(knob)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts))[:80] or "change"


def set_args(changes: dict[str, Any]) -> list[str]:
    """``--set K=V`` for each change, as a shell line's words (what ``blipmon estimate`` and ``run`` take)."""
    words: list[str] = []
    for k, v in changes.items():
        words += ["--set", f"{k}={_set_value(v)}"]
    return words


def _set_value(v: Any) -> str:
    return v if isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.\-]+", v) else toml_value(v)


def render(
    result: Any, *, config_arg: str = "", overrides: list[str] | None = None, gpu_memory: str | None = None
) -> str:
    """The verdict as configured, the largest batch, the ranked suggestions with their costs, the skipped knobs."""
    from blipmon.core.safe_text import one_line, printable
    from blipmon.core.units import fmt_bytes

    r = result
    where = "GPU" if r.device == "cuda" else "host RAM (CPU run)"
    overhead = "GPU overheads" if r.device == "cuda" else "runtime"
    lines = [
        f"fit {one_line(r.name)}   on {where}, against {fmt_bytes(r.capacity_bytes)} ({one_line(r.capacity_source)})"
    ]
    as_is = {
        "fits": f"FITS with {fmt_bytes(r.headroom_bytes)} to spare",
        "tight": f"TIGHT: fits with only {fmt_bytes(r.headroom_bytes)} to spare",
        "oom": "OUT OF MEMORY" + (f": runs out at {one_line(r.runs_out)}" if r.runs_out else ""),
    }[r.verdict]
    batch = f", micro-batch {r.batch_size}, effective batch {r.effective_batch}" if r.effective_batch else ""
    lines.append(f"as is    {as_is}; peak {fmt_bytes(r.peak_bytes)} + {fmt_bytes(r.runtime_bytes)} {overhead}{batch}")
    if r.max_batch_size is None and r.max_batch_note:
        lines.append(f"largest  {one_line(r.max_batch_note)}")
    elif r.max_batch_size is None:
        lines.append("largest  no train.batch_size fits, not even 1, with everything else as configured")
    else:
        extra = f" ({one_line(r.max_batch_note)})" if r.max_batch_note else f"; {r.max_batch_size + 1} does not"
        lines.append(f"largest  train.batch_size = {r.max_batch_size} fits, everything else as configured{extra}")
    lines.append(
        f"margin   a fit with less than {fmt_bytes(r.margin_bytes)} to spare (2 % of the capacity) is TIGHT: the "
        "allocator's fragmentation is not in the estimate"
    )
    if r.verdict == "fits":
        lines.append("changes  none needed: it fits as configured")
    elif not r.suggestions:
        lines.append("changes  none of the knobs, alone or combined, makes it fit")
    else:
        lines.append(f"changes  {len(r.suggestions)}, best first (predicted peak, what is left, what it costs):")
        for i, s in enumerate(r.suggestions, 1):
            lines.append(f"  {i:2d}. {' '.join(shlex.quote(w) for w in set_args(s.changes))}")
            lines.append(
                f"      {s.verdict.upper()}: peak {fmt_bytes(s.peak_bytes)}, {fmt_bytes(s.headroom_bytes)} to spare"
                + (f", effective batch {s.effective_batch}" if s.effective_batch else "")
            )
            for n in s.notes:
                lines.append(f"      - {printable(n)}")
    for n in r.notes:
        lines.append(f"note     {printable(n)}")
    for sk in r.skipped:
        what = ", ".join(f"{k}={v}" for k, v in sk.changes.items())
        lines.append(f"skipped  {printable(what)}: {printable(sk.reason)}")
    if r.suggestions and config_arg:
        words = ["blipmon", "estimate", config_arg]
        for o in overrides or []:
            words += ["--set", o]
        if gpu_memory is not None:
            words += ["--gpu-memory", gpu_memory]
        elif r.device == "cuda" and r.capacity_source.startswith("the preset's card"):
            words += ["--gpu-memory", f"{r.capacity_bytes}B"]
        words += set_args(r.suggestions[0].changes)
        lines.append(f"check    {printable(' '.join(shlex.quote(w) for w in words))}")
    lines.append(f"({r.estimates} estimates, {r.seconds:.1f} s)")
    return "\n".join(lines) + "\n"


def render_sweep(path: Path, files: list[Path]) -> str:
    from blipmon.core.safe_text import printable

    if not files:
        return "sweep    nothing written: there are no suggestions\n"
    return (
        f"sweep    {len(files)} configuration{'s' if len(files) != 1 else ''} written to {printable(path)}, best first; "
        f"run them with:\n  blipmon sweep {printable(shlex.quote(str(path)))}\n"
    )
