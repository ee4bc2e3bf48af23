"""The import graph of ``refusal``, drawn from the code with ``ast``: it flows one way (no circles) and every
import sits at the top of its module, except the optional or heavy third-party packages listed below
(loaded only by the code that needs them). docs/ARCHITECTURE.md describes the layers this checks."""

from __future__ import annotations

import ast
import importlib
import re
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import REPO

SRC = REPO / "src"

#: Third-party packages a function may import for itself: optional extras, or seconds to import.
LAZY_ALLOWED = frozenset({
    "wandb", "optuna", "concept_erasure", "sklearn", "matplotlib", "llama_cpp", "gguf", "datasets",
    "huggingface_hub", "pyarrow", "lightning", "transformers", "accelerate", "safetensors", "psutil",
})


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted((src / "refusal").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _targets(module: str, node: ast.Import | ast.ImportFrom, is_package: bool, known: set[str]) -> list[str]:
    """The modules an import statement loads (``from pkg import sub`` loads ``pkg.sub`` when it is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def _imports(node: ast.AST, in_function: bool = False, type_only: bool = False):
    """Every import statement under ``node``, with whether it sits in a function and under ``if TYPE_CHECKING``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function, type_only
        yield from _imports(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)),
                            type_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)))


def import_graph(src: Path = SRC) -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module -> the refusal modules it imports at run time, [(module, line, target) of imports inside functions]).
    Imports under ``if TYPE_CHECKING`` never run, so they draw no edge."""
    files = module_files(src)
    known = set(files)
    edges: dict[str, set[str]] = defaultdict(set)
    in_functions: list[tuple[str, int, str]] = []
    for module, path in files.items():
        for node, in_function, type_only in _imports(ast.parse(path.read_text())):
            targets = _targets(module, node, path.name == "__init__.py", known)
            in_functions.extend((module, node.lineno, t) for t in targets if in_function)
            for target in targets if not type_only else []:
                while target not in known and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in known and target != module:
                    edges[module].add(target)
    return edges, in_functions


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_hand_drawn_circle_and_nothing_in_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}}) == []


def test_graph_reader_sees_relative_type_only_and_function_imports(tmp_path):
    pkg = tmp_path / "refusal"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from refusal import b\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import refusal.c\n")
    (pkg / "b.py").write_text("def f():\n    import refusal.a\n")
    (pkg / "c.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .x import y\n")
    (pkg / "sub" / "x.py").write_text("from ..c import z\n")
    edges, in_functions = import_graph(tmp_path)
    assert edges["refusal.a"] == {"refusal.b"}
    assert edges["refusal.b"] == {"refusal.a"}
    assert edges["refusal.sub"] == {"refusal.sub.x"} and edges["refusal.sub.x"] == {"refusal.c"}
    assert in_functions == [("refusal.b", 2, "refusal.a")]
    assert cycles(edges) == [["refusal.a", "refusal.b"]]


def test_the_import_graph_has_no_circles():
    edges, _ = import_graph()
    assert cycles(edges) == []


def package_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between the top-level modules and packages of ``refusal`` (``refusal.evaluation.run`` counts as
    ``evaluation``); ``__main__`` modules are entry points nothing imports, so they draw no edge."""
    def top(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else "refusal"

    out: dict[str, set[str]] = defaultdict(set)
    for module, targets in edges.items():
        if module.endswith("__main__"):
            continue
        out[top(module)].update(top(t) for t in targets if top(t) != top(module))
    return out


def test_the_packages_form_layers_with_no_circles_between_them():
    edges, _ = import_graph()
    assert cycles(package_graph(edges)) == []


def test_the_lower_layers_import_nothing_above_them():
    """The bottom of docs/ARCHITECTURE.md's picture, checked: models, data and runtime know no fitting,
    intervention, evaluation or app code; interventions know no evaluation or app code."""
    graph = package_graph(import_graph()[0])
    above = {"fitting", "interventions", "judges", "config", "context", "fits", "evaluation", "report", "app", "api"}
    for low in ("models", "data", "runtime", "metrics", "stats"):
        assert graph[low] & above == set(), low
    assert graph["interventions"] & {"config", "context", "fits", "evaluation", "report", "app", "api"} == set()


def test_imports_sit_at_module_top_except_optional_heavy_packages():
    _, in_functions = import_graph()
    offending = [f"{m}:{line} imports {t}" for m, line, t in in_functions if t.split(".")[0] not in LAZY_ALLOWED]
    assert offending == []


def test_compatibility_aliases_are_the_moved_modules():
    """Old import paths that plugins and users wrote keep working: each is the module that moved, not a copy."""
    from refusal._compat import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    documented = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    assert [old for old in MOVED if f"`{old}`" not in documented] == []


def test_every_package_docs_architecture_names_exists():
    page = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`refusal\.([a-z_.]+)`", page))
    assert named, "ARCHITECTURE.md names no modules"
    missing = [n for n in sorted(named) if f"refusal.{n}" not in module_files() and not _importable(f"refusal.{n}")]
    assert missing == []
    packages = {m.split(".")[1] for m in module_files() if m.count(".") >= 1 and (SRC / m.replace(".", "/")).is_dir()}
    assert sorted(p for p in packages if f"refusal.{p}" not in " ".join(f"refusal.{n}" for n in named)) == []


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("script", ["evaluate.py", "train.py"])
def test_root_scripts_import_only_existing_modules(script):
    tree = ast.parse((REPO / script).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("refusal"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{script}: {node.module}.{alias.name}"


def test_the_regrouping_kept_the_old_call_signatures():
    """Code written before the regrouping still runs: a registry with a built-ins hook (now optional) calls
    it on lookup. (The single-value config checks it used to re-export are gone: the schemas replaced them.)"""
    from refusal.registry import Registry

    calls = []
    registry = Registry("widget", "refusal.test_widgets", lambda: calls.append(1))
    assert registry.available() == {} and calls == [1]
