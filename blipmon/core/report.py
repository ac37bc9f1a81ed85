"""Text for people: ``show``'s summary of one run and ``compare``'s table of several.

Both print what a profile says (a run's name, an error message, notes, a GPU's name, the folder),
and a profile is anyone's file: every line goes out through ``safe_text.one_line``, so an escape
sequence in a name cannot retitle or clear the terminal ``show`` prints to. JSON needs nothing
(``json.dumps`` writes control characters as ``\\u001b``).

The comparison is computed once as rows of raw numbers (``compare_rows``) and only then rendered as
a terminal table, markdown, CSV or JSON, so every format — and the dashboard's compare screen —
shows the same figures.

The per-module tables (``show --modules``, ``compare --modules``, the modules under an out-of-memory outcome;
figures from ``core/module_view.py``) are here too. Why one module over ~500 lines: they are the same two
commands' text in the same four formats, built with the same cell formatting, deltas and alignment; apart,
``show`` and ``show --modules`` would drift in how they print a byte count or a change.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from blipmon.core.module_view import (
    ROOT,
    ROOT_LABEL,
    Boundary,
    ModuleDiff,
    ModuleNode,
    boundary_of,
    build_tree,
    run_module_diffs,
    walk,
)
from blipmon.core.modules import MODULE_CATEGORIES
from blipmon.core.run import CATEGORIES, PHASES, RunData, peak_record, phase_total
from blipmon.core.safe_text import one_line
from blipmon.core.units import GIB, MIB, fmt_bytes, fmt_seconds


@dataclass(frozen=True)
class Row:
    label: str
    values: list[Any]
    kind: str  # "bytes" | "seconds" | "rate" | "text" | "count"
    better: str | None = None  # "lower" | "higher" | None

    def best_index(self) -> int | None:
        nums = [(v, i) for i, v in enumerate(self.values) if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if self.better is None or len(nums) < 2 or len({v for v, _ in nums}) < 2:
            return None
        return (min(nums) if self.better == "lower" else max(nums))[1]

    def cell(self, i: int) -> str:
        """Run ``i``'s value as the table shows it, with its change against run 0 after the first run.

        One line with no control characters: text rows (status, device, where it ran out) are the
        profiles' own words. The CLI's table and the dashboard's compare view both show this text.
        """
        v = self.values[i]
        return one_line(_fmt(v, self.kind) + (_delta(v, self.values[0], self.kind) if i else ""))


def median_step_seconds(run: RunData) -> float | None:
    """Steady-state step time: the first step pays for allocator warm-up and lazy init, so skip it."""
    return median_seconds(run.steps)


def median_seconds(steps: list[dict[str, Any]]) -> float | None:
    """The median ``seconds`` of step records, the first one left out (warm-up), as ``median_step_seconds``."""
    secs = [s["seconds"] for s in steps if isinstance(s.get("seconds"), (int, float))]
    if len(secs) > 1:
        secs = secs[1:]
    return statistics.median(secs) if secs else None


def median_rate(run: RunData) -> float | None:
    rates = [s["samples_per_s"] for s in run.steps if isinstance(s.get("samples_per_s"), (int, float))]
    if len(rates) > 1:
        rates = rates[1:]
    return statistics.median(rates) if rates else None


def run_warnings(run: RunData) -> list[str]:
    """The run's warnings (``RunData.warnings``: the reader's corrupt lines) and, where per-module records were read
    and some were unreadable, that too (``ModuleRecords.unreadable``), named by the run's folder as the reader's
    are. ``show`` and ``compare`` print these on stderr, and ``show``'s text lists them."""
    out = list(run.warnings)
    bad = run.modules.unreadable()
    if bad:
        out.append(f"{run.path}: {bad}" if run.path else bad)
    return out


def oom_where(run: RunData) -> str:
    if not run.oom:
        return ""
    o = run.oom
    req = o.get("requested_bytes")
    size = f", tried {fmt_bytes(req)}" if req else ""
    return f"step {o.get('step')} {o.get('phase')}{size}{_oom_module(o)}"


