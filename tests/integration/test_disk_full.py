"""A profile that can no longer be written: the child stops cleanly and what it wrote stays readable.

The file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) makes every write past a few kilobytes
fail with EFBIG inside a real child, exactly as a full disk makes them fail with ENOSPC.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blipmon.core.config import resolve
from blipmon.core.profile import write_config
from blipmon.core.run import load_run
from blipmon.runner.launch import append_exit, make_run_dir
from blipmon.runner.models import ensure_tiny

LIMIT = 12 * 1024


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


@pytest.mark.slow
def test_child_stops_cleanly_when_the_profile_cannot_grow(tmp_path: Path) -> None:
    ensure_tiny("tiny/blip2-opt")  # built before the limit: only the profile must hit it
    cfg = resolve("tiny/blip2-opt", ["train.num_train_samples=400", "train.batch_size=2", "train.max_epochs=1"])
    run_dir = make_run_dir(cfg, tmp_path)
    write_config(run_dir, cfg)
    with open(run_dir / "child.log", "wb") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "blipmon.runner.child", str(run_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_limit_file_size,  # noqa: PLW1509 - a test of the child under a file-size limit
            timeout=240,
            check=False,
        )
    assert proc.returncode == 1
    append_exit(run_dir, proc.returncode)
    log_text = (run_dir / "child.log").read_text()
    assert "cannot write the profile any more" in log_text
    assert "Traceback" not in log_text
    run = load_run(run_dir)  # what was written stays readable
    assert run.status == "error"
    assert run.phases, "the phases recorded before the disk filled are kept"
    assert len(run.steps) < 200  # it stopped early instead of training blind
