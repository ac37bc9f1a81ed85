"""The run view: one screen for a live run, an attached one and a replay, fed by a ``RunSource``.

The screen polls its source on a timer and hands each snapshot to its widgets; widgets redraw
only what changed. Which keys exist depends on the mode: ``s`` stops only a run we launched,
the replay keys only in a replay. Leaving never stops a run unless the user says so.

``m`` swaps the memory timeline for the module view (issue 12): the model's modules as a tree, each with a
stacked bar at one phase boundary, the prediction beside. It follows the step the phase bars show (at that step's
largest phase) until ``,``/``.`` choose another boundary (``.`` past the newest follows again); ``↑``/``↓`` move
the cursor and ``enter`` opens or closes a module. Its data is the snapshot's module rows (a replay: those of
the boundaries it has reached), so live, attach and replay behave alike.

A multi-rank run adds ``r``: the header, memory timeline, phase bars and step charts show rank 0,
then each rank in turn, then all ranks at once (the timeline as the envelope of every rank's
samples, each phase's min..max across ranks); the phase strip under the timeline is the shown
rank's boundaries and step starts. The choice is the screen's
alone; the snapshot stays the same, so live, attach and replay behave identically.
"""

from __future__ import annotations

from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Log, Static

from blipmon.core.layout import LOG
from blipmon.core.logtail import LOG_LINES
from blipmon.core.module_view import NO_MODULES, ROOT, Boundary, ModulePanel, RowIndex, module_panel, step_boundary
from blipmon.core.outcomes import EXIT_STOPPED, run_exit_code
from blipmon.core.ranks import ALL, next_rank, rank_view
from blipmon.core.safe_text import one_line
from blipmon.core.snapshot import RunSource, Snapshot
from blipmon.runner.detached import LiveRun
from blipmon.ui.dialogs import ConfirmScreen, HelpScreen, StopOrLeaveScreen, binding_keys
from blipmon.ui.widgets.modules import ModuleView
from blipmon.ui.widgets.phase_bars import PhaseBars
from blipmon.ui.widgets.run_header import RunHeader, banner_content, banner_text
from blipmon.ui.widgets.steps import StepCharts
from blipmon.ui.widgets.timeline import TimelineChart

REFRESH_SECONDS = 0.5  # the default refresh: memory moves slower than this, and it keeps the CPU idle

_MODULE_ACTIONS = {"module_prev", "module_next", "module_up", "module_down", "module_open"}
_REPLAY_ACTIONS = {"pause", "faster", "slower", "back", "forward", "back_long", "forward_long", "start", "end"}


class ChildLog(Log):
    """The child's log; not focusable, so its scroll keys never shadow the replay's ← and →."""

    can_focus = False


def log_lines(snap: Snapshot) -> tuple[str, ...]:
    """The run's notes (what blipmon noticed: a batch without image placeholders, say) above the child's log.

    Both come from the profile: one line each, control characters made visible (``LogTail`` has
    already done so for the log; ``one_line`` leaves clean text as it is). ``Log`` shows text, never markup.
    """
    return tuple(f"blipmon note: {one_line(n)}" for n in snap.notes) + tuple(one_line(ln) for ln in snap.log)


class RunResult:
    """How the user left the run view: the run's exit code if known, and whether it was left running."""

    def __init__(self, code: int | None, left_running: bool = False, run_dir: Any = None) -> None:
        self.code = code
        self.left_running = left_running
        self.run_dir = run_dir


STREAM_AFTER_S = 0.2  # after the first refresh, before a big profile's loader may compete with the view


