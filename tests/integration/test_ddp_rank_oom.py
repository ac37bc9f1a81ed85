"""Two ranks under torchrun, one of them runs out of memory for real: ``blipmon run`` exits 3 and the run is ``oom``.

torchrun itself exits 1 whichever way a rank failed. Rank 1's address space is capped from outside
(prlimit) once it has loaded, so its first forward really fails to allocate, in the recorder's own
code path; rank 0 then loses its peer. The parent reads the ranks' ``end`` records to find the OOM.
"""

from __future__ import annotations

import resource
from typing import Any

import psutil
import pytest

HEADROOM = 256 * 2**20  # what rank 1 may still take once loaded: far below its first forward's activations
# 512 samples of 3x128x128 pixels and 100 tokens per rank: about 1 GiB of activations in the first forward.
OOM_RUN = ("train.strategy=ddp", "train.devices=2", "train.batch_size=512", "train.num_train_samples=1024",
           "data.max_length=100", "train.max_epochs=1", "runtime.sample_hz=5")  # fmt: skip


@pytest.mark.slow
def test_a_rank_out_of_memory_makes_blipmon_run_exit_3(start_run: Any, run_cli: Any) -> None:
    rp = start_run("tiny/blip2-opt", *OOM_RUN, fast=False)
    events = rp.wait_for_record("rank_load", rank=1)
    pid = next(e["pid"] for e in events if e.get("type") == "rank_start" and e.get("rank") == 1)
    limit = psutil.Process(pid).memory_info().vms + HEADROOM
    resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))
    done = rp.finish()
    assert done.returncode == 3, rp.describe()
    run = done.run()
    assert run.status == "oom"
    assert run.oom is not None and run.oom["rank"] == 1 and run.oom["step"] == 0
    assert run.exit is not None and run.exit["code"] == 1  # torchrun's own exit code, kept in the record
    assert "Traceback" not in done.stderr
    shown = run_cli("show", done.run_dir, "--json")
    assert shown.returncode == 0 and '"status": "oom"' in shown.stdout
