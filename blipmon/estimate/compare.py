"""Predicted beside measured: pair a saved prediction with a run's summary, phase by phase."""

from __future__ import annotations

from typing import Any

CATEGORIES = ("params", "grads", "optim", "acts")


def predicted_vs_measured(prediction_json: dict[str, Any], run_summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{"step", "phase", "category", "predicted", "measured", "error"}`` for show and compare.

    ``prediction_json`` is ``Estimate.to_json()`` (as saved when the run started); ``run_summary`` is the fixed
    run summary (``blipmon show RUN --json``). Each predicted phase is paired with the run's record of the same
    step and phase at the step's last micro-step (rank 0), where accumulated gradients coexist with the forward.
    Categories are params, grads, optim, acts and ``total``: the predicted interval peak against the allocator's
    ``peak`` where the run has one (CUDA; the largest over the step's micro-steps, as predicted); on the CPU, where
    no allocator peak exists, ``total`` is the sum of the four categories on both sides. ``measured`` is None when the run has no such record (it stopped earlier,
    or went out of memory before it); ``error`` is (predicted - measured) / measured, None when undefined.
    """
    measured: dict[tuple[int, str], dict[str, Any]] = {}
    peaks: dict[tuple[int, str], int] = {}
    for rec in run_summary.get("phases") or []:
        if (rec.get("rank") or 0) != 0:
            continue
        key = (int(rec.get("step", -1)), str(rec.get("phase")))
        have = measured.get(key)
        if have is None or int(rec.get("micro_step") or 0) >= int(have.get("micro_step") or 0):
            measured[key] = rec
        if isinstance(rec.get("peak"), int):
            peaks[key] = max(peaks.get(key, 0), rec["peak"])
    rows: list[dict[str, Any]] = []
    for pred in prediction_json.get("phases") or []:
        step, phase = int(pred["step"]), str(pred["phase"])
        rec = measured.get((step, phase))
        for cat in CATEGORIES:
            m = None if rec is None else rec.get(cat)
            rows.append(_row(step, phase, cat, int(pred[cat]), m))
        if (step, phase) in peaks:
            rows.append(_row(step, phase, "total", int(pred["total"]), peaks[(step, phase)]))
        else:
            p_sum = sum(int(pred[c]) for c in CATEGORIES)
            m_sum = None if rec is None else sum(int(rec.get(c) or 0) for c in CATEGORIES)
            rows.append(_row(step, phase, "total", p_sum, m_sum))
    return rows


def _row(step: int, phase: str, category: str, predicted: int, measured: Any) -> dict[str, Any]:
    m = int(measured) if isinstance(measured, (int, float)) and not isinstance(measured, bool) else None
    err = None if m is None or m == 0 else (predicted - m) / m
    if m == 0 and predicted == 0:
        err = 0.0
    return {"step": step, "phase": phase, "category": category, "predicted": predicted, "measured": m, "error": err}


def render_predicted_vs_measured(rows: list[dict[str, Any]], *, unit: str = "MiB") -> str:
    """A plain-text table of ``predicted_vs_measured`` rows, one line per step and phase (for ``show``)."""
    div = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]
    by_phase: dict[tuple[int, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_phase.setdefault((r["step"], r["phase"]), {})[r["category"]] = r

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "—"
        pred = f"{r['predicted'] / div:.2f}"
        if r["measured"] is None:
            return f"{pred}/—"
        return f"{pred}/{r['measured'] / div:.2f}"

    head = ["step", "phase", *(f"{c} (pred/meas)" for c in (*CATEGORIES, "total"))]
    table = [head]
    for (step, phase), cats in by_phase.items():
        table.append([str(step), phase, *(cell(cats.get(c)) for c in (*CATEGORIES, "total"))])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [f"predicted / measured ({unit})"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    return "\n".join(lines) + "\n"


def render_verdict_line(prediction_json: dict[str, Any], *, on_gpu: bool, oom: dict[str, Any] | None) -> str:
    """What the saved estimate said beside what happened: the verdict, where it would run out, where it did.

    The saved JSON is the ``estimate --json`` object, so where a run would run out is recomputed from it: the first
    phase whose interval peak plus the overheads exceeds the capacity. A CUDA prediction carries its overheads
    (``overheads.total``); one saved before they existed gets the CUDA context alone.
    """
    from blipmon.estimate.timeline import CPU_RUNTIME_BYTES, CUDA_RUNTIME_BYTES, INTERVAL

    gib = 1024**3
    cap = int(prediction_json.get("gpu_memory_bytes") or 0)
    phases = [p for p in prediction_json.get("phases") or [] if isinstance(p, dict)]
    peak = max(phases, key=lambda p: int(p.get("total") or 0), default=None)
    line = f"estimate {prediction_json.get('verdict')} against {cap / gib:.1f} GiB"
    if peak is not None:
        line += f"; predicted peak at step {peak.get('step')} {peak.get('phase')}"
    overheads = prediction_json.get("overheads")
    saved_total = overheads.get("total") if isinstance(overheads, dict) else None
    if on_gpu and isinstance(saved_total, int) and not isinstance(saved_total, bool) and saved_total >= 0:
        limit = cap - saved_total
    else:
        limit = cap - (CUDA_RUNTIME_BYTES if on_gpu else CPU_RUNTIME_BYTES)
    first = next((p for p in phases if int(p.get("total") or 0) > limit), None)
    if prediction_json.get("verdict") == "oom" and first is not None:
        phase = str(first.get("phase"))
        line += f"; predicted to run out at step {first.get('step')} {phase} ({INTERVAL.get(phase, phase)})"
    if oom:
        line += f"; the run ran out at step {oom.get('step')} {oom.get('phase')}"
    return line + "\n"


def predict_for_run(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The prediction a run saves when it starts (``Estimate.to_json()``), or None when none can be made.

    Judged against this machine: its GPU when the run will use one, else available host memory. Never raises: a
    run must start even when its estimate cannot be made (an unsupported model, no memory figure).
    """
    try:
        from blipmon.estimate.timeline import estimate

        return estimate(cfg).to_json()
    except Exception:  # noqa: BLE001 - best effort by design
        return None
