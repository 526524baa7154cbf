"""The quamba_fx modules import each other without a circle, counting imports inside functions too.

A function-level import only hides a circle from the interpreter; the modules still depend on each
other, so a change to either can break the other's import order. This test reads the source with
`ast` (nothing is imported) and checks the module graph is acyclic.

Edges: `import a.b` and `from a.b import c` depend on `a.b`, or on the submodule `a.b.c` when `c` is
one, and on the `__init__` of every package on the way that the importer is not itself inside
(`quamba_fx.passes` for `from .passes.verify import x`: importing a submodule runs its package
first). The top-level package is left out of those implicit edges: its `__init__` imports nothing
of ours at import time (it is lazy, PEP 562), so importing `quamba_fx.x` never runs the rest. A
dynamic import (`importlib.import_module` with a name that is not a literal) is taken to import
every module of the package, which is what that lazy `__init__` does on first use of a name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "quamba_fx"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(module: str, is_package: bool, target: str | None, level: int) -> str | None:
    """The absolute name of `from <level dots><target> import ...` written in `module`."""
    if level == 0:
        return target
    base = module.split(".")
    if not is_package:
        base.pop()
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `module` imports anywhere in its source (module level or in functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node.module, node.level)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else source)
        elif isinstance(node, ast.Call) and _is_import_module(node.func):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                anchor = node.args[1] if len(node.args) > 1 else None
                level = len(arg.value) - len(arg.value.lstrip("."))
                if level and not (isinstance(anchor, ast.Name) and anchor.id == "__name__"):
                    raise AssertionError(f"{module}: relative import_module without __name__ anchor")
                found.add(_resolve(module, is_package, arg.value.lstrip(".") or None, level))
            else:
                found.update(modules)
    found = {name for name in found if name in modules and name != module}
    for name in list(found):
        parts = name.split(".")
        for end in range(2, len(parts)):
            package = ".".join(parts[:end])
            if package in modules and not f"{module}.".startswith(f"{package}."):
                found.add(package)
    return found


def _is_import_module(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively: the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest circle through the first module of `component`, as `a -> b -> ... -> a`."""
    members = set(component)
    start = component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in parent:
                    parent[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no circle through {start}")


def describe_cycles(graph: dict[str, set[str]]) -> str:
    lines = []
    for component in strongly_connected(graph):
        lines.append(f"{len(component)} modules in a circle: {', '.join(component)}")
        lines.append("  e.g. " + " -> ".join(one_cycle(graph, component)))
    return "\n".join(lines)


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 40, "the module scan found too few modules; is ROOT right?"
    report = describe_cycles(graph)
    assert not report, "import circles among quamba_fx modules:\n" + report


def test_cycle_detection_finds_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("import quamba_fx.a\n")
    (pkg / "leaf.py").write_text("from . import c\n")
    graph = import_graph(pkg)
    assert graph["quamba_fx.a"] == {"quamba_fx.sub", "quamba_fx.sub.b"}  # sub's __init__ runs first
    assert graph["quamba_fx.sub.b"] == {"quamba_fx.c"}
    assert strongly_connected(graph) == [["quamba_fx.a", "quamba_fx.c", "quamba_fx.sub.b"]]
    assert one_cycle(graph, ["quamba_fx.a", "quamba_fx.c", "quamba_fx.sub.b"]) == [
        "quamba_fx.a", "quamba_fx.sub.b", "quamba_fx.c", "quamba_fx.a"
    ]



def test_a_circle_through_a_package_init_is_found(tmp_path):
    """`o` imports `k.s`, which runs `k/__init__`, which imports `k.h`, which imports `o`."""
    pkg = tmp_path / PACKAGE
    (pkg / "k").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "k" / "__init__.py").write_text("from .h import f\n")
    (pkg / "k" / "h.py").write_text("def f():\n    from .. import o\n")
    (pkg / "k" / "s.py").write_text("")
    (pkg / "o.py").write_text("from .k.s import x\n")
    graph = import_graph(pkg)
    assert graph["quamba_fx.k.h"] == {"quamba_fx.o"}  # its own package is not an edge
    assert strongly_connected(graph) == [["quamba_fx.k", "quamba_fx.k.h", "quamba_fx.o"]]

def test_a_dynamic_import_depends_on_every_module(tmp_path):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import importlib\nfor m in ['a']:\n    importlib.import_module(f'.{m}', __name__)\n"
    )
    (pkg / "a.py").write_text("from . import __version__\n")
    graph = import_graph(pkg)
    assert graph["quamba_fx"] == {"quamba_fx.a"}
    assert strongly_connected(graph) == [["quamba_fx", "quamba_fx.a"]]


def test_no_module_registers_op_kinds_on_import():
    """graph_info declares the kinds of every op the package puts into a graph; a `register_op` call
    elsewhere would make verification depend on whether that module was imported."""
    calls = []
    for module, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", None))
                if name in ("register_op", "register_module"):
                    calls.append(f"{module}:{node.lineno} {name}")
    assert calls == []


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: ~5 s on 2 cores
def test_the_runtime_imports_first_in_a_fresh_interpreter():
    """kernel_lowering reads torch.ops.quamba.selective_scan at import; it must register it itself
    rather than rely on some other module having been imported before."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT.parent)}
    done = subprocess.run([sys.executable, "-c", "import quamba_fx.runtime"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]
