"""The Textual application and the entry points the CLI calls.

One ``BlipmonApp`` serves every command: it starts on the launcher (``blipmon``), on a run view
(``run --live``, ``attach``, ``replay`` of a run directory), on the sweep view (``sweep --live``,
``attach`` or ``replay`` of a sweep folder) or on the compare view (``compare --tui``). Started on a run, sweep or compare view, leaving that view ends the
program; started on the launcher, it goes back.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

from textual.app import App
from textual.binding import Binding
from textual.notifications import SeverityLevel
from textual.screen import Screen

from blipmon.core.errors import LaunchError, ProfileError
from blipmon.core.layout import SWEEP_LOG
from blipmon.core.outcomes import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_STOPPED, EXIT_USAGE
from blipmon.core.replay import ReplaySource
from blipmon.core.safe_text import one_line, printable
from blipmon.core.snapshot import RunSource
from blipmon.ui.live import RunResult, RunScreen

# Imported where they are used: what a command's first frame does not need is not imported in front of it
# (issue 17). ``runner.detached`` for ``run --live``, ``runner.follow`` for attach and live, ``ui.export`` for
# Ctrl+S.


def startup_over() -> None:
    """The first frame is up: the collector the command line paused for start-up runs again.

    ``cli.py`` pauses Python's cyclic garbage collector while a dashboard command imports Textual and builds its
    first frame (start-up makes objects by the hundred thousand and frees almost none, so every collection then
    is wasted work: ~3 % of the first frame). What start-up made lives as long as the app: frozen, later
    collections never walk it again.
    """
    if not gc.isenabled():  # paused by the command line; a host that runs the app itself (tests) is left alone
        gc.freeze()
        gc.enable()


class BlipmonApp(App[Any]):
    """The dashboard. ``first`` builds the screen it opens on; ``standalone`` = leaving it quits."""

    CSS_PATH = Path(__file__).parent / "blipmon.tcss"  # absolute: subclasses may live elsewhere
    TITLE = "blipmon"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("ctrl+s", "export_svg", "save SVG", show=False, priority=True),
        Binding("ctrl+q", "quit_safely", "quit", show=False, priority=True),
        Binding("ctrl+c", "quit_safely", "quit", show=False, priority=True),
    ]

    def __init__(self, first: Screen[Any] | None = None, *, export_dir: Path | None = None) -> None:
        super().__init__()
        self.first = first
        self.export_dir = export_dir

    def on_mount(self) -> None:
        self.theme = "textual-dark"
        if self.first is None:
            from blipmon.ui.launcher import LauncherScreen

            self.push_screen(LauncherScreen())
        else:
            self.push_screen(self.first, self.exit)
        self.call_after_refresh(startup_over)

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = True,
    ) -> None:
        """Every notification as plain text, whatever the caller asked (``markup`` is ignored).

        Notifications carry file names, run names and error messages (``could not delete
        exp[v2]: …``): read as markup, ``[/INST]`` in a message would raise instead of showing,
        and an escape sequence would reach the terminal. None of ours needs markup.
        """
        super().notify(printable(message), title=one_line(title), severity=severity, timeout=timeout, markup=False)

    def action_export_svg(self) -> None:
        view = getattr(self.screen, "export_name", None) or type(self.screen).__name__.removesuffix("Screen").lower()
        from blipmon.ui.export import export_path

        path = export_path(view, "svg", self.export_dir)
        saved = self.save_screenshot(filename=path.name, path=str(path.parent))
        self.notify(f"saved {saved}", title="SVG", timeout=6)

    def action_quit_safely(self) -> None:
        """Ctrl+Q / Ctrl+C never stop a run (or a sweep) behind the user's back: a live view asks first."""
        from blipmon.ui.sweep import SweepScreen

        screen = self.screen
        if isinstance(screen, (RunScreen, SweepScreen)):
            screen.action_leave()
        else:
            self.exit(None)


def _say(message: str) -> None:
    """A ``blipmon: …`` line on stderr; it quotes paths and a child's error output, so escapes are made visible."""
    print(f"blipmon: {printable(message)}", file=sys.stderr)


def run_launcher() -> int:
    """``blipmon`` with no command: the launcher."""
    from blipmon.ui.launcher import LauncherScreen

    BlipmonApp(LauncherScreen()).run()
    return 0


def run_live(cfg: dict[str, Any], out: Path | None) -> int:
    """``blipmon run CONFIG --live``: launch, watch, return ``blipmon run``'s exit code.

    The run is started by a supervisor process that outlives the dashboard and appends the exit
    record, so leaving with the run still going loses nothing; it can be watched again with
    ``blipmon attach``. Leaving it running returns 0.
    """
    try:
        from blipmon.runner.detached import LiveRun

        live = LiveRun(cfg, out)
    except LaunchError as e:
        _say(f"{e}")
        return EXIT_ERROR
    _say(f"recording {cfg.get('name', 'run')} into {live.run_dir}")
    from blipmon.runner.follow import FileFollowSource

    source = FileFollowSource(live.run_dir, mode="live")
    result = BlipmonApp(RunScreen(source, live)).run()
    if not isinstance(result, RunResult) or result.left_running or result.code is None:
        code = live.poll()
        if code is None:
            _say(
                f"{cfg.get('name', 'run')} is still running (supervisor pid {live.pid}); "
                f"watch it with `blipmon attach {live.run_dir}`",
            )
            print(live.run_dir)
            return 0
    else:
        code = result.code
    _say(f"{cfg.get('name', 'run')}: see `blipmon show {live.run_dir}`")
    print(live.run_dir)
    return int(code)


