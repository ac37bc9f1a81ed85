"""The layout's rules that import-linter cannot see (docs/architecture.md, "The rule that keeps it this way").

- Importing every module of ``core``, ``runner``, ``estimate`` and ``integrations`` in a fresh interpreter never
  loads Textual: the contract in pyproject.toml checks imports in the source, this checks what actually runs
  (an import inside a function, an import done by a third-party package).
- No module reads another module's private (``_``) names.
- A file name blipmon writes is spelled once, in ``core/layout.py``; an exit code is defined once, in
  ``core/outcomes.py``; an error type once, in ``core/errors.py``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "blipmon"
# No exceptions: every module uses the others' public names only.
ESTIMATE_PRIVATE: set[tuple[str, str, str]] = set()


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


@pytest.mark.parametrize("package", ["blipmon.core", "blipmon.runner", "blipmon.estimate", "blipmon.integrations"])
def test_a_layer_below_the_dashboard_never_loads_textual(package: str) -> None:
    script = (
        "import importlib, json, pkgutil, sys\n"
        f"pkg = importlib.import_module({package!r})\n"
        "names = [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps({'modules': names, 'textual': sorted(m for m in sys.modules if m.split('.')[0] == 'textual')}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["modules"], f"{package} has no modules to import"
    assert result["textual"] == [], f"importing {package} loaded {result['textual'][:5]}"


def _private_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every ``from blipmon.x import _name`` and ``blipmon_module._name`` read in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, str]] = []
    aliases: dict[str, str] = {}  # local name -> blipmon module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("blipmon"):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append((node.module, a.name))
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("blipmon"):
                    aliases[a.asname or a.name.split(".")[0]] = a.asname and a.name or a.name.split(".")[0]
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append((aliases[node.value.id], node.attr))
    return found


def test_no_module_reads_another_modules_private_names() -> None:
    offenders = []
    for path in _modules():
        for module, name in _private_imports(path):
            if (_rel(path), module, name) in ESTIMATE_PRIVATE:
                continue
            offenders.append(f"{_rel(path)}: {module}.{name}")
    assert offenders == []


def test_the_private_name_check_sees_a_reach_in(tmp_path: Path) -> None:
    """The check above would have caught what issue 14 found: ``report._delta`` read by the compare view."""
    probe = tmp_path / "probe.py"
    probe.write_text("from blipmon.core.report import _delta, compare_rows\nfrom blipmon.core import config\n"
                     "x = config._toml_value\n", encoding="utf-8")  # fmt: skip
    assert _private_imports(probe) == [("blipmon.core.report", "_delta"), ("blipmon.core.config", "_toml_value")]


# Run-directory and sweep-folder names, and the default output folder: spelled only in core/layout.py.
FILE_NAMES = ("events.jsonl", "sweep.json", "config.json", "child.log", "sweep.log", "profiles")
# A Hugging Face checkpoint's own config.json (not a run's) is looked for where models are found.
HF_CONFIG = {"blipmon/runner/models.py", "blipmon/runner/preflight.py"}


def _string_constants(path: Path) -> list[str]:
    """String literals in code, docstrings left out (they name files for the reader, which is the point)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]


def test_file_names_are_spelled_only_in_core_layout() -> None:
    offenders = []
    for path in _modules():
        rel = _rel(path)
        if rel in ("blipmon/core/layout.py",) or rel.startswith("blipmon/estimate/"):
            continue
        for text in _string_constants(path):
            for name in FILE_NAMES:
                if text == name and not (name == "config.json" and rel in HF_CONFIG):
                    offenders.append(f"{rel}: {text!r}")
    assert offenders == []


def _defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        out.add(n.id)
    return out


def test_exit_codes_and_error_types_are_defined_once() -> None:
    homes: dict[str, list[str]] = {}
    for path in _modules():
        if _rel(path).startswith("blipmon/estimate/"):
            continue
        for name in _defined_names(path):
            if name.startswith("EXIT_") or name.endswith("EXIT_CODES") or name in ("UsageError", "ConfigError",
                                                                                   "ProfileError", "LaunchError"):  # fmt: skip
                homes.setdefault(name, []).append(_rel(path))
    assert {n: h for n, h in homes.items() if len(h) > 1} == {}
    assert homes["EXIT_STOPPED"] == ["blipmon/core/outcomes.py"]
    assert homes["UsageError"] == ["blipmon/core/errors.py"]
