"""numpy imported with a one-thread BLAS by blipmon's own processes, the environment left as the user had it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, os, sys
from blipmon.core.numpy_init import import_numpy_single_threaded
import_numpy_single_threaded()
print(json.dumps({"threads": len(os.listdir("/proc/self/task")), "env": os.environ.get("OPENBLAS_NUM_THREADS"),
                  "numpy": "numpy" in sys.modules}))
"""


def _probe(env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _env_without_blas() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}


def test_numpy_loads_without_blas_threads_and_the_variable_is_gone_after() -> None:
    got = _probe(_env_without_blas())
    # The main thread only: OpenBLAS started no pool. Children blipmon starts later see no such variable.
    assert got == {"threads": 1, "env": None, "numpy": True}


def test_a_users_own_setting_is_kept() -> None:
    got = _probe({**_env_without_blas(), "OPENBLAS_NUM_THREADS": "2"})
    assert got["env"] == "2"
    assert got["threads"] == min(2, os.cpu_count() or 1)  # the user's two threads (one per core, at most)


def test_the_cli_imports_numpy_this_way_before_a_command_runs() -> None:
    code = (
        "import os, sys; from blipmon.cli import main; rc = main(['show', '/nonexistent']); "
        "print(len(os.listdir('/proc/self/task')), os.environ.get('OPENBLAS_NUM_THREADS'), 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env_without_blas(), capture_output=True, text=True)
    assert out.stdout.split() == ["1", "None", "True"], out.stderr
