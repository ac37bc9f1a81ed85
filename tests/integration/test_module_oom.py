"""The child's out-of-memory record names the module that ran out and its pass (issue 12), for a real OOM.

The child's address space is capped from outside (prlimit) once its model has loaded, as
tests/integration/test_ddp_rank_oom.py does for a rank: its first forward then really fails to allocate, inside
one of the model's modules. Where exactly depends on the allocator, so the test holds the record to what must be
true wherever it failed: a module of the run's own tree, the pass of the job's cursor, and the per-module figures
of the boundary before it.
"""

from __future__ import annotations

import resource
from typing import Any

import psutil
import pytest

HEADROOM = 256 * 2**20
OOM_RUN = ("train.batch_size=512", "train.num_train_samples=1024", "data.max_length=100", "train.max_epochs=1",
           "runtime.sample_hz=5", "train.num_workers=0")  # fmt: skip


@pytest.mark.slow
def test_child_oom_names_a_module_of_its_tree_and_the_pass(start_run: Any, run_cli: Any) -> None:
    rp = start_run("tiny/blip2-opt", *OOM_RUN, fast=False)
    events = rp.wait_for_record("load")
    pid = next(e["pid"] for e in events if e.get("type") == "header")
    limit = psutil.Process(pid).memory_info().vms + HEADROOM
    resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))
    done = rp.finish()
    assert done.returncode == 3, rp.describe()
    run = done.run()
    assert run.oom is not None and run.oom["step"] == 0
    cursor_pass = {"forward": "forward", "backward": "backward", "optimizer_step": "optimizer"}[run.oom["phase"]]
    assert run.oom["module_pass"] == cursor_pass
    tree = run.modules.trees[0]
    assert run.oom["module"] in tree and run.oom["module"] != ""  # it ran out inside one of the model's modules
    summary = run.summary()
    assert summary["oom"]["module"] == run.oom["module"] and summary["oom"]["module_pass"] == cursor_pass
    # The per-module figures of the last boundary before it: step 0's before_fwd (forward) or after_fwd.
    before = run.modules.last_before(0, 0, run.oom["phase"])
    assert [r.module for r in before] == list(tree)
    assert before[0].phase == {"forward": "before_fwd", "backward": "after_fwd"}[run.oom["phase"]]
