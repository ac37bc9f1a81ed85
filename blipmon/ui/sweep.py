"""The sweep view: a sweep's queue as it runs, the current run's live view, and the comparison at the end.

The view follows files, never the sweep process: ``SweepFollower`` (``runner/sweep_follow.py``)
turns ``sweep.json`` and the current run's events into a ``QueueState`` (``core/sweep.py``) and this
screen draws it. The process is a ``SweepControl`` (``runner/sweep_control.py``): one this dashboard
started (``LiveSweep``: leaving asks whether to stop it), one started elsewhere (``AttachedSweep``:
leaving never stops it), or none at all for a finished sweep (``blipmon replay <sweep dir>``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from blipmon.core.errors import ProfileError
from blipmon.core.layout import EVENTS
from blipmon.core.outcomes import EXIT_STOPPED
from blipmon.core.run import RunData
from blipmon.core.safe_text import one_line
from blipmon.core.sweep import FINAL, QueueRow, QueueState, load_sweep_runs
from blipmon.core.units import fmt_bytes, fmt_seconds
from blipmon.runner.sweep_control import NotTheSweep, SweepControl
from blipmon.runner.sweep_follow import SweepFollower
from blipmon.ui.dialogs import ConfirmScreen, HelpScreen, StopOrLeaveScreen, binding_keys

REFRESH_SECONDS = 0.5
STATUS_STYLE = {
    "queued": "dim",
    "running": "bold cyan",
    "ok": "green",
    "oom": "bold red",
    "error": "red",
    "refused": "yellow",
    "stopped": "magenta",
    "killed": "magenta",
    "not run": "dim",
}


class SweepResult:
    """How the user left the sweep view: the sweep's exit code if known, and whether it was left running."""

    def __init__(self, code: int | None, left_running: bool = False, sweep_dir: Path | None = None) -> None:
        self.code = code
        self.left_running = left_running
        self.sweep_dir = sweep_dir


COLUMNS = (("#", "index"), ("configuration", "name"), ("status", "status"), ("steps", "steps"),
           ("peak", "peak"), ("time", "time"), ("note", "note"))  # fmt: skip


def row_cells(row: QueueRow) -> tuple[Text, ...]:
    """A queue row as the table's cells (pure, for tests).

    ``Text``, never markup strings: names, statuses and notes come from ``sweep.json`` and the runs'
    profiles (a status ``[/]``, an error quoting ``[/INST]``), with control characters made visible.
    """
    note = one_line(row.note)
    note = note if len(note) <= 48 else note[:47] + "…"
    name = one_line(row.name)
    return (
        Text(str(row.index), style="dim"),
        Text(name if len(name) <= 28 else name[:27] + "…"),
        Text(one_line(row.status), style=STATUS_STYLE.get(row.status, "")),
        Text(one_line(row.steps)),
        Text(fmt_bytes(row.peak) if row.peak else "—"),
        Text(fmt_seconds(row.seconds) if row.seconds is not None else "—"),
        Text(note, style="dim"),
    )


def header_text(state: QueueState, mode: str) -> Text:
    """The two lines above the queue: where the sweep writes, how far it is, elapsed and ETA.

    Plain ``Text``: the folder and the statuses come from disk (a status ``[/]`` in a hand-edited
    ``sweep.json`` is shown as it is, never read as markup).
    """
    n = len(state.rows)
    text = Text.assemble(
        ("sweep", "bold"),
        f" of {n} configuration{'s' if n != 1 else ''}  [{mode}]  ",
        (one_line(state.sweep_dir), "dim"),
        "\n",
    )
    if not state.readable:
        text.append("starting…")
        return text
    counts = state.counts()
    order = ("running", "queued", "ok", "oom", "error", "refused", "stopped", "killed", "not run")
    parts = [f"{counts[s]} {s}" for s in order if counts.get(s)]
    parts += [f"{k} {one_line(s)}" for s, k in counts.items() if s not in order]  # what a newer sweep may write
    done = sum(1 for r in state.rows if r.status in FINAL)
    if state.finished:
        text.append("done", "bold")
        text.append(f" in {fmt_seconds(state.elapsed)} — c compares")
    else:
        eta = "ETA —" if state.eta is None else f"ETA {fmt_seconds(state.eta)}"
        text.append(f"{done}/{n} done · elapsed {fmt_seconds(state.elapsed)} · {eta}")
    text.append(f"  ·  {' · '.join(parts)}")
    return text