def _oom_module(o: dict[str, Any]) -> str:
    """`` in language_model.model.decoder (backward)``: the module running when it ran out (issue 12), or ""."""
    mod = o.get("module")
    if not isinstance(mod, str):
        return ""
    how = f" ({o['module_pass']})" if isinstance(o.get("module_pass"), str) else ""
    return f" in {ROOT_LABEL if mod == ROOT else mod}{how}"


def compare_rows(runs: list[RunData]) -> list[Row]:
    peaks = [r.peaks() for r in runs]
    peak_phases = [r.peak_phase() for r in runs]
    rows = [
        Row("status", [r.status for r in runs], "text"),
        Row("device", [r.environment.get("gpu_name") or r.environment.get("device", "?") for r in runs], "text"),
        Row("peak allocated", [p["allocated"] for p in peaks], "bytes", "lower"),
        Row("peak reserved", [p["reserved"] for p in peaks], "bytes", "lower"),
        Row("peak device used", [p["device_used"] for p in peaks], "bytes", "lower"),
        Row("peak host RSS", [p["host_rss"] for p in peaks], "bytes", "lower"),
    ]
    for cat in ("params", "grads", "optim", "acts"):
        rows.append(Row(f"{cat} @ peak phase", [pp.get(cat) if pp else None for pp in peak_phases], "bytes", "lower"))
    rows += [
        Row("peak phase", [_where(pp) for pp in peak_phases], "text"),
        Row("step time (median)", [median_step_seconds(r) for r in runs], "seconds", "lower"),
        Row("samples/s (median)", [median_rate(r) for r in runs], "rate", "higher"),
        Row("steps", [len(r.steps) for r in runs], "count"),
        Row("load time", [r.load.get("seconds") if r.load else None for r in runs], "seconds", "lower"),
        Row("out of memory at", [oom_where(r) for r in runs], "text"),
        Row("predicted peak", [_pred(r, "peak_bytes") for r in runs], "bytes"),
        Row("predicted peak phase", [_pred(r, "peak_phase") or "" for r in runs], "text"),
        Row("predicted verdict", [_pred(r, "verdict") or "" for r in runs], "text"),
    ]
    if any(_last_offload(r) is not None for r in runs):
        i = next(i for i, row in enumerate(rows) if row.label == "acts @ peak phase") + 1
        rows.insert(i, Row("optim on host @ peak phase", [_host(pp, "optim_host") for pp in peak_phases], "bytes"))
        rows.insert(i + 1, Row("grads on host @ peak phase", [_host(pp, "grads_host") for pp in peak_phases], "bytes"))
    if any(len(ranks_of(r)) > 1 for r in runs):
        rows.insert(2, Row("ranks", [len(ranks_of(r)) for r in runs], "count"))
        rows.insert(3, Row("peak phase total, max over ranks", [_max_rank_total(r) for r in runs], "bytes", "lower"))
    return rows


def _host(phase: dict[str, Any] | None, key: str) -> int | None:
    return phase.get(key) if phase else None


def _last_offload(run: RunData) -> dict[str, Any] | None:
    """The newest phase record with the host share of offloaded state (only those counted in full carry it)."""
    return next((p for p in reversed(run.phases) if p.get("optim_host") is not None), None)


def _offload_line(run: RunData) -> list[str]:
    """The lab's "Optim CPU" beside "Optim GPU": where an offloading strategy put the optimizer and gradients."""
    last = _last_offload(run)
    if last is None:
        return []
    host_o, host_g = last.get("optim_host") or 0, last.get("grads_host") or 0
    dev_o, dev_g = (last.get("optim") or 0) - host_o, (last.get("grads") or 0) - host_g
    return [
        f"offload  at the last phase: optimizer state {fmt_bytes(host_o)} on the host, {fmt_bytes(dev_o)} on the device;"
        f" gradients {fmt_bytes(host_g)} on the host, {fmt_bytes(dev_g)} on the device"
    ]


def _pred(run: RunData, key: str) -> Any:
    """A field of the estimate the run saved when it started (data only; None when it saved none)."""
    return run.prediction.get(key) if isinstance(run.prediction, dict) else None


def ranks_of(run: RunData) -> list[int]:
    return sorted({int(p.get("rank") or 0) for p in run.phases}) or [0]


