"""Import numpy without starting OpenBLAS's thread pool, and leave the environment as it was.

blipmon's own processes (the dashboard, ``show``, ``compare``, a sweep's loop) use numpy for columns of
samples: element-wise maths, minima and maxima, never a matrix product, so the BLAS library numpy bundles has
nothing to do. Loading it still starts one thread per core and gives each a buffer: on a small loaded machine
that was 50-70 ms of the dashboard's time to its first frame (issue 17; ``benchmarks/latency.py``), a tenth of
the budget. OpenBLAS reads ``OPENBLAS_NUM_THREADS`` once, when numpy loads it, so the variable is set only for
that import and removed straight after: every process blipmon starts later (a training child, ``watch``'s
command) inherits the user's environment unchanged. A value the user set is never touched.
"""

from __future__ import annotations

import os
import sys

# The variables each BLAS build numpy may bundle reads for its thread count.
_BLAS_THREADS = ("OPENBLAS_NUM_THREADS",)


def import_numpy_single_threaded() -> None:
    """Import numpy with a one-thread BLAS unless it is already imported or the user chose a thread count."""
    if "numpy" in sys.modules:
        return
    added = [name for name in _BLAS_THREADS if name not in os.environ]
    for name in added:
        os.environ[name] = "1"
    try:
        import numpy  # noqa: F401 - imported for its side effect: loaded now, with the setting above
    finally:
        for name in added:
            os.environ.pop(name, None)
