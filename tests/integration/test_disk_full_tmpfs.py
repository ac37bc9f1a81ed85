"""A real full disk: ``blipmon run`` into a small tmpfs, filled to leave 0 KB, 12 KB, or a little more than a run needs.

The tmpfs is mounted in a private mount namespace (``unshare -rm``, no privileges needed where user
namespaces are allowed), so nothing outside the test sees it. Everything written there — the run
directory, ``blipmon show``'s output — is copied out before the namespace ends.

What must hold: a disk too full to record a run refuses it with "disk full" and leaves nothing (no
``config.json.tmp``, no half run directory); a disk that fills during a run ends it as ``error`` with
the reason "disk full" in the record ``show`` prints, everything before kept readable, no temporary file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import PATIENCE_S, subprocess_env

from blipmon.core.profile import RESERVE_BYTES
from blipmon.core.run import load_run

INNER = r"""
import json, os, shutil, subprocess, sys
mnt, free, result, sets = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
os.makedirs(mnt, exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt], check=True)
out = os.path.join(mnt, "out")
os.mkdir(out)
st = os.statvfs(mnt)
with open(os.path.join(mnt, "filler"), "wb") as fh:
    fh.write(bytes(st.f_bavail * st.f_frsize - free))
st = os.statvfs(mnt)
cmd = [sys.executable, "-m", "blipmon", "run", "tiny/blip2-opt", "--out", out]
for s in sets:
    cmd += ["--set", s]
p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
res = {"free": st.f_bavail * st.f_frsize, "rc": p.returncode, "stderr": p.stderr, "stdout": p.stdout, "files": []}
for root, _dirs, files in os.walk(out):
    res["files"] += [os.path.relpath(os.path.join(root, f), out) for f in files]
runs = os.listdir(out)
if runs:
    run = os.path.join(out, runs[0])
    for key, args in (("json", ["show", run, "--json"]), ("text", ["show", run])):
        q = subprocess.run([sys.executable, "-m", "blipmon", *args], capture_output=True, text=True)
        res["show_" + key] = {"rc": q.returncode, "out": q.stdout, "err": q.stderr}
    shutil.copytree(run, os.path.join(result, "run"))
with open(os.path.join(result, "result.json"), "w") as fh:
    json.dump(res, fh)
"""


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        p = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _unshare_works(), reason="needs a private mount namespace (unshare -rm) to mount a tmpfs"),
]


def run_on_full_disk(tmp_path: Path, cache: Path, free: int, *sets: str) -> dict[str, Any]:
    result = tmp_path / "result"
    result.mkdir()
    cmd = ["unshare", "-rm", sys.executable, "-c", INNER, str(tmp_path / "mnt"), str(free), str(result), *sets]
    subprocess.run(cmd, env=subprocess_env(cache), timeout=PATIENCE_S * 2, check=True, stdin=subprocess.DEVNULL)
    res = json.loads((result / "result.json").read_text())
    res["run_dir"] = result / "run"
    return res


@pytest.mark.parametrize("free", [0, 12 * 1024])
def test_a_disk_too_full_to_record_a_run_refuses_it_and_leaves_nothing(
    tmp_path: Path, blipmon_cache: Path, tiny_models: Any, free: int
) -> None:
    res = run_on_full_disk(tmp_path, blipmon_cache, free, "train.num_train_samples=16")
    assert res["free"] == free
    assert res["rc"] == 2, res["stderr"]
    assert "disk full" in res["stderr"] and "No space left on device" in res["stderr"]
    assert "Traceback" not in res["stderr"]
    assert res["files"] == []  # no run directory, no config.json.tmp, no reserve


def test_a_disk_that_fills_during_a_run_ends_it_as_an_error_that_says_disk_full(
    tmp_path: Path, blipmon_cache: Path, tiny_models: Any
) -> None:
    # Room for the reserve and 24 KiB more: the run starts, samples at 50 Hz fill the rest within seconds.
    free = RESERVE_BYTES + 24 * 1024
    res = run_on_full_disk(tmp_path, blipmon_cache, free, "train.num_train_samples=1000000", "train.batch_size=2",
                           "runtime.sample_hz=50")  # fmt: skip
    assert res["rc"] == 1, res["stderr"]
    assert "Traceback" not in res["stderr"] and "could not record" not in res["stderr"]
    assert sorted(f.split("/")[-1] for f in res["files"]) == ["child.log", "config.json", "events.jsonl"]
    assert res["show_json"]["rc"] == 0 and json.loads(res["show_json"]["out"])["status"] == "error"
    outcome = next(line for line in res["show_text"]["out"].splitlines() if line.startswith("outcome"))
    assert "failed with an error: disk full" in outcome and "(exit 1)" in outcome
    run = load_run(res["run_dir"])  # everything before the disk filled is readable
    assert run.status == "error" and not run.warnings
    assert run.error is not None and run.error["reason"] == "disk_full"
    assert run.end == {**run.end, "status": "error", "code": 1}
    assert run.exit == {**run.exit, "code": 1, "signal": None}
    assert run.load is not None and len(run.samples) > 0
    log = (res["run_dir"] / "child.log").read_text(errors="replace")
    assert "Traceback" not in log and "disk full" in log
