"""The launcher's memory estimate for the selected configuration, computed off the UI thread.

An estimate takes a few seconds (a fake-tensor training step, or a load's placement), so it runs in a thread
worker; a newer configuration cancels the older one, and the panel says "estimating" meanwhile. The verdict is
``estimate.judge``'s, the one ``blipmon estimate`` prints, for every job kind: an ``h100/*``/``a100/*`` preset
without a GPU here is judged against the lab's card there. Any other GPU configuration on a machine without a
GPU is judged against an 80 GB H100, the seed lab's card (79.11 GiB as torch reports it), and the panel says so.
"""

from __future__ import annotations

import os
from typing import Any

from rich.text import Text
from textual import work
from textual.widgets import Static

from blipmon.core.presets import LAB_CARD_BYTES
from blipmon.core.safe_text import printable
from blipmon.core.units import fmt_bytes

LAB_CARD = LAB_CARD_BYTES["h100"]


def estimate_text(cfg: dict[str, Any] | None) -> str:
    """What the panel shows before (or instead of) an estimate."""
    if cfg is None:
        return "estimate: fix the settings above first"
    if os.environ.get("BLIPMON_PREDICT", "1") == "0":
        return "estimate: off (BLIPMON_PREDICT=0)"
    return "estimate: estimating…"


def describe(judgement: Any, assumed_card: bool) -> str:
    """The verdict line, then one line per device (its peak, what it is judged against, its verdict).

    ``assumed_card``: no GPU here and none given, so the GPU was judged against the lab's H100.
    """
    j = judgement
    cap = j.capacity_bytes
    where = (
        f"an 80 GB card, {fmt_bytes(cap)} (no GPU here)" if assumed_card else f"{fmt_bytes(cap)} ({j.capacity_source})"
    )
    est = j.estimate
    at = f" at step {est.peak_step} {est.peak_phase}" if hasattr(est, "peak_step") else ""
    if j.verdict == "fits":
        head = f"estimate: FITS — peak {fmt_bytes(j.peak_bytes)}{at} on {j.device} against {where}"
    else:
        runs_out = getattr(est, "runs_out_text", None)
        place = runs_out() if callable(runs_out) and est.runs_out is not None else j.limiting_device
        head = f"estimate: OUT OF MEMORY at {place} — peak {fmt_bytes(j.peak_bytes)} on {j.device} against {where}"
    lines = [f"{head} ({j.seconds:.1f} s)"]
    judged = [d for d in j.judged if d.capacity_bytes is not None]
    if not hasattr(est, "peak_step") or len(judged) > 1:  # a load's split, or several devices judged
        lines += [f"  {line}" for line in j.device_lines()]
    return "\n".join(lines)


class EstimatePanel(Static):
    """The estimate lines; plain text always (a failed estimate quotes an error, a config value, a path)."""

    def show_text(self, text: str) -> None:
        self.update(Text("\n".join(printable(line) for line in text.split("\n"))))

    def show_config(self, cfg: dict[str, Any] | None) -> None:
        text = estimate_text(cfg)
        self.show_text(text)
        if cfg is not None and text.endswith("estimating…"):
            self._estimate(cfg)

    @work(thread=True, exclusive=True, group="estimate")
    def _estimate(self, cfg: dict[str, Any]) -> None:
        self.app.call_from_thread(self.show_text, estimate_lines(cfg))


def estimate_lines(cfg: dict[str, Any]) -> str:
    """The panel's text for ``cfg``: judged as ``blipmon estimate`` judges it, never an exception."""
    from blipmon.core.errors import ConfigError
    from blipmon.estimate.judge import judge

    try:
        try:
            judgement, assumed = judge(cfg), False
        except ConfigError:  # a GPU configuration with no GPU here: judge it against the lab's card
            judgement, assumed = judge(cfg, gpu_memory=LAB_CARD), True
        return describe(judgement, assumed)
    except Exception as e:  # the estimate hits the same error the run would: say so, never crash
        first = str(e).splitlines()[0][:160] if str(e).strip() else type(e).__name__
        return f"estimate: not available ({first})"
