"""The runs saved under a folder (``./profiles``), newest first, each once: what the launcher lists.

Each run's status and headline peak are read once per change of its events file (a cache keyed by
its size and time), so the launcher can refresh the list every few seconds without rereading every
profile. Sweep folders are listed by ``runner/sweep_control.py``'s ``list_sweeps``: whether a sweep
still runs is a question about its process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blipmon.core.errors import ProfileError
from blipmon.core.layout import EVENTS, PROFILES
from blipmon.core.profile import iter_run_dirs
from blipmon.core.run import load_run


@dataclass(frozen=True)
class RunEntry:
    """A saved run as the list shows it; read once per change of its events file."""

    path: Path
    name: str
    status: str
    peak: int | None
    config: dict[str, Any]
    stamp: tuple[float, int]


_ENTRY_CACHE: dict[Path, RunEntry] = {}


def read_entry(path: Path) -> RunEntry | None:
    """Status and peak of a saved run (cached until its events file changes); None if unreadable."""
    try:
        st = (path / EVENTS).stat()
    except OSError:
        return None
    stamp = (st.st_mtime, st.st_size)
    cached = _ENTRY_CACHE.get(path)
    if cached is not None and cached.stamp == stamp:
        return cached
    try:
        run = load_run(path)
    except (ProfileError, OSError):
        return None
    entry = RunEntry(path, run.name, run.status, run.headline_peak().bytes, run.config, stamp)
    _ENTRY_CACHE[path] = entry
    return entry


def forget_entry(path: Path) -> None:
    """Drop a run from the cache (it was deleted): a run made again at the same path is read afresh."""
    _ENTRY_CACHE.pop(path, None)


def list_runs(root: Path = PROFILES) -> list[RunEntry]:
    """The saved runs under ``root``, newest first, each once.

    ``iter_run_dirs`` looks one folder deep (sweeps), so a symlink inside ``profiles/`` (to
    ``profiles/`` itself, to a run, to a sweep) would list the same runs again under another
    path: runs are told apart by their real path, and the path with the fewest hops is kept. An
    unreadable folder lists nothing rather than failing the launcher.
    """
    try:
        found = list(iter_run_dirs(root))
    except OSError:
        return []
    best: dict[Path, Path] = {}
    for p in found:
        real = real_path(p)
        if real not in best or listing_order(p) < listing_order(best[real]):
            best[real] = p
    out = []
    for p in found:
        if best[real_path(p)] != p:
            continue
        e = read_entry(p)
        if e is not None:
            out.append(e)
    return out


def real_path(p: Path) -> Path:
    """``p`` with every symlink resolved (a loop resolves as far as it goes: it is still one key)."""
    try:
        return p.resolve()
    except (OSError, RuntimeError):
        return p.absolute()


def listing_order(p: Path) -> tuple[int, int, str]:
    """Which of several paths to one folder to show: not through a symlink, then the shortest, then by name."""
    try:
        hops = sum(1 for q in (p, *p.parents) if q.is_symlink())
    except OSError:
        hops = 0
    return hops, len(p.parts), str(p)