class SweepScreen(Screen[SweepResult]):
    """The queue of a sweep: every configuration's status, the current run's steps and peak, the ETA."""

    DEFAULT_CSS = """
    SweepScreen #sweep-header { height: 2; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    SweepScreen #sweep-queue { height: 1fr; border: round $primary-darken-2; }
    SweepScreen #sweep-detail { height: auto; max-height: 4; padding: 0 1; color: $text-muted; }
    """

    BINDINGS = [
        # priority: the table's own enter would hide this one from the footer
        Binding("enter", "open", "open run", priority=True),
        Binding("l", "live", "live view"),
        Binding("s", "stop", "stop sweep"),
        Binding("c", "compare", "compare"),
        Binding("q,escape", "leave", "leave"),
        Binding("question_mark", "help", "help", key_display="?"),
    ]

    export_name = "sweep"

    def __init__(
        self,
        sweep_dir: Path,
        live: SweepControl | None = None,
        *,
        replay: bool = False,
        speed: float = 1.0,
        refresh: float = REFRESH_SECONDS,
        follower: SweepFollower | None = None,
    ) -> None:
        """``live``: the sweep's process, to stop it (``LiveSweep`` started here, ``AttachedSweep``).

        ``replay``: a finished sweep, nothing followed or stopped (``blipmon replay <sweep dir>``);
        ``speed`` is then the speed its runs replay at. With neither, the view follows the folder
        and can stop nothing (what tests use with a hand-written folder).
        """
        super().__init__()
        self.sweep_dir = Path(sweep_dir)
        self.live = live
        self.replay = replay and live is None
        self.speed = speed
        self.refresh_seconds = refresh
        ended: Callable[[], bool] | None = None
        if live is not None:
            ended = lambda: not live.running()  # noqa: E731
        elif self.replay:
            ended = lambda: True  # noqa: E731 - nothing to wait for, whatever pid sweep.json names
        self.follower = follower or SweepFollower(self.sweep_dir, ended=ended)
        self.state: QueueState | None = None
        self._shown: tuple[tuple[str, ...], ...] = ()
        self._compared = False  # the automatic comparison at the end happens once
        self._compare_pending = False
        self._saw_unfinished = False  # only a sweep seen ending opens the comparison by itself
        self._follow_current: int | None = None  # the running row the cursor was on, to move with it
        self._leaving = False

    @property
    def owned(self) -> bool:
        """Started by this dashboard: leaving asks whether to stop it."""
        return self.live is not None and self.live.owned

    @property
    def mode(self) -> str:
        if self.owned:
            return "live"
        return "replay" if self.replay else "attached"

    def compose(self) -> ComposeResult:
        yield Static("", id="sweep-header")
        yield DataTable(id="sweep-queue", cursor_type="row", zebra_stripes=True)
        yield Static("", id="sweep-detail")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.border_title = "queue"
        for label, key in COLUMNS:
            table.add_column(label, key=key)
        self.tick()
        self.set_interval(self.refresh_seconds, self.tick)
        table.focus()

    # -- data -------------------------------------------------------------------------------------
    def tick(self) -> None:
        state = self.follower.poll()
        self.show(state)
        if state.readable and not state.finished:
            self._saw_unfinished = True
        if state.finished and not self._compared:
            self._compared = True
            self.refresh_bindings()
            if not (self._saw_unfinished or self.owned):
                # Opened on a sweep that had already ended (attach or replay): the user came for the
                # queue; `c` compares.
                return
            if self.is_active:
                self.action_compare()
            else:
                self._compare_pending = True
                self.notify("the sweep is done: the comparison opens when you go back to the queue", timeout=8)

    def show(self, state: QueueState) -> None:
        was = self.state
        self.state = state
        self.query_one("#sweep-header", Static).update(header_text(state, self.mode))
        table = self.query_one(DataTable)
        cells = [row_cells(r) for r in state.rows]
        plain = tuple(tuple(c.plain for c in row) for row in cells)
        if plain != self._shown:
            if len(plain) != len(self._shown):
                table.clear()
                for r, row in zip(state.rows, cells, strict=True):
                    table.add_row(*row, key=str(r.index))
            else:
                for r, row, old in zip(state.rows, cells, self._shown, strict=True):
                    for (_, key), cell, before in zip(COLUMNS, row, old, strict=True):
                        if cell.plain != before:
                            table.update_cell(str(r.index), key, cell, update_width=True)
            self._shown = plain
        self._cursor_follows(state)
        self._show_detail()
        if was is None or was.finished != state.finished or (was.current is None) != (state.current is None):
            self.refresh_bindings()

    def _cursor_follows(self, state: QueueState) -> None:
        """Keep the cursor on the running configuration, unless the user has moved it elsewhere."""
        current = state.current
        if current is None:
            return
        table = self.query_one(DataTable)
        at = table.cursor_row + 1
        if (at == self._follow_current or (self._follow_current is None and at == 1)) and at != current.index:
            table.move_cursor(row=current.index - 1)
        self._follow_current = current.index

    def selected(self) -> QueueRow | None:
        if self.state is None or not self.state.rows:
            return None
        i = self.query_one(DataTable).cursor_row
        return self.state.rows[i] if 0 <= i < len(self.state.rows) else None

    def _show_detail(self) -> None:
        row = self.selected()
        detail = self.query_one("#sweep-detail", Static)
        if row is None:
            detail.update("")
            return
        text = Text.assemble(
            (f"{row.index}. {one_line(row.name)}", "bold"),
            "  ",
            (one_line(row.status), STATUS_STYLE.get(row.status, "")),
        )
        if row.note:
            text.append(f" — {one_line(row.note)}")
        if row.run_dir is not None:
            hint = "enter: its live view" if row.status == "running" and not self.replay else "enter: replay it"
            text.append("\n")
            text.append(one_line(row.run_dir), "dim")
            text.append(f"  {hint}")
        detail.update(text)

    @on(DataTable.RowHighlighted, "#sweep-queue")
    def _highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    @on(DataTable.RowSelected, "#sweep-queue")
    def _selected(self, _event: DataTable.RowSelected) -> None:
        self.action_open()

    def on_screen_resume(self) -> None:
        if self._compare_pending:
            self._compare_pending = False
            self.action_compare()

    # -- which keys exist ---------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        state = self.state
        if action == "stop":
            return self.live is not None and not (state is not None and state.finished)
        if action == "live":
            return state is not None and state.current is not None and not state.finished
        if action == "compare":
            return state is not None and any(r.run_dir is not None and r.status in FINAL for r in state.rows)
        return True

    def visible_actions(self) -> set[str]:
        return {b.action for b in self.BINDINGS if isinstance(b, Binding) and self.check_action(b.action, ())}

    # -- actions ------------------------------------------------------------------------------------
    def action_help(self) -> None:
        keys = binding_keys(self.BINDINGS, self.visible_actions()) + [("↑/↓", "move in the queue")]
        self.app.push_screen(HelpScreen(f"sweep ({self.mode})", keys))

    def action_open(self) -> None:
        row = self.selected()
        if row is None:
            return
        if row.run_dir is None or not (row.run_dir / EVENTS).exists():
            why = {"queued": "it has not started yet", "refused": "it was refused: nothing ran"}
            self.notify(f"{row.name}: {why.get(row.status, 'nothing was recorded')}", severity="warning")
            return
        self._open_run(row)

    def action_live(self) -> None:
        row = self.state.current if self.state is not None else None
        if row is None or row.run_dir is None:
            self.notify("no run is going on now", severity="warning")
            return
        self._open_run(row)

    def _open_run(self, row: QueueRow) -> None:
        from blipmon.core.replay import ReplaySource
        from blipmon.runner.follow import FileFollowSource
        from blipmon.ui.live import RunScreen

        assert row.run_dir is not None
        try:
            if row.status == "running" and not self.replay:
                source: Any = FileFollowSource(row.run_dir, mode="live" if self.owned else "attach")
            else:
                source = ReplaySource(row.run_dir, speed=self.speed)
        except (ProfileError, OSError) as err:
            self.notify(str(err), severity="error")
            return
        problem = source.problem
        if problem:
            source.close()
            self.notify(problem, severity="error")
            return
        self.app.push_screen(RunScreen(source))

    def action_stop(self) -> None:
        if self.live is None or (self.state is not None and self.state.finished):
            return
        live = self.live
        if live.stops:
            question = "The sweep is already stopping. Kill its current run at once (saved as killed)?"
        else:
            question = (
                "Stop the sweep? The current run is stopped and saved as stopped, the configurations "
                "not started yet are skipped, and the comparison opens with what ran."
            )

        def answer(value: str | None) -> None:
            if value == "yes":
                try:
                    live.stop()
                except NotTheSweep as e:  # an attached sweep whose pid is not (or no longer) the sweep
                    self.notify(f"the sweep was not stopped: {e}", severity="error", timeout=10)
                    return
                self.notify("stopping the sweep…", timeout=4)

        self.app.push_screen(ConfirmScreen(question), answer)

    def action_compare(self) -> None:
        self.notify("reading the sweep's runs…", timeout=3)
        self._load_compare()

    @work(thread=True, exclusive=True, group="compare")
    def _load_compare(self) -> None:
        try:
            runs = load_sweep_runs(self.sweep_dir)
        except ProfileError as e:
            self.app.call_from_thread(self.notify, str(e), severity="error")
            return
        self.app.call_from_thread(self._show_compare, runs)

    def _show_compare(self, runs: list[RunData]) -> None:
        from blipmon.ui.compare import CompareScreen

        if not runs:
            self.notify("nothing ran in this sweep: there is nothing to compare", severity="warning")
            return
        if not self.is_active:  # the user went into a run meanwhile: show it when they come back
            self._compare_pending = True
            return
        dirs = [r.path for r in runs if r.path is not None]
        self.app.push_screen(CompareScreen(dirs, runs=runs))

    def action_leave(self) -> None:
        if self._leaving:
            return
        live = self.live
        if live is not None and not live.owned:  # attached: leaving never stops it, as for a run
            going = live.running() and not (self.state is not None and self.state.finished)
            self._finish(
                SweepResult(None if going else self._result().code, left_running=going, sweep_dir=self.sweep_dir)
            )
            return
        if live is not None and live.running() and not (self.state is not None and self.state.finished):

            def answer(value: str | None) -> None:
                if value == "stop":
                    self._stop_and_leave()
                elif value == "leave":
                    self._finish(SweepResult(None, left_running=True, sweep_dir=self.sweep_dir))

            self.app.push_screen(
                StopOrLeaveScreen(
                    "sweep", "the current run is saved as stopped", "`blipmon attach <sweep folder>` shows it again"
                ),
                answer,
            )
            return
        self._finish(self._result())

    @work(thread=True, exclusive=True, group="stop")
    def _stop_and_leave(self) -> None:
        assert self.live is not None
        self._leaving = True
        self.app.call_from_thread(self.notify, "stopping the sweep…", timeout=10)
        self.live.stop()
        code = self.live.wait(timeout=60)
        self.app.call_from_thread(
            self._finish, SweepResult(code if code is not None else EXIT_STOPPED, sweep_dir=self.sweep_dir)
        )

    def _result(self) -> SweepResult:
        code: int | None = None
        if self.live is not None:
            code = self.live.poll()
            if code is None and self.owned and self.state is not None and self.state.finished:
                code = self.live.wait(timeout=30)  # sweep.json says finished; the table is being printed
        if code is None and self.state is not None and self.state.finished:
            code = self.state.exit_code()
        return SweepResult(code, sweep_dir=self.sweep_dir)

    def _finish(self, result: SweepResult) -> None:
        self._leaving = True
        self.dismiss(result)


__all__ = ["COLUMNS", "SweepResult", "SweepScreen", "header_text", "row_cells"]