def run_sweep_live(configs: list[str], overrides: list[str], out: Path | None, fmt: str = "table") -> int:
    """``blipmon sweep CONFIG... --live``: start the sweep, watch its queue, return its exit code.

    The sweep runs as a detached ``blipmon sweep`` (``runner/sweep_control.py``: ``LiveSweep``), so leaving the dashboard
    with it still going loses nothing: it goes on, and its runs keep arriving in the sweep folder.
    Leaving it running returns 0, like ``run --live``. When it has ended, the comparison table is
    printed in ``fmt`` too, as the headless sweep prints it, so ``--live`` loses no output.
    """
    from blipmon.core.report import render_compare
    from blipmon.core.sweep import load_sweep_runs
    from blipmon.runner.sweep_control import LiveSweep
    from blipmon.ui.sweep import SweepResult, SweepScreen

    _say(f"starting a sweep of {' '.join(configs)}…")
    try:
        live = LiveSweep(configs, overrides, out)
    except LaunchError as e:
        _say(f"{e}")
        return EXIT_USAGE
    _say(f"sweep into {live.sweep_dir}")
    result = BlipmonApp(SweepScreen(live.sweep_dir, live)).run()
    code = result.code if isinstance(result, SweepResult) and not result.left_running else None
    if code is None:
        code = live.poll()
    if code is None:
        _say(
            f"the sweep is still running (pid {live.pid}); its runs are in {live.sweep_dir} "
            f"(its progress: {live.sweep_dir / SWEEP_LOG}); watch it again with `blipmon attach {live.sweep_dir}`",
        )
        print(live.sweep_dir)
        return 0
    if code < 0 or code == EXIT_INTERRUPTED:  # killed by a signal, or interrupted outside a run: stopped or killed
        code = EXIT_STOPPED
    try:
        runs = load_sweep_runs(live.sweep_dir)
    except ProfileError as e:
        runs = []
        _say(f"{e}")
    if runs:
        sys.stdout.write(render_compare(runs, fmt))
    _say(f"sweep done; runs in {live.sweep_dir}")
    return int(code)


def _run_view(source: RunSource) -> int:
    BlipmonApp(RunScreen(source)).run()
    return 0


def run_attach(run_dir: Path) -> int:
    """``blipmon attach RUN``: follow a run written by another process; leaving never stops it."""
    from blipmon.runner.follow import FileFollowSource

    return _run_view(FileFollowSource(Path(run_dir), mode="attach"))


def run_replay(run_dir: Path, speed: float) -> int:
    """``blipmon replay RUN --speed X``: the run view driven by a saved run."""
    source = ReplaySource(Path(run_dir), speed=speed)
    problem = source.problem
    if problem:
        source.close()
        raise ProfileError(problem)
    return _run_view(source)


def run_sweep_attach(sweep_dir: Path) -> int:
    """``blipmon attach <sweep dir>``: the queue of a sweep started elsewhere; leaving never stops it.

    ``s`` stops it by the pid in its ``sweep.json``, only once psutil confirms that pid is this sweep
    (``runner/sweep_control.py``: ``AttachedSweep``). A sweep that has already ended opens as finished. Exit 0,
    like attaching to a run: the sweep's own exit code belongs to whoever started it.
    """
    from blipmon.runner.sweep_control import AttachedSweep
    from blipmon.ui.sweep import SweepScreen

    sweep_dir = Path(sweep_dir)
    control = AttachedSweep(sweep_dir)
    BlipmonApp(SweepScreen(sweep_dir, control)).run()
    if control.running() and not (control.doc() or {}).get("finished"):
        _say(f"the sweep goes on in {sweep_dir}; `blipmon attach {sweep_dir}` shows it again")
    return 0


def run_sweep_replay(sweep_dir: Path, speed: float = 1.0) -> int:
    """``blipmon replay <sweep dir>``: a finished sweep's final queue; its runs replay at ``speed``.

    A sweep whose process is still running is followed as ``blipmon attach`` does instead: a frozen
    queue of a sweep that moves on would be wrong a minute later, and its runs cannot be replayed
    to the end yet.
    """
    from blipmon.runner.sweep_control import AttachedSweep
    from blipmon.ui.sweep import SweepScreen

    sweep_dir = Path(sweep_dir)
    control = AttachedSweep(sweep_dir)
    if not (control.doc() or {}).get("finished") and control.running():
        _say(f"{sweep_dir}: the sweep is still running; following it (as `blipmon attach`)")
        return run_sweep_attach(sweep_dir)
    BlipmonApp(SweepScreen(sweep_dir, replay=True, speed=speed)).run()
    return 0


def run_compare(run_dirs: list[Path]) -> int:
    """``blipmon compare RUN... --tui``: 2 to 6 runs side by side."""
    from blipmon.ui.compare import CompareScreen

    BlipmonApp(CompareScreen([Path(p) for p in run_dirs], standalone=True)).run()
    return 0


__all__ = [
    "BlipmonApp",
    "run_attach",
    "run_compare",
    "run_launcher",
    "run_live",
    "run_replay",
    "run_sweep_attach",
    "run_sweep_live",
    "run_sweep_replay",
]
