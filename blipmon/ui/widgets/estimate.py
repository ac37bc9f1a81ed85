"""Where the launcher's memory estimate goes (the estimator lands in a later change).

The launcher calls ``EstimatePanel.show_config(cfg)`` with every valid configuration the user
edits; the estimator only has to fill ``estimate_text`` (or replace this widget). Until then it
says plainly that there is no estimate, rather than showing a made-up number.
"""

from __future__ import annotations

from typing import Any

from textual.widgets import Static


def estimate_text(cfg: dict[str, Any] | None) -> str:
    """The panel's text for a configuration; the hook the estimator will fill in."""
    if cfg is None:
        return "estimate: fix the settings above first"
    return "estimate: predicted per-phase memory is not available in this version yet"


class EstimatePanel(Static):
    def show_config(self, cfg: dict[str, Any] | None) -> None:
        self.update(estimate_text(cfg))
