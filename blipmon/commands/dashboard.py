"""``blipmon`` with no command: the dashboard's launcher (presets, saved runs and sweeps)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from blipmon.ui.app import run_launcher

    return run_launcher()