def rank_peaks(run: RunData) -> dict[int, dict[str, Any]]:
    """Each rank's highest phase record counted in full (``peak_record``): DDP ranks can differ (rank 0 often
    holds more)."""
    by_rank: dict[int, list[dict[str, Any]]] = {}
    for p in run.phases:
        by_rank.setdefault(int(p.get("rank") or 0), []).append(p)
    return {r: rec for r, recs in by_rank.items() if (rec := peak_record(recs)) is not None}


def _max_rank_total(run: RunData) -> int | None:
    """The highest phase total of any rank at any step, counted in full or not."""
    return max((phase_total(p) for p in run.phases), default=None)


def _where(pp: dict[str, Any] | None) -> str:
    if not pp:
        return ""
    rank = f" rank {pp['rank']}" if pp.get("rank") else ""
    return f"step {pp['step']} {pp['phase']}{rank}"


def _fmt(v: Any, kind: str) -> str:
    if v is None or v == "":
        return "—" if kind != "text" else ""
    if kind == "bytes":
        return fmt_bytes(v)
    if kind == "seconds":
        return fmt_seconds(v)
    if kind == "rate":
        return f"{v:,.1f}"
    return str(v)


def _delta(v: Any, base: Any, kind: str) -> str:
    if (
        kind not in ("bytes", "seconds", "rate")
        or not isinstance(v, (int, float))
        or not isinstance(base, (int, float))
    ):
        return ""
    if base == 0:
        return ""
    pct = (v - base) / base * 100
    return "" if abs(pct) < 0.05 else f" ({pct:+.1f}%)"


