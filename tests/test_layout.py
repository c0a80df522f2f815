"""The layout keeps its promises (ARCHITECTURE.md): train.py is the schema and the stage list, modules stay small,
the package has no import cycle, nothing manipulates sys.path, and ruff is clean."""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys

from conftest import ROOT

PROJECT_FILES = sorted(
    path for pattern in ("*.py", "finetune/**/*.py", "scripts/*.py", "tests/*.py")
    for path in glob.glob(os.path.join(ROOT, pattern), recursive=True)
)


def module_name(path: str) -> str:
    relative = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return relative.removesuffix(".__init__")


def project_imports(path: str, modules: set[str]) -> set[str]:
    """Project modules this file imports, at any depth, except under `if TYPE_CHECKING:` (annotations only)."""
    tree = ast.parse(open(path).read())
    skipped = {id(node) for top in ast.walk(tree) if isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test)
               for node in ast.walk(top)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        found |= {name for name in names if name in modules}
    return found


def test_train_py_is_the_schema_and_the_stage_list():
    lines = open(os.path.join(ROOT, "train.py")).read().splitlines()
    assert len(lines) <= 740, len(lines)
    top_level = [node for node in ast.parse("\n".join(lines)).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    classes = {node.name for node in top_level if isinstance(node, ast.ClassDef)}
    assert classes == {"ModelArguments", "DataArguments", "TrainingArguments", "GenerationArguments"}
    assert {node.name for node in top_level} - classes <= {"require", "build_parser", "parse_arguments", "run", "main"}


def test_no_module_over_1000_lines_and_no_sys_path():
    for path in PROJECT_FILES:
        text = open(path).read()
        assert len(text.splitlines()) <= 1000, path
        for call in ("insert", "append"):
            assert f"sys.path.{call}(" not in text, path


def test_no_import_cycle_between_project_modules():
    package = [p for p in PROJECT_FILES if os.path.relpath(p, ROOT).startswith("finetune")]
    package += [os.path.join(ROOT, "train.py"), os.path.join(ROOT, "dataset_formats.py")]
    modules = {module_name(p) for p in package}
    graph = {module_name(p): project_imports(p, modules) for p in package}
    for name in list(graph):  # `from finetune.outputs import hub` names the package and the module
        graph[name] = {m for m in graph[name] if not any(other.startswith(m + ".") for other in modules) or m == name}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for child in graph.get(node, ()):
            assert state.get(child) != 1, "import cycle: " + " -> ".join(trail + [node, child])
            if child not in state:
                visit(child, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
    assert graph["finetune.config.cli"] and "train" not in set().union(*graph.values())


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", ROOT], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_every_module_fixture_is_built_on_one_test_worker():
    """A module fixture (a shared training run) is built once only if its module's tests share a worker: each such
    module must be in conftest.WORKER_GROUPS, which the scheduler reads (xdist's own group mark no longer holds)."""
    from conftest import WORKER_GROUPS

    marker = "@pytest.fixture(scope=" + '"module")'  # split, so that this file does not match itself
    with_module_fixture = {
        os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))
        if marker in open(path).read()
    }
    assert with_module_fixture and with_module_fixture <= WORKER_GROUPS.keys(), with_module_fixture - WORKER_GROUPS.keys()
    assert all(os.path.exists(os.path.join(ROOT, path)) for path in WORKER_GROUPS)


def test_every_python_script_answers_help():
    """The benchmark and helper scripts are run by hand, not by the suite: at least their command lines must parse
    (a duplicated option once made benchmark_throughput.py fail before it started)."""
    scripts = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py")))
    assert len(scripts) >= 5
    for script in scripts:
        result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "usage:" in result.stdout, f"{script}: {result.stderr[-2000:]}"
