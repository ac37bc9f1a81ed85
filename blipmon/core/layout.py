"""The names of the files and folders blipmon writes: defined here once, imported everywhere else.

A run directory holds ``events.jsonl`` (the profile), ``config.json`` (what the child ran) and
``child.log`` (its output); a sweep folder holds ``sweep.json`` (the queue) and, when the dashboard
started it, ``sweep.log``. Everything goes under ``./profiles`` unless ``--out`` says otherwise.
docs/profile-format.md describes every file.
"""

from __future__ import annotations

from pathlib import Path

PROFILES = Path("profiles")  # the default root of runs and sweeps, relative to the working directory
EVENTS = "events.jsonl"  # a run's event stream
CONFIG = "config.json"  # the resolved configuration a run's child reads
LOG = "child.log"  # the child's stdout and stderr
SWEEP_FILE = "sweep.json"  # a sweep folder's queue: every configuration, its status and run directory
SWEEP_LOG = "sweep.log"  # a sweep started with --announce (by the dashboard): its progress and table

__all__ = ["CONFIG", "EVENTS", "LOG", "PROFILES", "SWEEP_FILE", "SWEEP_LOG"]
