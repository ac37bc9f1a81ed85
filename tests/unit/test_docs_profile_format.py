"""docs/profile-format.md stays the reference: every record the code writes and every summary key is in it.

Why: the profile format is the interface scripts and other tools read, and it grows (``rank_steps``,
``grads_host``, ``proc``/``tree``, ...). A record type or summary key added without documenting it is
invisible to the next maintainer; a documented one that no longer exists misleads them. So:

- the record types are collected from the source (every ``emit("x"`` / ``.write("x"`` call, including
  ``"x" if cond else "y"``, and ``{"type": "x"`` literals) and each must have its own ``### `x` ``
  heading under "Record types" — and every such heading must be a type the code writes;
- a real tiny ``blipmon run`` (the ``start_run`` fixture: a real child training a real tiny model) and a real
  ``blipmon watch`` are recorded; every record type they wrote must have been found by the scan (so the
  scan cannot silently miss a way of writing), and every field of every record they wrote must be named
  in that record's section;
- every top-level key of ``blipmon show --json`` on the real run, and on the recorded two-rank fixture
  (which has the optional ``rank_steps``), is a row of the summary table, every nested key is named in
  the summary section, and every row of that table is a key some real summary has.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import read_events

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "profile-format.md"
DDP_FIXTURE = ROOT / "tests" / "data" / "tiny-ddp"

# emit("x", ...), self.emit("x", ...), writer.write("x", ...), emit(\n "x" if a.b else "y", ...)
_CALL = re.compile(r'(?:\bemit|\.write)\(\s*("[a-z_]+"(?:\s+if\s+[\w.]+\s+else\s+"[a-z_]+")?)\s*[,)]')
_TYPE_LITERAL = re.compile(r'"type":\s*"([a-z_]+)"')
_NAME = re.compile(r'"([a-z_]+)"')
_CODE = re.compile(r"`([^`]+)`")


def written_record_types() -> set[str]:
    """Record types the source writes, found by reading it (not by importing it)."""
    found: set[str] = set()
    for py in sorted((ROOT / "blipmon").rglob("*.py")):
        text = py.read_text(encoding="utf-8")
        for m in _CALL.finditer(text):
            found.update(_NAME.findall(m.group(1)))
        found.update(_TYPE_LITERAL.findall(text))
    return found


def doc_lines() -> list[str]:
    assert DOC.is_file(), f"{DOC} is missing: the profile format must be documented in the repository"
    return DOC.read_text(encoding="utf-8").splitlines()


def section(lines: list[str], heading: str) -> list[str]:
    """The lines under ``heading`` (an exact heading line) up to the next heading of the same or a higher level."""
    assert heading in lines, f"{DOC.name} has no heading {heading!r}"
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    out = []
    for line in lines[start + 1 :]:
        hashes = len(line) - len(line.lstrip("#"))
        if hashes and line[hashes : hashes + 1] == " " and hashes <= level:
            break
        out.append(line)
    return out


def record_headings(lines: list[str]) -> set[str]:
    """Types with a ``### `x` `` heading under "## Record types"."""
    out = set()
    for line in section(lines, "## Record types"):
        m = re.fullmatch(r"### `([a-z_]+)`", line.strip())
        if m:
            out.add(m.group(1))
    return out


def named(lines: list[str]) -> set[str]:
    """Every ``code`` span in these lines, and every quoted name inside one (``{"code", "signal"}``)."""
    spans = [span for line in lines for span in _CODE.findall(line)]
    return set(spans) | {name for span in spans for name in _NAME.findall(span)}


def first_table_keys(lines: list[str]) -> set[str]:
    """The names in the first cell of each row (``| `key` | ...``) of the first table in these lines."""
    out: set[str] = set()
    in_table = False
    for line in lines:
        if not line.startswith("|"):
            if in_table:
                break
            continue
        in_table = True
        m = re.match(r"\|\s*`([^`]+)`\s*\|", line)
        if m:
            out.add(m.group(1))
    return out


SUMMARY_HEADING = "## The JSON summary (`blipmon show --json`)"


# -- the scan and the headings -------------------------------------------------------------------------------


def test_the_scan_finds_the_record_types_written_in_every_way_the_source_writes_them() -> None:
    """A hand-checked sample, one per way of writing: a plain emit, a wrapped call, both branches of a
    conditional kind, a sampler's ``self.emit``, a recorder's ``self.writer.write``, the exit literal."""
    found = written_record_types()
    assert {"note", "header", "load", "rank_load", "step", "rank_step", "sample", "integration", "exit"} <= found


def test_every_record_type_the_code_writes_has_a_heading_in_the_doc() -> None:
    missing = written_record_types() - record_headings(doc_lines())
    assert not missing, f"record types written by blipmon but not documented in {DOC.name}: {sorted(missing)}"


