"""The launcher's fit view: a configuration's verdict, its largest batch, and the changes that make it fit.

Opened with ``f`` on the launcher's selected configuration (its settings as edited). The search
(``blipmon.estimate.fit``) runs in a process of its own (``runner/fit_process.FitRun``), followed by a thread
worker that only reads its events, so the interface never waits: the view shows each estimate as the search makes
it, then the result. ``enter`` on a suggestion closes the view with its changes, which the launcher applies to its
settings (ready to run with ``r``); ``escape`` closes it and stops a search still running.

Everything shown comes from a configuration (a saved run's is someone else's text) or an error message: it is
drawn as ``rich.text.Text``, never as markup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option

from blipmon.core.safe_text import one_line, printable
from blipmon.core.units import fmt_bytes


class Search(Protocol):
    """What the view needs of a running search (``FitRun``; tests give a scripted one)."""

    def events(self) -> Iterable[dict[str, Any]]: ...

    def stop(self) -> None: ...


def start_fit(cfg: dict[str, Any]) -> Search:
    from blipmon.runner.fit_process import FitRun

    return FitRun(cfg)


def changes_text(changes: dict[str, Any]) -> str:
    from blipmon.core.config_form import display_value

    return ", ".join(f"{k} = {display_value(v)}" for k, v in changes.items())


def suggestion_text(i: int, s: dict[str, Any]) -> Text:
    """One suggestion as plain text: the changes, the verdict with peak, headroom and effective batch, the notes."""
    text = Text.assemble((f"{i:2d}. ", "bold"), (one_line(changes_text(s.get("changes", {}))), "bold"))
    verdict = str(s.get("verdict", ""))
    style = "green" if verdict == "fits" else "yellow"
    text.append("\n    ")
    text.append(verdict.upper(), style)
    text.append(
        f": peak {fmt_bytes(s.get('peak_bytes'))}, {fmt_bytes(s.get('headroom_bytes'))} to spare, "
        f"effective batch {s.get('effective_batch')}"
    )
    for note in s.get("notes", []):
        text.append("\n    - ")
        text.append(one_line(note), "dim")
    return text


def summary_text(r: dict[str, Any], assumed_card: bool) -> Text:
    """The verdict as configured, the largest batch, the margin, skipped knobs and notes: plain text."""
    cap = f"{fmt_bytes(r.get('gpu_memory_bytes'))} ({one_line(r.get('capacity_source', ''))})"
    if assumed_card:
        cap = f"{fmt_bytes(r.get('gpu_memory_bytes'))} (an 80 GB H100: no GPU here)"
    verdict = str(r.get("verdict", ""))
    head = {"fits": "FITS", "tight": "TIGHT (fits, under the safety margin)", "oom": "OUT OF MEMORY"}.get(verdict, "?")
    text = Text.assemble(
        ("as is     ", "bold"), (head, "green" if verdict == "fits" else "red" if verdict == "oom" else "yellow")
    )
    if r.get("runs_out"):
        text.append(f": runs out at {one_line(r['runs_out'])}")
    text.append(
        f"\n          peak {fmt_bytes(r.get('peak_bytes'))}, {fmt_bytes(r.get('headroom_bytes'))} to spare of {cap}; "
        f"micro-batch {r.get('batch_size')}, effective batch {r.get('effective_batch')}"
    )
    m = r.get("max_batch_size")
    text.append("\nlargest   ", "bold")
    if m is None:
        text.append("no train.batch_size fits, not even 1")
    else:
        text.append(f"train.batch_size = {m}")
        note = r.get("max_batch_note") or f"{m + 1} does not fit"
        text.append(f" ({one_line(note)})", "dim")
    text.append("\nmargin    ", "bold")
    text.append(f"under {fmt_bytes(r.get('margin_bytes'))} to spare (2 % of the capacity) is tight", "dim")
    for sk in r.get("skipped", []):
        what = ", ".join(f"{k}={v}" for k, v in (sk.get("changes") or {}).items())
        text.append("\nskipped   ", "bold")
        text.append(one_line(f"{what}: {sk.get('reason', '')}"), "dim")
    for n in r.get("notes", []):
        text.append("\nnote      ", "bold")
        text.append(one_line(n), "dim")
    return text


class FitScreen(Screen[dict[str, Any] | None]):
    """A configuration's fit: dismissed with the chosen suggestion's changes (None when closed without one)."""

    BINDINGS = [
        Binding("enter", "apply", "apply to the settings"),
        Binding("escape,q", "close", "close"),
    ]

    DEFAULT_CSS = """
    FitScreen #fit-title { padding: 0 1; height: auto; }
    FitScreen #fit-summary { padding: 0 1; height: auto; }
    FitScreen #fit-suggestions { height: 1fr; }
    """

    export_name = "fit"

    def __init__(self, cfg: dict[str, Any], start: Callable[[dict[str, Any]], Search] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.start = start or start_fit
        self.search: Search | None = None
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.progress = 0
        self.suggestions: list[dict[str, Any]] = []
        self.closed = False

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self._title(), id="fit-title")
            yield Static(Text("searching: the configuration as it is…"), id="fit-summary")
            yield OptionList(id="fit-suggestions")
        yield Footer()

    def _title(self, status: str = "") -> Text:
        text = Text.assemble(("fit ", "bold"), (one_line(self.cfg.get("name", "")), "bold"))
        if status:
            text.append(f"   {one_line(status)}", "dim")
        return text

    def on_mount(self) -> None:
        self.query_one("#fit-suggestions").border_title = "changes that make it fit (enter applies one)"
        self.query_one("#fit-suggestions").focus()
        self._follow()

    @work(thread=True, exclusive=True, group="fit")
    def _follow(self) -> None:
        """Start the search and pass its events to the interface; the heavy work is in the search's process."""
        try:
            search = self.start(self.cfg)
        except Exception as e:  # noqa: BLE001 - a search that cannot start is said, never a crash
            self.app.call_from_thread(self._event, {"error": f"the search could not start: {e}"})
            return
        self.search = search
        if self.closed:  # closed while it was starting
            search.stop()
            return
        for ev in search.events():
            if self.closed:
                search.stop()
                return
            self.app.call_from_thread(self._event, ev)

    def _event(self, ev: dict[str, Any]) -> None:
        if self.closed:
            return
        title = self.query_one("#fit-title", Static)
        summary = self.query_one("#fit-summary", Static)
        if "progress" in ev:
            self.progress = int(ev.get("progress") or 0)
            title.update(self._title(f"searching… estimate {self.progress}: {ev.get('label', '')}"))
        elif "error" in ev:
            self.error = printable(str(ev["error"]))
            title.update(self._title("no fit"))
            summary.update(Text(f"the fit could not be made: {self.error}"))
        elif "result" in ev:
            r = ev["result"]
            self.result = r
            self.suggestions = list(r.get("suggestions", []))
            estimates = r.get("estimates", 0)
            title.update(self._title(f"{estimates} estimates, {float(r.get('seconds', 0.0)):.1f} s"))
            summary.update(summary_text(r, bool(ev.get("assumed_card"))))
            ol = self.query_one("#fit-suggestions", OptionList)
            ol.clear_options()
            if self.suggestions:
                ol.add_options([Option(suggestion_text(i, s), id=f"s{i}") for i, s in enumerate(self.suggestions, 1)])
                ol.highlighted = 0
            else:
                why = "none needed: it fits as configured" if r.get("verdict") == "fits" else "none found"
                ol.add_option(Option(Text(why, style="dim"), id="none", disabled=True))

    @on(OptionList.OptionSelected, "#fit-suggestions")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.action_apply()

    def action_apply(self) -> None:
        ol = self.query_one("#fit-suggestions", OptionList)
        if not self.suggestions or ol.highlighted is None:
            self.notify("no suggestion to apply yet", severity="warning")
            return
        self._close(dict(self.suggestions[ol.highlighted].get("changes", {})))

    def action_close(self) -> None:
        self._close(None)

    def _close(self, changes: dict[str, Any] | None) -> None:
        self.closed = True
        if self.search is not None:
            self.search.stop()
        self.dismiss(changes)
