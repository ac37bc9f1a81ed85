"""The ``blipmon`` command: parses arguments, dispatches to ``blipmon.commands.<name>.run``, maps errors to exit codes.

No logic here. Each subcommand is one module in ``blipmon/commands/`` with a ``run(args)``, imported only
when it is the one asked for, so ``blipmon show`` never imports torch or Textual. A user error
(``core/errors.py``: ``USER_ERRORS``) is one line on stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from blipmon.core.errors import USER_ERRORS, UsageError
from blipmon.core.outcomes import EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED, EXIT_USAGE

# Options whose value may start with "-": argparse takes "-1GiB" or "-inf" for an option and answers "expected
# one argument"; joined as "--gpu-memory=-1GiB" the value reaches our own check, which says what is wrong with it.
_VALUE_OPTIONS = ("--gpu-memory", "--host-memory", "--speed", "--sample-hz")
# Commands that never load numpy (every other one does, through its data or torch): they are not made to.
_NO_NUMPY = frozenset({"presets"})


def _parser() -> argparse.ArgumentParser:
    from blipmon.commands.replay import MAX_SPEED, MIN_SPEED
    from blipmon.core.formats import FORMATS

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
    s.add_argument("--modules", action="store_true", help="memory per module of the model, as a tree")
    s.add_argument("--depth", type=int, default=None, metavar="N", help="with --modules: levels below the root")
    s.add_argument("--step", type=int, default=None, metavar="S", help="with --modules: the step (default: the peak's)")
    s.add_argument(
        "--phase", default=None, metavar="P", help="with --modules: before_fwd, after_fwd, after_bwd or after_opt_step"
    )

    s = sub.add_parser("compare", help="compare runs side by side")
    s.add_argument("runs", type=Path, nargs="+", metavar="RUN")
    s.add_argument("--format", choices=FORMATS, default="table")
    s.add_argument("--tui", action="store_true", help="open the compare view of the dashboard")
    s.add_argument("--modules", action="store_true", help="per-module differences between the runs")

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
    s.add_argument("--modules", action="store_true", help="the predicted memory per module of the model")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("fit", help="largest batch that fits, and ranked changes that make it fit")
    s.add_argument("config", metavar="CONFIG", help="preset name, a TOML file, or a saved run (its configuration)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    s.add_argument("--gpu-memory", default=None, metavar="SIZE", help="the GPU's memory, with a unit: 80GiB, 24GB")
    s.add_argument(
        "--host-memory", default=None, metavar="SIZE", help="the machine's RAM, with a unit (CPU runs, offload)"
    )
    s.add_argument(
        "--sweep", type=Path, default=None, metavar="DIR", help="write the suggestions as a sweep's configurations"
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
    s.add_argument("--format", choices=FORMATS, default="table",
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
    args = _parser().parse_args(_join_dash_values(sys.argv[1:] if argv is None else list(argv)))
    command = args.command or "dashboard"
    try:
        return _dispatch(command, args)
    except USER_ERRORS as e:
        from blipmon.core.safe_text import printable

        print(f"blipmon: {printable(e)}", file=sys.stderr)  # messages quote paths and values: untrusted text
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Before a run exists (resolving, preflight): nothing was recorded, nothing is left behind. `run`
        # keeps its documented code for a stopped run, the others the shell's.
        if command == "run":
            print("blipmon: interrupted before the run started; nothing was recorded", file=sys.stderr)
            return EXIT_STOPPED
        print("blipmon: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


def _dispatch(command: str, args: argparse.Namespace) -> int:
    """``blipmon.commands.<command>.run(args)``, or say plainly that the command has not landed in this version."""
    module = f"blipmon.commands.{command}"
    if _opens_dashboard(command, args):
        gc.disable()  # start-up only: the app runs it again after its first frame (ui/app.py: startup_over)
    if command not in _NO_NUMPY:
        from blipmon.core.numpy_init import import_numpy_single_threaded

        import_numpy_single_threaded()  # before anything imports numpy: ~60 ms less to a dashboard's first frame
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise UsageError(f"`blipmon {command}` is not available in this version yet") from None
        raise
    return int(mod.run(args))


def _opens_dashboard(command: str, args: argparse.Namespace) -> bool:
    """Whether the command opens the dashboard (whose first frame ``gc.disable`` speeds up)."""
    if command in ("dashboard", "replay", "attach"):
        return True
    return bool(getattr(args, "live", False) or getattr(args, "tui", False))


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
