"""The README's two commands work on Debian/Ubuntu's system Python, which refuses `pip install` (PEP 668).

CI builds its environment from /usr/bin/python3 (see .ci/run), which proves the whole set-up end to end;
these tests hold the two properties that make it work, in seconds: nothing is installed with the
interpreter ``make`` was given (only with the project's .venv), and that venv can be made and has a pip.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = Path("/usr/bin/python3")


def _dry_run(python: str, venv: Path) -> list[list[str]]:
    out = subprocess.run(
        ["make", "-n", "-B", "setup", f"PYTHON={python}", f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def test_make_setup_installs_only_into_the_project_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    commands = _dry_run("/some/system/python3", venv)
    pip_calls = [c for c in commands if "pip" in c]
    assert pip_calls, commands
    for c in pip_calls:
        assert c[0] == f"{venv}/bin/python", f"pip run outside the venv: {shlex.join(c)}"
    # The system interpreter is used for exactly two things: the version check and making the venv.
    system_calls = [c for c in commands if c and c[0] == "/some/system/python3"]
    assert [c[1] for c in system_calls] == ["-c", "-m"]
    assert system_calls[1][1:4] == ["-m", "venv", str(venv)]
    # torch's CPU build is installed before the project, so the project's `torch>=` never pulls CUDA.
    installs = [c for c in pip_calls if "install" in c and "--upgrade" not in c]
    assert "torch==2.13.0" in installs[0]
    assert "-e" in installs[1]


def test_readme_commands_are_the_makefile_targets_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci/run").read_text()


@pytest.mark.skipif(not DEBIAN_PYTHON.exists(), reason="no Debian system Python on this machine")
def test_the_debian_system_python_refuses_pip_but_makes_a_venv_with_pip(tmp_path: Path) -> None:
    """The situation the Makefile is built for, checked on the real interpreter."""
    marker = subprocess.run(
        [str(DEBIAN_PYTHON), "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    managed = (Path(marker) / "EXTERNALLY-MANAGED").exists()
    venv = tmp_path / "venv"
    subprocess.run([str(DEBIAN_PYTHON), "-m", "venv", str(venv)], check=True, capture_output=True)
    pip = subprocess.run([str(venv / "bin/python"), "-m", "pip", "--version"], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    assert str(venv) in pip.stdout
    inside = subprocess.run(
        [str(venv / "bin/python"), "-c", "import sys; print(sys.prefix != sys.base_prefix)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert inside == "True"
    if managed:  # the venv's pip must not inherit the refusal
        r = subprocess.run(
            [str(venv / "bin/python"), "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps", str(ROOT)],
            capture_output=True,
            text=True,
        )
        assert "externally-managed-environment" not in r.stderr
    assert sys.version_info >= (3, 11)
