"""A stop signal after the child recorded its end cannot kill it (the exit record must keep its exit 4).

On Ctrl-C both ``blipmon run`` and its child get SIGINT; the parent also forwards a SIGTERM. When the child
has already recorded the stop and is shutting down, Python has put the default handlers back, so that SIGTERM
used to kill it and the run's exit record said SIGTERM instead of exit 4 (seen under load in
tests/integration/test_early_stop_signals.py).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from support import subprocess_env

from blipmon.runner import child


def test_a_sigterm_after_the_end_leaves_the_exit_code_alone(blipmon_cache: Path) -> None:
    code = textwrap.dedent(
        """
        import os, signal, sys, time
        from blipmon.runner.child import _ignore_stops_from_now_on
        signal.signal(signal.SIGTERM, lambda *a: None)  # the child's own handler while it runs
        _ignore_stops_from_now_on()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        sys.exit(4)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(blipmon_cache), capture_output=True, timeout=60
    )
    assert done.returncode == 4, done.stderr


def test_the_child_ignores_stops_once_its_run_is_recorded() -> None:
    import inspect

    src = inspect.getsource(child.main)
    assert src.index("code = record(") < src.index("_ignore_stops_from_now_on()") < src.index("return code")
    assert "_ignore_stops_from_now_on" not in inspect.getsource(child.record)  # in-process callers keep Ctrl-C