def test_every_record_heading_in_the_doc_is_a_type_the_code_writes() -> None:
    stale = record_headings(doc_lines()) - written_record_types()
    assert not stale, f"{DOC.name} documents record types nothing writes any more: {sorted(stale)}"


# -- a real run --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(start_run: Callable[..., Any]) -> Path:
    """A real ``blipmon run tiny/blip2-opt`` (4 optimizer steps of batch 4 on the CPU), finished."""
    done = start_run("tiny/blip2-opt").finish()
    assert done.returncode == 0, done.stderr
    assert done.run_dir is not None
    return done.run_dir


@pytest.fixture(scope="module")
def watched_run(run_cli: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``blipmon watch`` of a Python process that lives half a second (a few ticks at 10 Hz)."""
    out = tmp_path_factory.mktemp("watch")
    done = run_cli("watch", "--out", out, "--", sys.executable, "-c", "import time; time.sleep(0.5)")
    assert done.returncode == 0, done.stderr
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def summary_of(run_cli: Callable[..., Any], run_dir: Path) -> dict[str, Any]:
    done = run_cli("show", run_dir, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
def test_the_records_of_real_runs_are_all_found_by_the_scan(tiny_run: Path, watched_run: Path) -> None:
    kinds = {e["type"] for d in (tiny_run, watched_run, DDP_FIXTURE) for e in read_events(d / "events.jsonl")}
    # What a CPU train run, a watched command and a two-rank run must write, whatever else they add.
    assert {"header", "config", "environment", "sample", "load", "plan", "phase", "step", "end", "exit"} <= kinds
    assert {"watch", "proc", "tree", "rank_start", "rank_load", "rank_plan", "rank_step"} <= kinds
    missed = kinds - written_record_types()
    assert not missed, f"real runs wrote record types the source scan did not find: {sorted(missed)}"


@pytest.mark.slow
def test_every_field_of_every_record_of_real_runs_is_named_in_its_section(tiny_run: Path, watched_run: Path) -> None:
    lines = doc_lines()
    missing: dict[str, set[str]] = {}
    for run_dir in (tiny_run, watched_run, DDP_FIXTURE):
        for ev in read_events(run_dir / "events.jsonl"):
            kind = ev["type"]
            documented = named(section(lines, f"### `{kind}`"))
            if kind == "prediction":  # its fields are the estimate JSON's
                documented |= named(section(lines, "## The estimate JSON (`blipmon estimate --json`)"))
            extra = set(ev) - {"type", "t"} - documented
            if extra:
                missing.setdefault(kind, set()).update(extra)
    assert not missing, (
        f"fields real runs write that {DOC.name} does not name: { {k: sorted(v) for k, v in missing.items()} }"
    )


@pytest.mark.slow
def test_every_top_level_summary_key_is_a_row_of_the_summary_table(
    tiny_run: Path, watched_run: Path, run_cli: Callable[..., Any]
) -> None:
    lines = section(doc_lines(), SUMMARY_HEADING)
    rows = first_table_keys(lines)
    summaries = [summary_of(run_cli, d) for d in (tiny_run, watched_run, DDP_FIXTURE)]
    real_keys = set().union(*(s.keys() for s in summaries))
    # The summary's fixed keys, and the multi-rank addition the two-rank fixture must carry.
    fixed = {"format_version", "name", "status", "config", "environment", "load", "phases", "steps", "peaks", "oom",
             "exit"}  # fmt: skip
    assert fixed <= set(summaries[0]) and "rank_steps" in summaries[2]
    assert real_keys - rows == set(), (
        f"summary keys missing from {DOC.name}'s summary table: {sorted(real_keys - rows)}"
    )
    assert rows - real_keys == set(), f"rows of the summary table no real summary has: {sorted(rows - real_keys)}"


@pytest.mark.slow
def test_every_nested_summary_key_is_named_in_the_summary_section(tiny_run: Path, run_cli: Callable[..., Any]) -> None:
    documented = named(section(doc_lines(), SUMMARY_HEADING))
    summaries = [summary_of(run_cli, d) for d in (tiny_run, DDP_FIXTURE)]
    nested: set[str] = set()
    for s in summaries:
        for key in ("environment", "load", "peaks", "exit"):
            nested |= set(s[key] or {})
        for key in ("phases", "steps", "rank_steps"):
            for item in s.get(key) or []:
                nested |= set(item)
    assert summaries[0]["phases"] and summaries[0]["steps"] and summaries[0]["load"]
    missing = nested - documented
    assert not missing, f"nested summary keys {DOC.name} does not name in its summary section: {sorted(missing)}"
