"""How runs and sweeps end, and the exit codes that say so: defined here once.

``blipmon run`` exits 0 ok, 1 error, 2 refused before starting (bad input), 3 out of memory, 4 stopped
or killed; the child, the dashboard's supervisor, the callbacks' ``end`` record and ``blipmon sweep``
use the same numbers. A sweep exits with the most severe code among its runs (``sweep_exit_code``).
"""

from __future__ import annotations

from collections.abc import Iterable

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # refused before anything started: bad input, a configuration preflight refuses
EXIT_OOM = 3
EXIT_STOPPED = 4  # stopped (SIGTERM, Ctrl-C) or killed
EXIT_INTERRUPTED = 130  # Ctrl-C outside a run, as shells report it (128 + SIGINT)
EXIT_NOT_EXECUTABLE = 126  # `watch`: the command exists but cannot be run, as shells report it
EXIT_NOT_FOUND = 127  # `watch`: no such command, as shells report it

RUN_STATUSES = ("running", "ok", "oom", "error", "stopped", "killed")
RUN_EXIT_CODES = {"ok": EXIT_OK, "error": EXIT_ERROR, "oom": EXIT_OOM, "stopped": EXIT_STOPPED, "killed": EXIT_STOPPED}
# A sweep's configuration may also be refused here (preflight), which is the code of refused input.
SWEEP_EXIT_CODES = {**RUN_EXIT_CODES, "refused": EXIT_USAGE}
# Most severe first: an interrupted sweep, then a broken run, then one that did not fit, then one not for this
# machine. ("Something is broken" above "it did not fit" above "not for this machine".)
SWEEP_SEVERITY = (EXIT_STOPPED, EXIT_ERROR, EXIT_OOM, EXIT_USAGE)


def run_exit_code(status: str) -> int:
    """``blipmon run``'s exit code for a recorded status (an unknown status is an error)."""
    return RUN_EXIT_CODES.get(status, EXIT_ERROR)


def status_of_exit_code(code: object) -> str:
    """The status a run's parent reports for its child's exit code, when the child wrote no ``end``."""
    return {EXIT_OK: "ok", EXIT_OOM: "oom", EXIT_STOPPED: "stopped"}.get(code, "error")  # type: ignore[call-overload]


def sweep_exit_code(codes: Iterable[int | None]) -> int:
    """0 if all ok, else the most severe code present (``SWEEP_SEVERITY``)."""
    present = {c for c in codes if c}
    for code in SWEEP_SEVERITY:
        if code in present:
            return code
    return EXIT_OK


__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_EXECUTABLE",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_OOM",
    "EXIT_STOPPED",
    "EXIT_USAGE",
    "RUN_EXIT_CODES",
    "RUN_STATUSES",
    "SWEEP_EXIT_CODES",
    "SWEEP_SEVERITY",
    "run_exit_code",
    "status_of_exit_code",
    "sweep_exit_code",
]
