"""The launcher: presets by group and saved runs, the selected configuration's settings, and actions.

Left: every preset under its group (tiny, h100, a100, load, train), then the runs saved under
``./profiles``, newest first, with status and peak. Right: the selected configuration, every
setting editable and validated as you type by the same code as a TOML file (``config.validate``),
errors shown next to the field. ``r`` runs it; ``space`` marks runs, ``c`` compares them, ``d``
deletes one after asking. The estimate panel below the settings predicts the peak and the verdict;
``f`` opens the fit view (``ui/fit.py``): the largest batch and the changes that make the configuration
fit, one of which ``enter`` applies to the settings.

Sweeps: ``space`` on a preset marks it for a sweep, and ``w`` asks whether to sweep the marked
presets or the whole group of the selected one, then opens the sweep view (``ui/sweep.py``). Marks
mean the same thing on both kinds of row (keep this one for later), so one key serves both.
The sweep folders under ``./profiles`` are listed too (``saved sweeps``, when there are any):
``enter`` opens one's queue, following it if its process still runs, else as a finished sweep.

One module although it is long: it is one screen and its actions; what it lists and validates is data
(``core/listing.py``, ``core/config_form.py``), what it starts is the runner's (``runner/detached.py``,
``runner/sweep_control.py``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from rich.highlighter import Highlighter
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.events import DescendantFocus
from textual.screen import Screen
from textual.widgets import Footer, Input, OptionList, Static
from textual.widgets.option_list import Option

from blipmon.core import config, presets
from blipmon.core.config_form import setting_hint, settings_of, validate_edits
from blipmon.core.errors import LaunchError, ProfileError
from blipmon.core.layout import EVENTS, PROFILES
from blipmon.core.listing import RunEntry, forget_entry, list_runs
from blipmon.core.safe_text import control_pictures, one_line, printable
from blipmon.core.units import fmt_bytes
from blipmon.runner.sweep_control import AttachedSweep, SweepEntry, list_sweeps
from blipmon.ui.dialogs import ChoiceScreen, ConfirmScreen, HelpScreen, binding_keys
from blipmon.ui.widgets.estimate import EstimatePanel


def _row(marked: bool | None, name: str, detail: str | None = None) -> Text:
    """A list row as plain text: folder and run names (``exp[lr=3e-4:final]``) are never markup.

    ``marked``: a ``✓`` (True) or its blank (False) before the name; None: two spaces. The whole
    name is shown; the list wraps one that is wider than it.
    """
    mark = "  " if marked is None else ("✓ " if marked else "  ")
    text = Text.assemble((mark, "bold"), one_line(name))
    if detail is not None:
        text.append("\n    ")
        text.append(one_line(detail), "dim")
    return text


def _group_title(title: str, root: Path) -> Text:
    return Text.assemble((title, "bold"), " ", (f"({one_line(root)}/)", "dim"))


def _key_id(key: str) -> str:
    return "set-" + key.replace(".", "--")


class ControlPictures(Highlighter):
    """Shows a control character in an input field as its picture (``␛``), never as itself.

    A value can hold one (pasted, or a saved run's configuration edited by hand); written to the
    terminal as it is, ESC would start an escape sequence. One character for one, so the field's
    cursor stays where the value says it is.
    """

    def highlight(self, text: Text) -> None:
        shown = control_pictures(text.plain)
        if shown != text.plain:
            text.plain = shown


class SettingRow(Vertical):
    """One setting: its dotted key, an input, and (when invalid) the reason under it."""

    def __init__(self, key: str, value: str) -> None:
        super().__init__(classes="setting")
        self.key = key
        self.value = value
        self.error: str | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(classes="setting-line"):
            yield Static(Text(self.key), classes="setting-key")
            # No placeholder: an empty setting shows empty (its hint is under the box while it has focus).
            inp = Input(self.value, id=_key_id(self.key), highlighter=ControlPictures())
            inp.tooltip = setting_hint(self.key)
            yield inp
        yield Static("", classes="setting-error")

    def on_mount(self) -> None:
        self.set_error(self.error)

    def set_error(self, text: str | None) -> None:
        self.error = text
        self.set_class(text is not None, "-invalid")
        for err in self.query(".setting-error").results(Static):
            err.update(Text(printable(text or "")))  # names the value typed: never markup
            err.display = text is not None


class LauncherScreen(Screen[None]):
    BINDINGS = [
        Binding("r", "run", "run"),
        Binding("enter", "open", "open", show=False),
        Binding("space", "mark", "mark"),
        Binding("c", "compare", "compare"),
        Binding("w", "sweep", "sweep"),
        Binding("f", "fit", "fit"),
        Binding("d", "delete", "delete"),
        Binding("e", "edit", "edit"),
        Binding("escape", "back_to_list", "list", show=False),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("q", "quit", "quit"),
    ]

    export_name = "launcher"

    def __init__(self, root: Path = PROFILES) -> None:
        super().__init__()
        self.root = root
        self.runs: list[RunEntry] = []
        self.sweeps: list[SweepEntry] = []
        self.marked: list[Path] = []
        self.marked_presets: list[str] = []  # for a sweep, in the order they were marked
        self.selected: str | None = None
        self.base: dict[str, Any] = {}
        self.original: dict[str, str] = {}
        self.valid_cfg: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(id="launcher-body"):
            yield OptionList(id="configs")
            with Vertical(id="right"):
                yield Static("", id="details")
                yield VerticalScroll(id="settings")
                yield Static("", id="validation")
                yield EstimatePanel("", id="estimate")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#configs").border_title = "configurations"
        self.query_one("#settings").border_title = "settings (edit, then r to run)"
        self.rebuild_list()
        self.refresh_runs()
        self.set_interval(3.0, self.refresh_runs)
        self.query_one("#configs").focus()

    # -- the list ------------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="runs")
    def refresh_runs(self) -> None:
        runs = list_runs(self.root)
        sweeps = list_sweeps(self.root)
        self.app.call_from_thread(self._set_runs, runs, sweeps)

    def _set_runs(self, runs: list[RunEntry], sweeps: list[SweepEntry] | None = None) -> None:
        sweeps = self.sweeps if sweeps is None else sweeps
        same_runs = [(r.path, r.status, r.peak) for r in runs] == [(r.path, r.status, r.peak) for r in self.runs]
        if same_runs and sweeps == self.sweeps:
            return
        self.runs = runs
        self.sweeps = sweeps
        self.marked = [p for p in self.marked if any(r.path == p for r in runs)]
        self.rebuild_list()

    def rebuild_list(self) -> None:
        ol = self.query_one("#configs", OptionList)
        keep = ol.highlighted_option.id if ol.highlighted_option is not None else self.selected
        options: list[Option | None] = []
        names = presets.names()
        for group in presets.GROUPS:
            options.append(Option(Text(f"{group}/", style="bold"), id=f"group:{group}", disabled=True))
            for n in names:
                if n.startswith(group + "/"):
                    options.append(Option(_row(n in self.marked_presets, n), id=f"preset:{n}"))
        if self.sweeps:
            options.append(Option(_group_title("saved sweeps", self.root), id="group:sweeps", disabled=True))
        for sw in self.sweeps:
            state = "running" if sw.running else "done"
            options.append(Option(_row(None, sw.path.name, f"{state:<8} {sw.summary}"), id=f"sweep:{sw.path}"))
        options.append(Option(_group_title("saved runs", self.root), id="group:runs", disabled=True))
        if not self.runs:
            options.append(
                Option(Text("  none yet: r runs the selected preset", style="dim"), id="group:none", disabled=True)
            )
        for r in self.runs:
            peak = fmt_bytes(r.peak) if r.peak is not None else "—"
            options.append(
                Option(_row(r.path in self.marked, r.path.name, f"{r.status:<8} peak {peak}"), id=f"run:{r.path}")
            )
        ol.clear_options()
        ol.add_options(options)
        ids = [o.id for o in options if o is not None]
        if keep in ids:
            ol.highlighted = ids.index(keep)
        else:
            ol.highlighted = next(i for i, o in enumerate(options) if o is not None and not o.disabled)

    @on(OptionList.OptionHighlighted, "#configs")
    def _highlighted(self, event: OptionList.OptionHighlighted) -> None:
        oid = event.option.id or ""
        if oid != self.selected:
            self.select(oid)

    @on(OptionList.OptionSelected, "#configs")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.action_open()

    def select(self, oid: str) -> None:
        """Show the configuration of a preset or a saved run in the settings form."""
        self.selected = oid
        details = self.query_one("#details", Static)
        if oid.startswith("preset:"):
            name = oid[7:]
            self.base = presets.get(name)
            details.update(Text.assemble((name, "bold"), "\n", one_line(self.base.get("description", ""))))
        elif oid.startswith("run:"):
            entry = next((r for r in self.runs if f"run:{r.path}" == oid), None)
            if entry is None:
                return
            self.base = dict(entry.config) or {"name": entry.name}
            running = " — enter attaches" if entry.status == "running" else " — enter replays"
            details.update(
                Text.assemble(
                    (one_line(entry.name), "bold"),
                    f"  {one_line(entry.status)}, peak {fmt_bytes(entry.peak)}{running}\n",
                    (one_line(entry.path), "dim"),
                )
            )
        elif oid.startswith("sweep:"):
            self._select_sweep(oid)
            return
        else:
            return
        try:
            full = config.validate(self.base)
        except config.ConfigError:
            full = config.merge(config.defaults(), self.base)
        self.original = settings_of(full)
        self._build_form()
        self.revalidate()

    def _select_sweep(self, oid: str) -> None:
        """A sweep has no one configuration to edit: say what it is and empty the form (``r`` refuses)."""
        sweep = self._sweep()
        if sweep is None:
            return
        state = "running — enter follows its queue" if sweep.running else "done — enter opens its queue"
        self.query_one("#details", Static).update(
            Text.assemble(
                (one_line(sweep.path.name), "bold"),
                f"  sweep, {state}\n{one_line(sweep.summary)}\n",
                (one_line(sweep.path), "dim"),
            )
        )
        self.base, self.original, self.valid_cfg = {}, {}, None
        self.query_one("#settings", VerticalScroll).remove_children()
        status = self.query_one("#validation", Static)
        status.set_class(False, "-bad")
        status.update("a sweep: select a preset or a saved run to edit and run it")
        self.query_one(EstimatePanel).show_config(None)

    def _build_form(self) -> None:
        form = self.query_one("#settings", VerticalScroll)
        form.remove_children()
        form.mount_all([SettingRow(k, v) for k, v in self.original.items()])

    def edited(self) -> dict[str, str]:
        out = dict(self.original)
        for inp in self.query("#settings Input").results(Input):
            key = (inp.id or "")[4:].replace("--", ".")
            out[key] = inp.value
        return out

    def on_descendant_focus(self, event: DescendantFocus) -> None:
        """The focused setting's hint (what is allowed, what it means) under the settings box."""
        widget = event.widget
        box = self.query_one("#settings", VerticalScroll)
        if isinstance(widget, Input) and (widget.id or "").startswith("set-"):
            key = widget.id[4:].replace("--", ".")
            box.border_subtitle = Text(setting_hint(key)) if key in config.SCHEMA else None
        else:
            box.border_subtitle = None

    @on(Input.Changed, "#settings Input")
    def _changed(self, event: Input.Changed) -> None:
        self.revalidate()

    def revalidate(self) -> None:
        cfg, by_key, rest = validate_edits(self.base, self.original, self.edited())
        self.valid_cfg = cfg
        for row in self.query(SettingRow).results(SettingRow):
            row.set_error(by_key.get(row.key))
        status = self.query_one("#validation", Static)
        status.set_class(cfg is None, "-bad")
        if cfg is not None:
            changed = sum(1 for k, v in self.edited().items() if v != self.original.get(k))
            status.update(
                Text.assemble(f"✓ valid{f' ({changed} changed)' if changed else ''} — ", ("r", "bold"), " runs it")
            )
        else:
            n = len(by_key) + len(rest)
            # The messages quote what was typed (``x[/]``): plain text, or the edit would raise here and be lost.
            problems = "; ".join(rest or list(by_key.values()))
            status.update(Text(one_line(f"✗ {n} problem{'s' if n != 1 else ''}: " + problems)[:300]))
        self.query_one(EstimatePanel).show_config(cfg)

    # -- actions ------------------------------------------------------------------------------------
    def _entry(self) -> RunEntry | None:
        if self.selected and self.selected.startswith("run:"):
            return next((r for r in self.runs if f"run:{r.path}" == self.selected), None)
        return None

    def _sweep(self) -> SweepEntry | None:
        if self.selected and self.selected.startswith("sweep:"):
            return next((s for s in self.sweeps if f"sweep:{s.path}" == self.selected), None)
        return None

    def action_help(self) -> None:
        self.app.push_screen(
            HelpScreen("launcher", binding_keys(self.BINDINGS) + [("tab", "move between the list and the settings")])
        )

    def action_quit(self) -> None:
        self.app.exit(None)

    def action_edit(self) -> None:
        inputs = list(self.query("#settings Input").results(Input))
        if inputs:
            inputs[0].focus()

    def action_back_to_list(self) -> None:
        self.query_one("#configs").focus()

    def action_mark(self) -> None:
        if self.selected and self.selected.startswith("preset:"):
            name = self.selected[7:]
            if name in self.marked_presets:
                self.marked_presets.remove(name)
            else:
                self.marked_presets.append(name)
            self.rebuild_list()
            return
        e = self._entry()
        if e is None:
            self.notify("mark presets (for a sweep) or saved runs (for a comparison)", severity="warning")
            return
        if e.path in self.marked:
            self.marked.remove(e.path)
        elif len(self.marked) >= 6:
            self.notify("at most 6 runs can be compared", severity="warning")
            return
        else:
            self.marked.append(e.path)
        self.rebuild_list()

    def action_compare(self) -> None:
        if not 2 <= len(self.marked) <= 6:
            self.notify("mark 2 to 6 saved runs with space first", severity="warning")
            return
        from blipmon.ui.compare import CompareScreen

        self.app.push_screen(CompareScreen(list(self.marked)))

    def action_sweep(self) -> None:
        """Sweep the marked presets, or the whole group of the selected one: asks which."""
        group = self.selected[7:].split("/")[0] if self.selected and self.selected.startswith("preset:") else None
        choices: list[tuple[str, str, str]] = []
        if self.marked_presets:
            n = len(self.marked_presets)
            shown = ", ".join(self.marked_presets[:4]) + (", …" if n > 4 else "")
            choices.append(("m", f"the {n} marked preset{'s' if n != 1 else ''} ({shown})", "marked"))
        if group is not None:
            count = len(presets.group(group + "/"))
            choices.append(("g", f"the whole group {group}/ ({count} presets)", "group"))
        if not choices:
            self.notify("select a preset (its group is swept) or mark presets with space", severity="warning")
            return

        def answer(value: str | None) -> None:
            if value == "marked":
                self._start_sweep(list(self.marked_presets))
            elif value == "group" and group is not None:
                self._start_sweep([group + "/"])

        self.app.push_screen(
            ChoiceScreen(
                "Sweep which presets? Each runs in a fresh process, one after another, as saved "
                "(edits in the settings apply to r only).",
                choices,
            ),
            answer,
        )

    def action_fit(self) -> None:
        """The fit view of the configuration as edited; a chosen suggestion comes back to the settings."""
        if self._sweep() is not None or not self.base:
            self.notify("select a preset or a saved run to fit", severity="warning")
            return
        if self.valid_cfg is None:
            self.notify("fix the settings marked in red first", severity="error")
            return
        from blipmon.ui.fit import FitScreen

        self.app.push_screen(FitScreen(self.valid_cfg), self.apply_changes)

    def apply_changes(self, changes: dict[str, Any] | None) -> None:
        """Put a fit suggestion's values into the settings form (validated as typed), ready to run or edit."""
        if not changes:
            return
        from blipmon.core.config_form import display_value

        applied = []
        for key, value in changes.items():
            found = list(self.query(f"#{_key_id(key)}").results(Input))
            if found:
                found[0].value = display_value(value)
                applied.append(f"{key} = {display_value(value)}")
        self.revalidate()
        self.notify(one_line("applied " + ", ".join(applied) + " — r runs it"), timeout=6)

    def _start_sweep(self, configs: list[str]) -> None:
        self.notify(f"starting a sweep of {' '.join(configs)}…", timeout=4)
        self._launch_sweep(configs)

    @work(thread=True, exclusive=True, group="launch")
    def _launch_sweep(self, configs: list[str]) -> None:
        from blipmon.core.sweep import expand
        from blipmon.runner.sweep_control import LiveSweep

        try:
            expand(configs)  # a bad preset says so here, not in a folder nobody looks at
            live = LiveSweep(configs, (), self.root)
        except (config.ConfigError, LaunchError) as e:
            self.app.call_from_thread(self.notify, str(e), severity="error", timeout=10)
            return
        self.app.call_from_thread(self._show_sweep, live)

    def _show_sweep(self, live: Any) -> None:
        from blipmon.ui.sweep import SweepScreen

        self.marked_presets = []
        self.rebuild_list()
        self.app.push_screen(SweepScreen(live.sweep_dir, live), self._back_from_sweep)

    def _back_from_sweep(self, result: Any) -> None:
        """Refresh the list; a sweep left running is where to find it again."""
        self.refresh_runs()
        if getattr(result, "left_running", False) and getattr(result, "sweep_dir", None) is not None:
            self.notify(
                f"the sweep goes on: enter on it under saved sweeps, or `blipmon attach {result.sweep_dir}`",
                timeout=8,
            )

    def _open_sweep(self, sweep: SweepEntry) -> None:
        """Its queue: followed (and stoppable, by its checked pid) while it runs, else the finished sweep."""
        from blipmon.ui.sweep import SweepScreen

        control = AttachedSweep(sweep.path)
        if control.running() and not (control.doc() or {}).get("finished"):
            screen = SweepScreen(sweep.path, control)
        else:
            screen = SweepScreen(sweep.path, replay=True)
        self.app.push_screen(screen, lambda _: self.refresh_runs())

    def action_delete(self) -> None:
        e = self._entry()
        if e is None:
            self.notify("select a saved run to delete", severity="warning")
            return
        if e.status == "running":
            self.notify("this run is still running: stop it first", severity="warning")
            return

        def answer(value: str | None) -> None:
            if value == "yes":
                self._delete(e.path)

        self.app.push_screen(ConfirmScreen(f"Delete the run {e.path.name} and all its files?"), answer)

    def _delete(self, path: Path) -> None:
        if not (path / EVENTS).is_file():
            self.notify(f"{path}: not a run directory; nothing deleted", severity="error")
            return
        try:
            shutil.rmtree(path)
        except OSError as err:
            self.notify(f"could not delete {path}: {err}", severity="error")
            return
        forget_entry(path)
        self.runs = [r for r in self.runs if r.path != path]
        self.marked = [p for p in self.marked if p != path]
        self.selected = None
        self.rebuild_list()
        self.notify(f"deleted {path.name}")

    def action_open(self) -> None:
        sweep = self._sweep()
        if sweep is not None:
            self._open_sweep(sweep)
            return
        e = self._entry()
        if e is None:
            self.action_edit()
            return
        from blipmon.core.replay import ReplaySource
        from blipmon.runner.follow import FileFollowSource
        from blipmon.ui.live import RunScreen

        try:
            source = FileFollowSource(e.path, mode="attach") if e.status == "running" else ReplaySource(e.path)
        except (ProfileError, OSError) as err:
            self.notify(str(err), severity="error")
            return
        self.app.push_screen(RunScreen(source), lambda _: self.refresh_runs())

    def action_run(self) -> None:
        if self._sweep() is not None:
            self.notify("select a preset or a saved run to run (enter opens this sweep)", severity="warning")
            return
        if self.valid_cfg is None:
            self.notify("fix the settings marked in red first", severity="error")
            return
        self.notify(f"starting {self.valid_cfg['name']}…", timeout=3)
        self._launch(self.valid_cfg)

    @work(thread=True, exclusive=True, group="launch")
    def _launch(self, cfg: dict[str, Any]) -> None:
        from blipmon.runner.detached import LiveRun
        from blipmon.runner.preflight import preflight

        try:
            preflight(cfg)
            live = LiveRun(cfg, self.root)
        except (config.ConfigError, LaunchError) as e:
            self.app.call_from_thread(self.notify, str(e), severity="error", timeout=10)
            return
        self.app.call_from_thread(self._show_live, live)

    def _show_live(self, live: Any) -> None:
        from blipmon.runner.follow import FileFollowSource
        from blipmon.ui.live import RunScreen

        self.app.push_screen(
            RunScreen(FileFollowSource(live.run_dir, mode="live"), live), lambda _: self.refresh_runs()
        )
