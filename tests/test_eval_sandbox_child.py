"""The sandbox's trust boundary: what runs inside it (``sandbox_child``) imports only the standard library."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from melora.lab.eval import sandbox, sandbox_child

CHILD = Path(sandbox_child.__file__).resolve()

# Loads the child file by path under `python -I -S` (no site-packages, no melora on sys.path) with a
# finder that records every module imported meanwhile; prints the ones outside the standard library.
PROBE = """
import importlib.util, json, sys
seen = []
class Recorder:
    def find_spec(self, name, path=None, target=None):
        seen.append(name)
        return None
sys.meta_path.insert(0, Recorder())
spec = importlib.util.spec_from_file_location("child_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
roots = {name.split(".")[0] for name in seen} | {name.split(".")[0] for name in sys.modules}
print(json.dumps(sorted(r for r in roots if r not in sys.stdlib_module_names and r not in ("__main__", "child_under_test"))))
"""


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level module) of every import statement, at any depth (functions import lazily)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "").split(".")[0]))
    return found


def non_stdlib_imports(source: str) -> list[str]:
    tree = ast.parse(source)
    return [f"line {line}: {name}" for line, name in _imports(tree) if name not in sys.stdlib_module_names]


def test_every_import_of_the_child_is_the_standard_library():
    source = CHILD.read_text(encoding="utf-8")
    assert len(_imports(ast.parse(source))) > 10  # the lazy imports inside functions are seen too
    assert non_stdlib_imports(source) == []
    assert all(name in sys.stdlib_module_names for name in sandbox_child._GUARDED)  # importlib targets


@pytest.mark.parametrize(
    ("line", "culprit"),
    [
        ("from melora.lab.eval import sandbox", "melora"),
        ("from .sandbox import run_program", ".sandbox"),
        ("import numpy as np", "numpy"),
    ],
)
def test_the_import_check_catches_a_non_stdlib_import(line, culprit):
    source = CHILD.read_text(encoding="utf-8").replace("def _libc():\n", f"def _libc():\n    {line}\n", 1)
    assert [entry.split(": ")[1] for entry in non_stdlib_imports(source)] == [culprit]


def _probe(path: Path) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", PROBE, str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_child_loads_without_site_packages_and_imports_only_the_standard_library():
    assert _probe(CHILD) == []


def test_the_probe_sees_a_third_party_import(tmp_path):
    polluted = tmp_path / "child.py"
    polluted.write_text(
        CHILD.read_text(encoding="utf-8").replace("import json\n", "import json\nimport melora\n", 1)
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", PROBE, str(polluted)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "No module named 'melora'" in done.stderr


def test_the_child_runs_as_a_script_in_isolated_mode():
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(CHILD), "no-such-role"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "sandbox: unknown role 'no-such-role'" in done.stderr


def test_the_evaluator_starts_this_file():
    assert Path(sandbox._CHILD) == CHILD and sandbox_child.SCRIPT == str(CHILD)
    assert sandbox.NOBODY == sandbox_child.NOBODY
