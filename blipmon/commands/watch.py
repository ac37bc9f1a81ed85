"""``blipmon watch [--out DIR] [--sample-hz HZ] -- CMD...``: record any command's process tree.

``--sample-hz`` is held to ``runtime.sample_hz``'s range here; then the recorder (``runner/watch.py``:
``record``) takes over. It exits with the command's own exit code (``128 + N`` when it died of signal
N), 127 when there is no such command.
"""

from __future__ import annotations

import argparse

from blipmon.core.config import SCHEMA, check_number
from blipmon.core.errors import UsageError


def run(args: argparse.Namespace) -> int:
    """Entry point of ``blipmon watch``; returns the command's exit code."""
    from blipmon.runner.watch import record

    if getattr(args, "sample_hz", None) is not None:
        msg = check_number("--sample-hz", args.sample_hz, SCHEMA["runtime.sample_hz"])
        if msg:
            raise UsageError(msg.replace(" = ", " ", 1))
    return record(args)
