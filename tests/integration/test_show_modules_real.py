"""``show --modules`` and ``compare --modules`` on a real ``blipmon run tiny/blip2-opt`` (CPU): the child's
module records read back through the command line, checked against the run's own phase records.

The independent facts: the root's figures equal the phase record of the same boundary (the fixed summary's
``phases``), every module's are at most its parent's (figures are inclusive), the default boundary is the phase
record ``show`` marks as the peak, and a run compared with itself changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

CATS = ("params", "grads", "optim", "acts")


@pytest.mark.slow
def test_show_and_compare_modules_of_a_real_run(start_run: Callable[..., Any], run_cli: Callable[..., Any]) -> None:
    fin = start_run("tiny/blip2-opt").finish()
    assert fin.returncode == 0, fin.stderr
    run_dir = fin.run_dir
    summary = json.loads(run_cli("show", run_dir, "--json").stdout)
    assert summary["modules"], "the child recorded no module figures"
    phases = [p for p in summary["phases"] if p["rank"] == 0 and p["acts"] is not None]  # counted in full
    peak = max(phases, key=lambda p: sum(p[c] for c in CATS))  # CPU: no allocator peak, the categories' sum

    res = run_cli("show", run_dir, "--modules", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert {(r["step"], r["micro_step"], r["phase"]) for r in rows} == {
        (peak["step"], peak["micro_step"], peak["phase"])
    }
    root = rows[0]
    assert root["module"] == "" and root["depth"] == 0
    assert {c: root[c] for c in CATS} == {c: peak[c] for c in CATS}  # the root is the phase, to the byte
    by_path = {r["module"]: r for r in rows}
    for r in rows[1:]:
        parent = max((p for p in by_path if p == "" or r["module"].startswith(p + ".")), key=len)
        assert all(r[c] <= by_path[parent][c] for c in CATS), (r, by_path[parent])
    assert {"vision_model", "qformer", "language_model"} <= set(by_path)
    # the default runtime.module_depth 2 records two levels, a module with a single child module being no level of
    # its own (docs/modules.md): OPT's language_model.model holds only its decoder, which is recorded too and
    # nests under it in the shown tree; the decoder's layers are not recorded
    assert by_path["language_model.model"]["depth"] == 2
    assert by_path["language_model.model.decoder"]["depth"] == 3
    assert {c: by_path["language_model.model.decoder"][c] for c in CATS} == {
        c: by_path["language_model.model"][c] for c in CATS
    }
    assert max(r["module"].count(".") for r in rows) == 2 and max(r["depth"] for r in rows) == 3

    # the table names the same boundary and lists the same modules
    text = run_cli("show", run_dir, "--modules", "--depth", "1").stdout.splitlines()
    assert text[1].startswith(f"modules  step {peak['step']} {peak['phase']} (the run's peak phase);")
    shown = [ln.split()[0] for ln in text[3:] if not ln.startswith("predicted")]
    assert sorted(shown) == sorted(["(model)", *(r["module"] for r in rows if r["depth"] == 1)])

    # a step the run did not record is refused, naming what it did record
    bad = run_cli("show", run_dir, "--modules", "--step", "999")
    assert bad.returncode == 2 and "--step 999: no module figures at that step; recorded at steps 0" in bad.stderr

    # compared with itself: every module, nothing changed
    cmp = json.loads(run_cli("compare", run_dir, run_dir, "--modules", "--format", "json").stdout)["modules"]
    assert cmp["rows"] and not any(r["changed"] for r in cmp["rows"])
    assert {r["module"] for r in cmp["rows"]} == {r["module"] for r in summary["modules"]}