def render_compare(runs: list[RunData], fmt: str = "table", *, modules: bool = False) -> str:
    """``compare``'s output. ``modules`` (``--modules``): JSON gains a ``modules`` key; the text formats print the
    per-module comparison instead of the table (CSV holds one table)."""
    if modules and fmt != "json":
        return render_module_compare(runs, fmt)
    rows = compare_rows(runs)
    names = [one_line(r.name) for r in runs]
    if fmt == "json":
        doc: dict[str, Any] = {
            "runs": [{"name": r.name, "path": str(r.path) if r.path else None} for r in runs],
            "rows": [
                {"label": row.label, "kind": row.kind, "better": row.better, "values": row.values} for row in rows
            ],
        }
        if modules:
            doc["modules"] = module_compare_json(runs)
        return json.dumps(doc, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["metric", *names])
        for row in rows:
            w.writerow(
                [row.label, *("" if v is None else one_line(v) if isinstance(v, str) else v for v in row.values)]
            )
        return buf.getvalue()
    table: list[list[str]] = []
    for row in rows:
        best = row.best_index()
        cells = []
        for i in range(len(row.values)):
            text = row.cell(i)
            if best == i:
                text = f"**{text}**" if fmt == "markdown" else f"{text} *"
            cells.append(text)
        table.append([row.label, *cells])
    header = ["", *names]
    if fmt == "markdown":
        lines = [
            "| " + " | ".join(c.replace("|", "\\|") for c in header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in table]
        return "\n".join(lines) + "\n\n" + _legend(markdown=True) + "\n"
    return _aligned([header, *table]) + "\n" + _legend(markdown=False) + "\n"


def _legend(markdown: bool) -> str:
    mark = "**bold**" if markdown else "*"
    return f"{mark} = best of the row; (±%) = change against the first run; — = not measured on that device"


def cells(text: str) -> int:
    """How many terminal columns ``text`` takes: East Asian wide and full-width characters two, combining marks
    and format characters (zero-width joiners, bidi marks) none, the rest one.

    Tables are aligned on this, not on ``len``: a module or run name from a profile can hold ``模型`` or a
    combining accent, and ``ljust`` by characters would push every cell after it out of its column. Core needs
    only the standard library (docs/architecture.md), so this is ``unicodedata`` rather than rich's ``cell_len``;
    it agrees with it on the characters a name holds (not on emoji sequences, which no module is named with).
    """
    if text.isascii():
        return len(text)
    n = 0
    for ch in text:
        if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
            continue
        n += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return n


def _ljust(text: str, width: int) -> str:
    return text + " " * max(width - cells(text), 0)


def _rjust(text: str, width: int) -> str:
    return " " * max(width - cells(text), 0) + text


def _aligned(rows: list[list[str]]) -> str:
    """Left-aligned columns two spaces apart, on the cells as displayed (``one_line``'d, display width)."""
    rows = [[one_line(c) for c in r] for r in rows]
    widths = [max(cells(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(_ljust(c, w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _unit_for(values: list[int | None]) -> tuple[str, int]:
    top = max((v for v in values if v is not None), default=0)
    return ("GiB", GIB) if top >= GIB else ("MiB", MIB)


def _host_share_line(placement: dict[str, Any]) -> list[str]:
    """A device map with CPU (or disk) parts: how much of the model the GPUs do not hold (seed 001's question)."""
    sizes = {d: b for d, b in placement.items() if isinstance(b, int) and not isinstance(b, bool)}
    gpu = sum(b for d, b in sizes.items() if str(d).startswith("cuda"))
    off = {d: b for d, b in sizes.items() if d in ("cpu", "disk")}
    total = gpu + sum(off.values())
    if not gpu or not off or not total:
        return []
    parts = ", ".join(f"{fmt_bytes(b)} on {'the host' if d == 'cpu' else 'disk'}" for d, b in off.items())
    return [f"offload  {parts}: {100 * sum(off.values()) / total:.0f} % of the parameters are off the GPU"]


def render_show(run: RunData) -> str:
    """The readable summary: outcome, load, the four phases of the first steps and of the peak step."""
    cfg, env = run.config, run.environment
    lines: list[str] = []
    device = env.get("gpu_name") or ("CPU (" + env.get("gpu_reason", "no NVIDIA GPU") + ")")
    if env.get("gpu_total_bytes"):
        device += f", {fmt_bytes(env['gpu_total_bytes'])}"
    lines.append(f"run      {run.name}   [{run.status}]")
    if run.path:
        lines.append(f"path     {run.path}")
    lines.append(f"device   {device}")
    m, t = cfg.get("model", {}), cfg.get("train", {})
    weights = run.load.get("weights") if run.load else m.get("weights")
    note = "  (random weights: losses are meaningless, memory is real)" if weights == "random" else ""
    lines.append(f"model    {m.get('id', '?')}{note}")
    if cfg.get("job", {}).get("kind") == "train":
        lora = " lora" if t.get("lora", {}).get("enabled") else ""
        qlora = " qlora" if t.get("qlora") else ""
        ckpt = " act-ckpt" if t.get("act_ckpt") else ""
        lines.append(
            f"train    batch {t.get('batch_size')} x accumulate {t.get('accumulate_grad_batches')}, "
            f"{t.get('precision')}, {t.get('optim')}{ckpt}{lora}{qlora}"
        )
        if run.plan.get("trainable_params") is not None:
            lines.append(
                f"params   {run.plan['trainable_params']:,} trainable of {run.plan.get('total_params') or 0:,}"
            )
    else:
        lines.append(f"job      {cfg.get('job', {}).get('kind', '?')}")
    if run.load:
        placement = run.load.get("placement") or {}
        place = ", ".join(f"{d} {fmt_bytes(b)}" for d, b in placement.items())
        lines.append(
            f"load     {fmt_seconds(run.load.get('seconds'))}, parameters {fmt_bytes(run.load.get('params_bytes'))} ({place})"
        )
        lines.extend(_host_share_line(placement))
    lines.extend(_phase_table(run))
    lines.extend(_offload_line(run))
    lines.extend(_rank_table(run))
    if run.steps:
        last = run.steps[-1]
        loss = last.get("loss")
        lines.append(
            f"steps    {len(run.steps)}" + (f"/{run.plan['total_steps']}" if run.plan.get("total_steps") else "")
            + f", median {fmt_seconds(median_step_seconds(run))} per step (first {fmt_seconds(run.steps[0].get('seconds'))}),"
            + f" {median_rate(run) or 0:,.1f} samples/s" + (f", last loss {loss:.4f}" if isinstance(loss, (int, float)) else "")
        )  # fmt: skip
    for g in run.generate:
        lines.append(
            f"generate call {g.get('call')}: {fmt_seconds(g.get('seconds'))} for {g.get('batch_size')} images, "
            f"peak {fmt_bytes(g.get('peak'))}, host {fmt_bytes(g.get('host_rss'))}"
        )
    pk = run.peaks()
    lines.append(
        f"peaks    allocated {fmt_bytes(pk['allocated'])}, reserved {fmt_bytes(pk['reserved'])}, "
        f"device used {fmt_bytes(pk['device_used'])}, host RSS {fmt_bytes(pk['host_rss'])}"
    )
    lines.append("outcome  " + _outcome(run))
    lines.extend(_oom_module_lines(run))
    for n in run.notes:
        lines.append(f"note     {n}")
    for w in run_warnings(run):
        lines.append(f"warning  {w}")
    return "\n".join(one_line(line) for line in lines) + "\n"


def _outcome(run: RunData) -> str:
    st = run.status
    ex = run.exit or {}
    code = (
        f"exit {ex.get('code')}" if ex.get("code") is not None else f"signal {ex['signal']}" if ex.get("signal") else ""
    )
    text = {"ok": "finished", "oom": "OUT OF MEMORY", "error": "failed with an error", "stopped": "stopped",
            "killed": "killed", "running": "still running"}.get(st, st)  # fmt: skip
    if run.oom:
        o = run.oom
        text += f" at step {o.get('step')} (micro-step {o.get('micro_step')}, {o.get('phase')}){_oom_module(o)}"
        if o.get("requested_bytes"):
            text += f" trying to allocate {fmt_bytes(o['requested_bytes'])}"
        if o.get("device"):
            text += f" on {o['device']}"
            if o.get("device_free") is not None:
                text += f" ({fmt_bytes(o['device_free'])} free of {fmt_bytes(o.get('device_limit'))})"
    if run.error and st == "error":
        text += f": {str(run.error.get('message', ''))[:300]}"
    return text + (f" ({code})" if code else "")


def _phase_table(run: RunData) -> list[str]:
    if not run.phases:
        return []
    first_steps = {0, 1}
    chosen = [p for p in run.phases if p.get("step") in first_steps and (p.get("rank") or 0) == 0]
    peak = run.peak_phase()
    if peak is not None and peak.get("step") not in first_steps:
        chosen += [p for p in run.phases if p.get("step") == peak.get("step") and p.get("rank") == peak.get("rank")]
    cols = [*CATEGORIES, "allocated", "peak", "reserved", "host_rss"]
    unit, div = _unit_for([p.get(c) for p in chosen for c in cols])
    header = ["step", "micro", "phase", *cols]
    rows = [header]
    for p in chosen:
        mark = " <- peak" if p is peak else ""
        rows.append(
            [str(p.get("step")), str(p.get("micro_step")), str(p.get("phase"))]
            + ["—" if p.get(c) is None else f"{p[c] / div:.3f}" for c in cols]
            + ([mark] if mark else [])
        )
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    out = [f"phases   ({unit}; the first two steps and the peak step; peak = allocator peak since the previous phase)"]
    out += ["  " + line for line in _aligned(rows).splitlines()]
    return out


def _rank_table(run: RunData) -> list[str]:
    peaks = rank_peaks(run)
    if len(peaks) < 2:
        return []
    out = [f"ranks    {len(peaks)}; each rank's peak phase (the run's peak is the maximum across ranks) and step time:"]
    top = max((p for _, p in sorted(peaks.items())), key=phase_total)
    for rank, p in sorted(peaks.items()):
        cats = ", ".join(f"{c} {fmt_bytes(p.get(c))}" for c in ("params", "grads", "optim", "acts"))
        mark = "  <- max" if p is top else ""
        # Every rank waits for the slowest at each all-reduce, so a rank much faster than the others
        # is the one waiting: the gap is where a straggler shows.
        steps = run.steps_of(rank)
        secs = f", median step {fmt_seconds(median_seconds(steps))} ({len(steps)} steps)" if steps else ", no steps"
        out.append(f"  rank {rank}: {fmt_bytes(phase_total(p))} at step {p['step']} {p['phase']} ({cats}){secs}{mark}")
    return out


# -- per-module memory (issue 12; the figures: core/module_view.py) ---------------------------------------------------
MODULE_COLUMNS = (*MODULE_CATEGORIES, "total")
OOM_TOP_MODULES = 5  # the root's largest children shown under an out-of-memory outcome
MODULES_NOTE = "bytes; each module's figures include its children's"


def _signed(n: int) -> str:
    return ("+" if n > 0 else "−" if n < 0 else "±") + fmt_bytes(abs(n))


def _right_aligned(rows: list[list[str]], *, text_last: bool = False) -> list[str]:
    """The first column left-aligned (names), the others right-aligned (figures); the last one left-aligned too
    when it is words (``text_last``).

    Widths are measured on the text as it is displayed: every cell is ``one_line``'d first (an escape sequence
    in a module's name is removed, a control character becomes ``^X``, both changing its length) and measured in
    terminal columns (``cells``), so a hostile or wide name cannot shift the figures after it.
    """
    rows = [[one_line(c) for c in r] for r in rows]
    widths = [max(cells(r[i]) for r in rows) for i in range(len(rows[0]))]
    left = {0, len(widths) - 1} if text_last else {0}
    return [
        "  ".join(
            _ljust(c, w) if i in left else _rjust(c, w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]


def module_table(nodes: Sequence[ModuleNode]) -> list[str]:
    """One boundary's tree as aligned lines: indented names, each category and the total, the prediction's total
    beside the measured one (with its error) where the run saved a per-module prediction."""
    with_pred = any(n.predicted is not None for n in nodes)
    rows = [["module", *MODULE_COLUMNS, *(["predicted"] if with_pred else [])]]
    for n in nodes:
        cells = ["  " * n.depth + n.label, *(fmt_bytes(getattr(n, c) if c == "total" else getattr(n.row, c))
                                             for c in MODULE_COLUMNS)]  # fmt: skip
        if with_pred:
            p = n.predicted
            cells.append("—" if p is None else fmt_bytes(p.total) + _delta(p.total, n.total, "bytes"))
        rows.append(cells)
    return _right_aligned(rows)


def render_modules(run: RunData, b: Boundary, nodes: Sequence[ModuleNode], why: str) -> str:
    """``show --modules``: the boundary named in a header line, then the tree as a table."""
    lines = [f"run      {run.name}   [{run.status}]", f"modules  {b.label()} ({why}); {MODULES_NOTE}"]
    lines += ["  " + line for line in module_table(nodes)]
    if any(n.predicted is not None for n in nodes):
        lines.append(
            "predicted: the estimate saved when the run started (its step 1 stands for every later step);"
            " (±%) against the measured total"
        )
    bad = run.modules.unreadable()
    if bad:  # the tree may lack a boundary or a step the user expects: say why beside it, not only on stderr
        lines.append(f"warning  {bad}")
    return "\n".join(one_line(line) for line in lines) + "\n"


def _oom_module_lines(run: RunData) -> list[str]:
    """Under an out-of-memory outcome: the modules at the last boundary before it, the root's largest children
    and the recorded modules on the way to the one that was running."""
    o = run.oom
    if not o or not run.modules:
        return []
    step, micro, rank = (o.get(k) if isinstance(o.get(k), int) else 0 for k in ("step", "micro_step", "rank"))
    rows = run.modules.last_before(step, micro, o.get("phase"), rank=rank)
    if not rows:
        return []
    b = boundary_of(rows[0])
    nodes = walk(build_tree(rows))
    top = [n for n in nodes if n.depth == 1][:OOM_TOP_MODULES]
    mod = o.get("module")
    keep = {ROOT} | {n.path for n in top}
    if isinstance(mod, str) and mod:
        keep |= {n.path for n in nodes if mod == n.path or mod.startswith(n.path + ".")}
    shown = [n for n in nodes if n.path in keep]
    more = sum(1 for n in nodes if n.depth == 1) - len(top)
    out = [f"modules  at {b.label()}, the last boundary before it ({MODULES_NOTE}):"]
    out += ["  " + line for line in module_table(shown)]
    if more > 0:
        out.append(f"  … {more} more at depth 1: blipmon show RUN --modules --step {b.step} --phase {b.phase}")
    return out


def module_changes(d: ModuleDiff, n_runs: int) -> str:
    """What differs from run 1, per category: ``acts −12.00 MiB, grads +1.00 KiB`` (run numbers for 3+ runs)."""
    if d.only_in:
        runs = ", ".join(str(i + 1) for i in d.only_in)
        return f"only in run{'s' if len(d.only_in) > 1 else ''} {runs}"
    parts = []
    for i in range(1, n_runs):
        cats = [f"{c} {_signed(v)}" for c in MODULE_CATEGORIES if (v := d.delta(i, c))]
        if cats:
            parts.append((f"{i + 1}: " if n_runs > 2 else "") + ", ".join(cats))
    return "; ".join(parts) or "same"


def _module_values(d: ModuleDiff, i: int) -> dict[str, int] | None:
    return None if d.rows[i] is None else {c: int(d.value(i, c) or 0) for c in MODULE_COLUMNS}


def module_compare_json(runs: list[RunData]) -> dict[str, Any]:
    """``compare --format json``'s ``modules``: each run's boundary, and every module's figures and changes."""
    bounds, diffs = run_module_diffs(runs)
    return {
        "boundaries": [None if b is None else b.to_json() for b in bounds],
        "rows": [
            {
                "module": d.path,
                "depth": d.depth,
                "changed": d.changed,
                "values": [_module_values(d, i) for i in range(len(runs))],
                "deltas": [
                    None
                    if i == 0 or d.rows[i] is None or d.rows[0] is None
                    else {c: d.delta(i, c) for c in MODULE_COLUMNS}
                    for i in range(len(runs))
                ],
            }  # fmt: skip
            for d in diffs
        ],
    }


def render_module_compare(runs: list[RunData], fmt: str = "table") -> str:
    """``compare --modules`` in a text format: per module, each run's total (change against run 1) and what
    changed per category. CSV is one row per module and run (its figures and their changes), as scripts read it."""
    bounds, diffs = run_module_diffs(runs)
    names = [one_line(r.name) for r in runs]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["module", "depth", "run", "name", *MODULE_COLUMNS, *(f"delta_{c}" for c in MODULE_COLUMNS)])
        for d in diffs:
            for i in range(len(runs)):
                if d.rows[i] is None:
                    continue
                deltas = ["" if i == 0 or d.rows[0] is None else d.delta(i, c) for c in MODULE_COLUMNS]
                w.writerow([one_line(d.path), d.depth, i + 1, names[i], *(d.value(i, c) for c in MODULE_COLUMNS),
                            *deltas])  # fmt: skip
        return buf.getvalue()
    where = " · ".join(f"{i + 1}. {b.label() if b else 'no module figures'}" for i, b in enumerate(bounds))
    head = [f"modules  compared at {where}; {MODULES_NOTE}; changes against run 1"]
    for i, b in enumerate(bounds):
        if b is None:  # by number, as the columns are: two runs can share a name
            why = runs[i].modules.unreadable() or "attribution off, or a profile before it"
            head.append(f"note     no module figures in run {i + 1} ({names[i]}): {why}")
    header = ["module", *(f"{i + 1}. {n} total" for i, n in enumerate(names)), "changed"]
    table = [header]
    for d in diffs:
        label = ("  " if fmt != "markdown" else "\u00a0\u00a0") * d.depth + (d.label if d.depth == 0 else
                                                                             d.path)  # fmt: skip
        cells = [one_line(label)]
        for i in range(len(runs)):
            v = d.value(i, "total")
            cells.append(one_line(_fmt(v, "bytes") + (_delta(v, d.value(0, "total"), "bytes") if i else "")))
        cells.append(module_changes(d, len(runs)))
        table.append(cells)
    if fmt == "markdown":
        lines = [
            "| " + " | ".join(c.replace("|", "\\|") for c in header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in table[1:]]
        return "\n".join([*(one_line(h) for h in head), "", *lines]) + "\n"
    return "\n".join([*(one_line(h) for h in head), *_right_aligned(table, text_last=True)]) + "\n"


def phase_order(phase: str) -> int:
    return PHASES.index(phase) if phase in PHASES else len(PHASES)


__all__ = [
    "Row",
    "compare_rows",
    "median_seconds",
    "median_step_seconds",
    "module_changes",
    "module_compare_json",
    "module_table",
    "phase_order",
    "phase_total",
    "render_compare",
    "render_module_compare",
    "render_modules",
    "render_show",
    "run_warnings",
]