class RunScreen(Screen[RunResult]):
    """Header, memory timeline, phase bars, step time and loss, the child's log, and an OOM banner."""

    BINDINGS = [
        Binding("s", "stop", "stop run"),
        Binding("space", "pause", "pause/play"),
        Binding("plus,equals_sign,right_square_bracket", "faster", "faster", key_display="+"),
        Binding("minus,left_square_bracket", "slower", "slower", key_display="-"),
        Binding("left", "back", "−10s", key_display="←"),
        Binding("right", "forward", "+10s", key_display="→"),
        Binding("shift+left,pageup", "back_long", "−1 min", show=False),
        Binding("shift+right,pagedown", "forward_long", "+1 min", show=False),
        Binding("home", "start", "to start", show=False),
        Binding("end", "end", "to end", show=False),
        Binding("r", "rank", "rank"),
        Binding("m", "modules", "modules"),
        Binding("m", "no_modules", "modules (none recorded: says why)", show=False),
        Binding("comma", "module_prev", "previous boundary", show=False, key_display=","),
        Binding("full_stop", "module_next", "next boundary (then: follow)", show=False, key_display="."),
        Binding("up", "module_up", "module above", show=False),
        Binding("down", "module_down", "module below", show=False),
        Binding("enter", "module_open", "open / close the module", show=False),
        Binding("q,escape", "leave", "leave"),
        Binding("question_mark", "help", "help", key_display="?"),
    ]

    AUTO_FOCUS = None

    def __init__(self, source: RunSource, live: LiveRun | None = None, *, refresh: float = REFRESH_SECONDS) -> None:
        super().__init__()
        self.source = source
        self.live = live
        self.refresh_seconds = refresh
        self.snapshot: Snapshot | None = None
        self._log_shown: tuple[str, ...] = ()
        self._finished_shown: bool | None = None
        self._banner_shown: str | None = None
        self._leaving = False
        self.rank: int | None = 0  # the rank the panels show; ALL (None) = the spread across ranks
        self._multi_shown: bool | None = None
        self._modules_known: bool | None = None
        # the module view: shown or not, a boundary the user chose (None: follow the run), what is open, the cursor
        self.modules_shown = False
        self.module_pinned: Boundary | None = None
        self.module_expanded: set[str] = {ROOT}
        self.module_cursor: str = ROOT
        self.module_panel: ModulePanel | None = None
        self._module_index = RowIndex()

    @property
    def mode(self) -> str:
        return self.source.mode

    def compose(self) -> ComposeResult:
        yield RunHeader(id="run-header")
        yield Static("", id="banner")
        yield TimelineChart(id="timeline")
        yield ModuleView(id="modules")
        with Horizontal(id="lower"):
            yield PhaseBars(id="phases")
            yield StepCharts(id="steps")
        # the log's last LOG_LINES lines, plus room above them for the run's notes and the "skipped" line
        yield ChildLog(id="log", max_lines=LOG_LINES + 64, auto_scroll=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#log", Log).border_title = LOG
        self.query_one("#banner").display = False
        self.query_one(ModuleView).display = False
        self.tick()
        self.set_interval(self.refresh_seconds, self.tick)
        # The first frame is drawn; once the terminal has had it (a moment), the rest may stream in.
        self.call_after_refresh(lambda: self.set_timer(STREAM_AFTER_S, self.source.view_shown))

    def on_resize(self) -> None:
        self.set_class(self.size.height >= 40, "-tall")

    # -- data -----------------------------------------------------------------------------------------
    def tick(self) -> None:
        snap = self.source.poll()
        if self.snapshot is not None and snap.version == self.snapshot.version:
            return
        self.show(snap)

    def show(self, snap: Snapshot) -> None:
        self.snapshot = snap
        view = rank_view(snap, self.rank)
        self.query_one(RunHeader).show(snap, view)
        self.query_one(TimelineChart).show(snap, view.sample_rank)
        self.query_one(PhaseBars).show(snap, view)
        self.query_one(StepCharts).show(snap, view)
        if self.modules_shown:
            self._show_modules(snap, view)
        text = banner_text(snap)
        if text != self._banner_shown:
            self._banner_shown = text
            banner = self.query_one("#banner", Static)
            banner.display = text is not None
            banner.update(banner_content(text or ""))
            banner.set_class(snap.oom is not None, "-oom")
        lines = log_lines(snap)
        if lines != self._log_shown:
            log = self.query_one("#log", Log)
            old = self._log_shown
            if old and lines[: len(old)] == old:
                log.write_lines(lines[len(old) :])  # the usual case: lines were added
            else:
                log.clear()
                log.write_lines(lines)
            self._log_shown = lines
        has_modules = len(snap.module_rows) > 0
        if (snap.finished, view.multi, has_modules) != (self._finished_shown, self._multi_shown, self._modules_known):
            # only then does a key appear or go (stop; rank once a second rank is known; modules once recorded)
            self._finished_shown, self._multi_shown, self._modules_known = snap.finished, view.multi, has_modules
            self.refresh_bindings()

    def _show_modules(self, snap: Snapshot, view: Any) -> None:
        """Build the module view's panel for the shown rank and the phase bars' step, keep the cursor on a module
        that is shown, and hand both to the widget."""
        rank = view.sample_rank if view.sample_rank is not None else 0
        latest = view.latest
        hint = latest[-1].get("step") if latest else None
        panel = module_panel(
            self._module_index,
            snap.module_rows,
            rank=rank,
            step_hint=hint if isinstance(hint, int) else None,
            pinned=self.module_pinned,
            expanded=self.module_expanded,
            predicted=snap.predicted_modules(),
            oom=snap.oom,
        )
        if panel.following:
            self.module_pinned = None
        paths = [n.path for n in panel.nodes]
        if self.module_cursor not in paths:
            self.module_cursor = paths[0] if paths else ROOT
        self.module_panel = panel
        self.query_one(ModuleView).show(panel, self.module_cursor)

    # -- which keys exist ----------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.live is not None and (self.snapshot is None or not self.snapshot.finished)
        if action in _REPLAY_ACTIONS:
            return self.mode == "replay"
        if action == "rank":
            return self.snapshot is not None and len(self.snapshot.ranks()) > 1
        if action in _MODULE_ACTIONS:
            return self.modules_shown
        if action in ("modules", "no_modules"):  # offered once the run has module figures (older profiles have none)
            offered = self.modules_shown or (self.snapshot is not None and len(self.snapshot.module_rows) > 0)
            return offered if action == "modules" else not offered
        return True

    def visible_actions(self) -> set[str]:
        return {b.action for b in self.BINDINGS if isinstance(b, Binding) and self.check_action(b.action, ())}

    # -- actions ------------------------------------------------------------------------------------
    def action_help(self) -> None:
        title = {"live": "live run", "attach": "attached run", "replay": "replay"}.get(self.mode, "run")
        self.app.push_screen(HelpScreen(title, binding_keys(self.BINDINGS, self.visible_actions())))

    def action_stop(self) -> None:
        if self.live is None:
            return

        def answer(value: str | None) -> None:
            if value == "yes" and self.live is not None:
                self.live.stop()
                self.notify("stopping the run… it is saved as stopped", timeout=4)

        self.app.push_screen(
            ConfirmScreen("Stop this run? What was recorded is kept and the run is saved as stopped."), answer
        )

    def action_leave(self) -> None:
        if self._leaving:
            return
        if self.live is not None and self.live.running() and not (self.snapshot and self.snapshot.finished):

            def answer(value: str | None) -> None:
                if value == "stop":
                    self._stop_and_leave()
                elif value == "leave":
                    self._finish(RunResult(None, left_running=True, run_dir=self.live.run_dir if self.live else None))

            self.app.push_screen(StopOrLeaveScreen("run", "saved as stopped", "attach later"), answer)
            return
        self._finish(self._result())

    @work(thread=True, exclusive=True, group="stop")
    def _stop_and_leave(self) -> None:
        assert self.live is not None
        self._leaving = True
        self.app.call_from_thread(self.notify, "stopping the run…", timeout=10)
        self.live.stop()
        code = self.live.wait(timeout=30)
        self.app.call_from_thread(
            self._finish, RunResult(code if code is not None else EXIT_STOPPED, run_dir=self.live.run_dir)
        )

    def _result(self) -> RunResult:
        if self.live is not None:
            code = self.live.poll()
            if code is None and self.snapshot is not None and self.snapshot.finished:
                code = self.live.wait(timeout=5)
            if code is None and self.snapshot is not None:
                code = run_exit_code(self.snapshot.status)
            return RunResult(code, run_dir=self.live.run_dir)
        return RunResult(None, run_dir=self.source.run_dir)

    def _finish(self, result: RunResult) -> None:
        self._leaving = True
        self.source.close()
        self.dismiss(result)

    def action_rank(self) -> None:
        """Show the next rank (0, 1, …, then all ranks, then 0 again)."""
        if self.snapshot is None:
            return
        self.rank = next_rank(self.snapshot.ranks(), self.rank)
        self.show(self.snapshot)

    # the module view
    def action_modules(self) -> None:
        """Swap the memory timeline for the module view, or back."""
        self.modules_shown = not self.modules_shown
        self.query_one(ModuleView).display = self.modules_shown
        self.query_one(TimelineChart).display = not self.modules_shown
        if self.snapshot is not None:
            self.show(self.snapshot)
        self.refresh_bindings()

    def action_no_modules(self) -> None:
        """``m`` on a run without module figures (yet): say why rather than show an empty view. Damaged records
        are said as damage, not as attribution being off."""
        damaged = self.snapshot.modules_unreadable if self.snapshot is not None else None
        self.notify(damaged or NO_MODULES, title="modules", timeout=8)

    def _redraw_modules(self) -> None:
        if self.snapshot is not None and self.modules_shown:
            self._show_modules(self.snapshot, rank_view(self.snapshot, self.rank))

    def _move_boundary(self, delta: int) -> None:
        panel = self.module_panel
        if panel is None or panel.boundary is None:
            return
        self.module_pinned = step_boundary(self._module_index, panel.boundary.rank, panel.boundary, delta)
        self._redraw_modules()

    def action_module_prev(self) -> None:
        self._move_boundary(-1)

    def action_module_next(self) -> None:
        self._move_boundary(1)

    def _move_cursor(self, delta: int) -> None:
        paths = [n.path for n in self.module_panel.nodes] if self.module_panel else []
        if not paths:
            return
        i = paths.index(self.module_cursor) if self.module_cursor in paths else 0
        self.module_cursor = paths[max(0, min(i + delta, len(paths) - 1))]
        self._redraw_modules()

    def action_module_up(self) -> None:
        self._move_cursor(-1)

    def action_module_down(self) -> None:
        self._move_cursor(1)

    def action_module_open(self) -> None:
        """Open the cursor's module (its children appear, largest first), or close it."""
        path = self.module_cursor
        if self.module_panel is None or path not in self.module_panel.openable:
            return
        self.module_expanded ^= {path}
        self._redraw_modules()

    def select_rank(self, rank: int | None) -> None:
        """Show ``rank`` (``ALL`` for every rank): for callers and tests that want one directly."""
        self.rank = rank if rank is ALL or rank >= 0 else 0
        if self.snapshot is not None:
            self.show(self.snapshot)

    # replay controls
    def _replay(self) -> Any:
        return self.source if self.mode == "replay" else None

    def _after_control(self) -> None:
        self.tick()

    def action_pause(self) -> None:
        if r := self._replay():
            r.toggle_pause()
            self._after_control()

    def action_faster(self) -> None:
        if r := self._replay():
            r.faster()
            self._after_control()

    def action_slower(self) -> None:
        if r := self._replay():
            r.slower()
            self._after_control()

    def action_back(self) -> None:
        if r := self._replay():
            r.seek(-10)
            self._after_control()

    def action_forward(self) -> None:
        if r := self._replay():
            r.seek(10)
            self._after_control()

    def action_back_long(self) -> None:
        if r := self._replay():
            r.seek(-60)
            self._after_control()

    def action_forward_long(self) -> None:
        if r := self._replay():
            r.seek(60)
            self._after_control()

    def action_start(self) -> None:
        if r := self._replay():
            r.seek_fraction(0.0)
            self._after_control()

    def action_end(self) -> None:
        if r := self._replay():
            r.seek_fraction(1.0)
            self._after_control()
