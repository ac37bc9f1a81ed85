"""The ``blipmon`` command: parses arguments and hands over to core, runner and ui. No logic here."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
EXIT_STOPPED = 4  # `blipmon run`'s code for a stopped run (runner/child.py holds the full set)

# replay --speed: a hundredth of real time (a 1 s step lasts 100 s) to 10,000x (a 28-hour run in 10 s); beyond,
# a replay is either frozen or over before its first frame. The dashboard's own keys step through 0.25x-128x.
MIN_SPEED = 0.01
MAX_SPEED = 10_000.0

# Options whose value may start with "-": argparse takes "-1GiB" or "-inf" for an option and answers "expected
# one argument"; joined as "--gpu-memory=-1GiB" the value reaches our own check, which says what is wrong with it.
_VALUE_OPTIONS = ("--gpu-memory", "--host-memory", "--speed", "--sample-hz")


class UsageError(Exception):
    """Bad input from the user: printed as one clear line, exit 2, never a traceback."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blipmon",
        description="Memory profiler for loading and fine-tuning vision-language models. "
        "With no command, opens the dashboard.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("presets", help="list built-in configurations")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("models", help="known architectures, parameter counts, bytes per dtype")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("run", help="run one job; headless unless --live; prints the run directory")
    s.add_argument(
        "config", metavar="CONFIG", help="preset name (tiny/blip2-opt), a TOML file, or a saved run (its configuration)"
    )
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    s.add_argument("--out", type=Path, default=None, metavar="DIR")
    s.add_argument("--live", action="store_true", help="watch it in the dashboard")

    s = sub.add_parser("show", help="summary of one run (of a sweep folder: its comparison table)")
    s.add_argument("run", type=Path, metavar="RUN")
    s.add_argument("--json", action="store_true", help="the fixed JSON run summary")

    s = sub.add_parser("compare", help="compare runs side by side")
    s.add_argument("runs", type=Path, nargs="+", metavar="RUN")
    s.add_argument("--format", choices=("table", "markdown", "csv", "json"), default="table")
    s.add_argument("--tui", action="store_true", help="open the compare view of the dashboard")

    s = sub.add_parser("replay", help="dashboard replaying a saved run, or a finished sweep's queue")
    s.add_argument("run", type=Path, metavar="RUN", help="a run directory or a sweep folder (with sweep.json)")
    s.add_argument(
        "--speed", type=float, default=1.0, metavar="X", help=f"{MIN_SPEED:g} to {MAX_SPEED:g} (1 = real time)"
    )

    s = sub.add_parser("attach", help="dashboard following a run or a sweep that is still being written")
    s.add_argument("run", type=Path, metavar="RUN", help="a run directory or a sweep folder (with sweep.json)")

    s = sub.add_parser("estimate", help="predict a configuration's per-phase memory before running it")
    s.add_argument("config", metavar="CONFIG", help="preset name, a TOML file, or a saved run (its configuration)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    s.add_argument("--gpu-memory", default=None, metavar="SIZE", help="the GPU's memory, with a unit: 80GiB, 24GB")
    s.add_argument(
        "--host-memory", default=None, metavar="SIZE", help="the machine's RAM, with a unit (CPU runs, offload)"
    )
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("sweep", help="run several configurations one after another")
    s.add_argument(
        "configs",
        nargs="+",
        metavar="CONFIG",
        help="presets, groups (h100/), TOML files, folders of them, or saved runs",
    )
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V", help="for every run")
    s.add_argument("--out", type=Path, default=None, metavar="DIR")
    s.add_argument("--format", choices=("table", "markdown", "csv", "json"), default="table",
                   help="format of the comparison printed at the end")  # fmt: skip
    s.add_argument("--live", action="store_true", help="watch the queue in the dashboard; compare at the end")
    # Used by the dashboard's sweep view: first stdout line `sweep <dir>`, then all output to <dir>/sweep.log.
    s.add_argument("--announce", action="store_true", help=argparse.SUPPRESS)

    s = sub.add_parser("watch", help="record any command's process tree (no instrumentation)")
    s.add_argument("--out", type=Path, default=None, metavar="DIR")
    s.add_argument("--sample-hz", type=float, default=None, metavar="HZ", help="samples per second, 0.1 to 100")
    s.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from blipmon.core.config import ConfigError
    from blipmon.core.profile import ProfileError

    args = _parser().parse_args(_join_dash_values(sys.argv[1:] if argv is None else list(argv)))
    handler = _HANDLERS.get(args.command or "dashboard")
    try:
        return handler(args)
    except (ConfigError, ProfileError, UsageError) as e:
        from blipmon.core.safe_text import printable

        print(f"blipmon: {printable(e)}", file=sys.stderr)  # messages quote paths and values: untrusted text
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Before a run exists (resolving, preflight): nothing was recorded, nothing is left behind. `run`
        # keeps its documented code for a stopped run, the others the shell's.
        if args.command == "run":
            print("blipmon: interrupted before the run started; nothing was recorded", file=sys.stderr)
            return EXIT_STOPPED
        print("blipmon: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _join_dash_values(argv: list[str]) -> list[str]:
    """``--gpu-memory -1GiB`` -> ``--gpu-memory=-1GiB`` (and the other ``_VALUE_OPTIONS``), up to a ``--``.

    Only a value that starts with a single "-" is joined: ``--gpu-memory --json`` still says the size is missing,
    and nothing after ``--`` (``watch``'s command) is touched.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return out + argv[i:]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a in _VALUE_OPTIONS and nxt is not None and nxt.startswith("-") and not nxt.startswith("--") and nxt != "-":
            out.append(f"{a}={nxt}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def _cmd_presets(args: argparse.Namespace) -> int:
    from blipmon.core import config, presets

    items = []
    for name in presets.names():
        cfg = config.validate(presets.get(name))
        items.append({"name": name, "description": cfg["description"], "config": cfg})
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    width = max(len(i["name"]) for i in items)
    group = None
    for i in sorted(items, key=lambda i: (presets.GROUPS.index(i["name"].split("/")[0]), i["name"])):
        g = i["name"].split("/")[0]
        if g != group:
            print(("\n" if group else "") + f"{g}/")
            group = g
        print(f"  {i['name'].ljust(width)}  {i['description']}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from blipmon.core.config import resolve
    from blipmon.runner.launch import Launch, preflight

    cfg = resolve(args.config, args.overrides)
    preflight(cfg)
    if args.live:
        from blipmon.ui.app import run_live

        return run_live(cfg, args.out)
    try:
        launch = Launch(cfg, args.out)
    except OSError as e:
        where = args.out if args.out is not None else Path("profiles")
        raise UsageError(f"--out {where}: cannot create the run directory there ({e.strerror or e})") from None
    print(f"blipmon: recording {cfg['name']} into {launch.run_dir}", file=sys.stderr)
    launch.start()
    with _stop_signals_forwarded_to(launch):
        code = launch.wait()
    from blipmon.core.profile import ProfileError
    from blipmon.core.run import load_run

    try:
        status = load_run(launch.run_dir).status
    except ProfileError as e:  # the child died before it recorded anything: the exit code still stands
        status = f"nothing readable was recorded ({e}); its output is in {launch.run_dir / 'child.log'}"
    print(f"blipmon: {cfg['name']}: {status}; see `blipmon show {launch.run_dir}`", file=sys.stderr)
    print(launch.run_dir)
    return code


@contextlib.contextmanager
def _stop_signals_forwarded_to(launch: Any) -> Iterator[None]:
    """While ``blipmon run`` waits, SIGTERM or SIGHUP to it stops the child, which records the stop.

    Without this a ``kill`` of the headless parent (a scheduler, ``timeout``, a closed ssh session)
    killed only the parent and left the child training, unrecorded and holding the GPU.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(_signum: int, _frame: Any) -> None:
        launch.stop(signal.SIGTERM)

    sigs = [signal.SIGTERM, signal.SIGHUP]
    previous = {sig: signal.signal(sig, forward) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cmd_show(args: argparse.Namespace) -> int:
    from blipmon.core.report import render_show
    from blipmon.core.run import load_run

    if not (args.run / "events.jsonl").exists() and (args.run / "sweep.json").is_file():
        return _show_sweep(args)
    from blipmon.core.safe_text import printable

    run = load_run(args.run)
    for w in run.warnings:
        print(f"blipmon: warning: {printable(w)}", file=sys.stderr)
    if args.json:
        print(json.dumps(run.summary(), indent=1))  # json escapes every control character itself
    else:
        sys.stdout.write(render_show(run))
        if isinstance(run.prediction, dict) and run.prediction.get("phases"):
            from blipmon.core.units import GIB
            from blipmon.estimate import predicted_vs_measured, render_predicted_vs_measured, render_verdict_line

            rows = predicted_vs_measured(run.prediction, run.summary())
            unit = "GiB" if any((r["predicted"] or 0) >= GIB for r in rows) else "MiB"
            # The saved prediction is read from the profile: its text is as untrusted as the rest.
            sys.stdout.write(printable(render_predicted_vs_measured(rows, unit=unit)))
            on_gpu = run.environment.get("device") == "cuda"
            sys.stdout.write(printable(render_verdict_line(run.prediction, on_gpu=on_gpu, oom=run.oom)))
    return 0


def _show_sweep(args: argparse.Namespace) -> int:
    """``show`` on a sweep folder: the comparison its sweep printed at the end, from its recorded runs."""
    from blipmon.commands.sweep import load_sweep_runs
    from blipmon.core.report import render_compare

    runs = load_sweep_runs(args.run)
    if not runs:
        print(f"blipmon: {args.run}: a sweep with no recorded runs yet", file=sys.stderr)
        return 0
    sys.stdout.write(render_compare(runs, "json" if args.json else "table"))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from blipmon.core.report import render_compare
    from blipmon.core.run import load_run

    if len(args.runs) > 6 and args.tui:
        raise UsageError("the compare view shows 2 to 6 runs")
    runs = [load_run(p) for p in args.runs]
    for r in runs:
        for w in r.warnings:
            print(f"blipmon: warning: {w}", file=sys.stderr)
    if args.tui:
        from blipmon.ui.app import run_compare

        return run_compare(args.runs)
    sys.stdout.write(render_compare(runs, args.format))
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from blipmon.ui.app import run_launcher

    return run_launcher()


def _is_sweep_dir(path: Path, *, attach: bool = False) -> bool:
    """True for a sweep folder (it holds ``sweep.json``); False for a run directory; else a clear error (exit 2).

    ``attach`` and ``replay`` take either, so a folder that is neither names both things it lacks. ``attach``
    also takes a run whose events.jsonl is still empty (the child has not written its header yet): it waits.
    """
    from blipmon.core.profile import EVENTS, check_run_dir
    from blipmon.core.run import check_follow_dir

    sweep_file = "sweep.json"  # blipmon.commands.sweep.SWEEP_FILE, without importing the sweep for a run
    if path.is_dir() and (path / sweep_file).is_file():
        from blipmon.commands.sweep import read_sweep_file

        if read_sweep_file(path) is None:
            raise UsageError(f"{path}: its {sweep_file} cannot be read as a sweep's")
        return True
    if path.is_dir() and not (path / EVENTS).exists():
        raise UsageError(f"{path}: not a blipmon run or sweep (no {EVENTS} or {sweep_file} in it)")
    if attach:
        check_follow_dir(path)
    else:
        check_run_dir(path)
    return False


def _cmd_replay(args: argparse.Namespace) -> int:
    if not MIN_SPEED <= args.speed <= MAX_SPEED:  # NaN fails both comparisons
        raise UsageError(
            f"--speed {args.speed:g}: expected a number from {MIN_SPEED:g} to {MAX_SPEED:g} (1 = real time)"
        )
    if _is_sweep_dir(args.run):
        from blipmon.ui.app import run_sweep_replay

        return run_sweep_replay(args.run, args.speed)
    from blipmon.ui.app import run_replay

    return run_replay(args.run, args.speed)


def _cmd_attach(args: argparse.Namespace) -> int:
    if _is_sweep_dir(args.run, attach=True):
        from blipmon.ui.app import run_sweep_attach

        return run_sweep_attach(args.run)
    from blipmon.ui.app import run_attach

    return run_attach(args.run)


def _cmd_watch(args: argparse.Namespace) -> int:
    """``watch``: its ``--sample-hz`` is held to ``runtime.sample_hz``'s range, then the recorder takes over."""
    if args.sample_hz is not None:
        from blipmon.core.config import SCHEMA, check_number

        msg = check_number("--sample-hz", args.sample_hz, SCHEMA["runtime.sample_hz"])
        if msg:
            raise UsageError(msg.replace(" = ", " ", 1))
    return int(_lazy("blipmon.commands.watch", "main")(args))


def _lazy(module: str, name: str) -> Any:
    """Dispatch to a handler in another module, or say plainly that the feature has not landed."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                raise UsageError(f"`blipmon {args.command}` is not available in this version yet") from None
            raise
        return int(getattr(mod, name)(args))

    return handler


_HANDLERS = {
    "dashboard": _cmd_dashboard,
    "presets": _cmd_presets,
    "run": _cmd_run,
    "show": _cmd_show,
    "compare": _cmd_compare,
    "replay": _cmd_replay,
    "attach": _cmd_attach,
    "models": _lazy("blipmon.commands.models", "main"),
    "estimate": _lazy("blipmon.commands.estimate", "main"),
    "sweep": _lazy("blipmon.commands.sweep", "main"),
    "watch": _cmd_watch,
}
