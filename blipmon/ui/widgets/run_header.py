"""The run's header: name, status, device, elapsed time; progress with ETA (or the replay's playhead).

A multi-rank run also shows which rank the panels below are (``rank 1 of 2``, ``all 2 ranks``),
right after the mode, where it stays visible at 80 columns; a single-rank run shows nothing extra.
"""

from __future__ import annotations

from typing import Any

from rich.style import Style
from rich.text import Text
from textual.strip import Strip

from blipmon.core import timeline as tl
from blipmon.core.module_view import oom_text
from blipmon.core.ranks import RankView
from blipmon.core.safe_text import printable
from blipmon.core.snapshot import Snapshot
from blipmon.core.units import fmt_bytes
from blipmon.ui import theme
from blipmon.ui.widgets.base import LinesWidget, strip

_MODE = {"live": "live", "attach": "attached", "replay": "replay"}
RANK_STYLE = Style(color="#000000", bgcolor="#5fd7d7", bold=True)
STALL_STYLE = Style(color="#000000", bgcolor="#ffd75f", bold=True)


def device_text(env: dict[str, Any]) -> str:
    """GPU name and capacity, or CPU and why there is no GPU."""
    if not env:
        return "device: waiting for the child…"
    if env.get("device") == "cuda" and env.get("gpu_name"):
        return f"GPU {env['gpu_name']} ({fmt_bytes(env.get('gpu_total_bytes'))})"
    if env.get("gpu_name"):
        return f"CPU (GPU {env['gpu_name']} not used)"
    return "CPU · no NVIDIA GPU"


def bar(fraction: float, width: int) -> str:
    width = max(width, 1)
    fill = int(round(min(max(fraction, 0.0), 1.0) * width))
    return "█" * fill + "░" * (width - fill)


def header_lines(snap: Snapshot, width: int, rank_label: str = "", rank: int | None = None) -> list[Strip]:
    """The two header rows; ``rank_label`` (e.g. ``rank 1 of 2``) is shown only when not empty.

    ``rank``: the memory peaks are that rank's (its samples and phase records), as the timeline
    below is; ``None`` gives the whole run's.
    """
    status = snap.status
    line1: list[tuple[str, Style | None]] = [
        ("● ", theme.status_style(status)),
        (snap.name + "  ", theme.BOLD),
        (status.upper() if status in ("oom", "error", "killed") else status, theme.status_style(status)),
        (f"  [{_MODE.get(snap.mode, snap.mode)}]  ", theme.DIM),
    ]
    if rank_label:
        line1 += [(f" {rank_label} ", RANK_STYLE), ("  ", None)]
    line1 += [
        (f"elapsed {tl.fmt_clock(snap.now)}  ", None),
        (device_text(snap.environment), theme.DIM),
    ]
    done, total, eta = snap.progress()
    line2: list[tuple[str, Style | None]] = []
    if snap.stall is not None:  # first, where it is seen at 80 columns; the ETA would be a frozen guess
        line2 += [(f"⚠ {snap.stall.text()}", STALL_STYLE), ("  ", None)]
        eta = None
    if snap.replay is not None:
        r = snap.replay
        sym = "⏸" if r.paused else "▶"
        frac = r.position / r.duration if r.duration > 0 else 0.0
        line2 += [
            (f"{sym} {r.speed:g}×  ", Style(color="#5fafff", bold=True)),
            (f"{tl.fmt_clock(r.position)}/{tl.fmt_clock(r.duration)} ", None),
            (bar(frac, 16), Style(color="#5fafff")),
            ("  " if r.loaded >= 1 else f" reading {r.loaded:.0%}  ", theme.DIM),
        ]
    if total:
        pct = done / total
        line2 += [
            (f"step {done}/{total} ", None),
            (bar(pct, 14 if snap.replay is None else 10), Style(color=theme.STATUS_COLORS.get(status, "#5fafff"))),
            (f" {pct:4.0%}", None),
            (f"  ETA {tl.fmt_clock(eta)}" if eta is not None else "", theme.DIM),
            ("   ", None),
        ]
    elif snap.steps:
        line2.append((f"step {done}   ", None))
    pk = snap.peaks(rank)
    peak_parts = []
    if pk.get("allocated") is not None:
        peak_parts.append(f"alloc {fmt_bytes(pk['allocated'])}")
    if pk.get("reserved") is not None:
        peak_parts.append(f"res {fmt_bytes(pk['reserved'])}")
    if pk.get("device_used") is not None:
        peak_parts.append(f"dev {fmt_bytes(pk['device_used'])}")
    if pk.get("host_rss") is not None:
        peak_parts.append(f"host {fmt_bytes(pk['host_rss'])}")
    if peak_parts and width >= 120:  # narrower: the timeline's legend carries the peaks
        line2 += [("peak ", theme.BOLD), (" · ".join(peak_parts), None)]
    return [strip(line1, width), strip(line2, width)]


class RunHeader(LinesWidget):
    DEFAULT_CSS = """
    RunHeader { height: 2; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.snapshot: Snapshot | None = None
        self.rank_label = ""
        self.rank: int | None = None

    def show(self, snap: Snapshot, view: RankView | None = None) -> None:
        self.snapshot = snap
        self.rank_label = view.label() if view is not None else ""
        self.rank = view.sample_rank if view is not None else None
        self.set_data((snap.version, self.rank_label, self.rank))

    def build(self, width: int, height: int) -> list[Strip]:
        if self.snapshot is None:
            return []
        return header_lines(self.snapshot, width, self.rank_label, self.rank)[:height]


def banner_text(snap: Snapshot) -> str | None:
    """The OOM (or failure) banner, or None when there is nothing alarming to say.

    Plain text with the profile's words in it (an error message may hold ``[/INST]`` or an escape
    sequence): show it with ``banner_content``, never as markup.
    """
    o = snap.oom
    if o:
        req = o.get("requested_bytes")
        size = f", trying to allocate {fmt_bytes(req)}" if req else ""
        micro = f" (micro-step {o.get('micro_step')})" if o.get("micro_step") else ""
        where = oom_text(o)  # the module running when it failed, where the run recorded it (issue 12)
        return f"OUT OF MEMORY at step {o.get('step')}{micro}, phase {o.get('phase')}{size}" + (
            f", {where}" if where else ""
        )
    if snap.status == "error" and snap.error:
        return "FAILED: " + str(snap.error.get("message", ""))[:300]
    if snap.problem:
        return snap.problem
    return None


def banner_content(text: str) -> Text:
    """``banner_text`` as a widget shows it: plain text, control characters made visible."""
    return Text(printable(text))
