"""The cadence of what is counted (docs/profile-format.md, ``phase``): a real child's run, read by every reader.

Steps 0 and 1 and every ``runtime.module_every``-th step are counted in full; the others record the allocator's
figures, host RSS and params only. The readers describe the counted steps: the peak phase, the dashboard's bars.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from blipmon.core.report import render_show
from blipmon.core.run import PHASES, counted, load_run
from blipmon.runner.follow import FileFollowSource

NULLED = ("grads", "optim", "acts", "other")


def test_steps_between_the_counted_ones_keep_params_and_host_rss(
    start_run: Callable[..., Any], run_cli: Callable[..., Any]
) -> None:
    # 16 samples in batches of 4: steps 0-3; every 2nd counted: 0, 1, 2 in full, 3 not.
    fin = start_run("tiny/blip2-opt", "runtime.module_every=2").finish()
    assert fin.returncode == 0, fin.stderr
    summary = json.loads(run_cli("show", fin.run_dir, "--json").stdout)
    phases = summary["phases"]
    assert [p["step"] for p in phases] == [s for s in range(4) for _ in PHASES]  # every step has its four records
    params = phases[0]["params"]
    for p in phases:
        assert p["params"] == params and p["host_rss"] > 0 and p["allocated"] is None, p
        if p["step"] == 3:
            assert {k: p[k] for k in NULLED} == dict.fromkeys(NULLED), p
        else:
            assert p["grads"] is not None and p["optim"] is not None and p["acts"] is not None, p
            assert (p["acts"] > 0) == (p["phase"] == "after_fwd"), p
    # The per-module records belong to the counted steps alone.
    assert sorted({m["step"] for m in summary["modules"]}) == [0, 1, 2]

    run = load_run(fin.run_dir)
    peak = run.peak_phase()
    assert peak is not None and counted(peak) and peak["phase"] == "after_fwd" and peak["step"] in (0, 1, 2)
    text = render_show(run)
    assert "step 3" not in text.split("phases")[0]  # the peak named is a counted step's
    # The dashboard's phase bars: the newest complete step counted in full, not the newer step 3.
    snap = FileFollowSource(fin.run_dir).poll()
    latest = snap.latest_step()
    assert [p["phase"] for p in latest] == list(PHASES) and {p["step"] for p in latest} == {2}
    assert all(counted(p) for p in latest)
    assert snap.newest_complete_step() == 3  # newer than the bars' step: their title says they show the counted one
