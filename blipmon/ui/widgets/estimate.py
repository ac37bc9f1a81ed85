"""The launcher's memory estimate for the selected configuration, computed off the UI thread.

An estimate takes a few seconds (a fake-tensor training step), so it runs in a thread worker; a
newer configuration cancels the older one, and the panel says "estimating" meanwhile. A GPU
configuration on a machine without a GPU is judged against an 80 GB H100, the seed lab's card (79.11 GiB as
torch reports it), and the panel says so.
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
    if cfg["job"]["kind"] != "train":
        return "estimate: for training jobs (see `blipmon models` for a model's load size)"
    if os.environ.get("BLIPMON_PREDICT", "1") == "0":
        return "estimate: off (BLIPMON_PREDICT=0)"
    return "estimate: estimating…"


def describe(est: Any, assumed_card: bool) -> str:
    data = est.to_json()
    cap = data["gpu_memory_bytes"]
    where = f"an 80 GB card, {fmt_bytes(cap)} (no GPU here)" if assumed_card else fmt_bytes(cap)
    if data["verdict"] == "fits":
        return (
            f"estimate: FITS — peak {fmt_bytes(data['peak_bytes'])} at step {est.peak_step} {data['peak_phase']} "
            f"against {where} ({data['seconds']:.1f} s)"
        )
    return (
        f"estimate: OUT OF MEMORY at {est.runs_out_text()} — peak {fmt_bytes(data['peak_bytes'])} against {where} "
        f"({data['seconds']:.1f} s)"
    )


class EstimatePanel(Static):
    """The estimate line; plain text always (a failed estimate quotes an error, a config value, a path)."""

    def show_text(self, text: str) -> None:
        self.update(Text(printable(text)))

    def show_config(self, cfg: dict[str, Any] | None) -> None:
        text = estimate_text(cfg)
        self.show_text(text)
        if cfg is not None and text.endswith("estimating…"):
            self._estimate(cfg)

    @work(thread=True, exclusive=True, group="estimate")
    def _estimate(self, cfg: dict[str, Any]) -> None:
        from blipmon.estimate import estimate

        try:
            try:
                est, assumed = estimate(cfg), False
            except Exception:  # a GPU configuration with no GPU here: judge it against the lab's card
                est, assumed = estimate(cfg, capacity_bytes=LAB_CARD, device="cuda"), True
            text = describe(est, assumed)
        except Exception as e:  # the estimate hits the same error the run would: say so, never crash
            text = f"estimate: not available ({str(e).splitlines()[0][:160]})"
        self.app.call_from_thread(self.show_text, text)
