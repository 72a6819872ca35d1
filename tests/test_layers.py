"""The layers import one way: main.py -> evaluation -> guided_diffusion, and no module imports itself back.

Inside a package the parts import one way too: a part is a sub-package (guided_diffusion/sampling/,
evaluation/study/, ...) or a module at the package's top; no two parts import each other, even through others,
and a module at the top of guided_diffusion/ imports no sub-package (the engine's base).

Every .py of guided_diffusion/, evaluation/, benchmarks/ and main.py is parsed (not imported) with `ast`; each
import of a project module is an edge, also one inside a function (a cycle hidden in a function is still a
cycle of the design), but not one under `if TYPE_CHECKING:` (annotations only, never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("guided_diffusion", "evaluation", "benchmarks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_files() -> dict[str, Path]:
    files = {"main": REPO / "main.py"}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            files[module_name(path)] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(absolute dotted name, line) of every import outside `if TYPE_CHECKING:` blocks; for `from x import y` both
    x and x.y (y may be a submodule)."""
    found: list[tuple[str, int]] = []
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            found.extend((f"{target}.{alias.name}", node.lineno) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported project module: line of the first such import}."""
    files = project_files()
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        edges: dict[str, int] = {}
        for name, line in imported_names(tree, module, path.name == "__init__.py"):
            if name in files and name != module:
                edges.setdefault(name, line)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, {})):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_walker_sees_imports_in_functions_but_not_under_type_checking():
    source = ("from typing import TYPE_CHECKING\nfrom .. import data\nif TYPE_CHECKING:\n    from ..config import X\n"
              "def f():\n    from .sample import run_sampling\n    import evaluation.freemask\n")
    names = {name for name, _ in imported_names(ast.parse(source), "guided_diffusion.sampling.paste", False)}
    assert {"guided_diffusion.data", "guided_diffusion.sampling.sample", "evaluation.freemask"} <= names
    assert "guided_diffusion.config" not in names


def test_the_cycle_finder_names_the_modules_of_a_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_the_project_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "guided_diffusion.config" in graph and "main" in graph
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {describe_cycle(cycle, graph)}"


def test_guided_diffusion_never_imports_evaluation():
    wrong = [f"{module} imports {target} (line {line})"
             for module, edges in import_graph().items() if module.split(".")[0] == "guided_diffusion"
             for target, line in edges.items() if target.split(".")[0] == "evaluation"]
    assert not wrong, "the lower layer imports the upper one: " + "; ".join(wrong)


def part_of(module: str) -> str:
    """The part a module belongs to: its sub-package (guided_diffusion.sampling), else the module itself."""
    return ".".join(module.split(".")[:2])


def part_graph() -> dict[str, dict[str, int]]:
    """part -> {imported part: line}, from the module graph of both packages (an entry point, `__main__`, only
    calls a part and is left out)."""
    graph: dict[str, dict[str, int]] = {}
    for module, edges in import_graph().items():
        if module.split(".")[0] not in PACKAGES[:2] or module.split(".")[-1] == "__main__":
            continue
        source = part_of(module)
        graph.setdefault(source, {})
        for target, line in edges.items():
            if part_of(target) != source and target.split(".")[0] in PACKAGES[:2]:
                graph[source].setdefault(part_of(target), line)
    return graph


def test_the_parts_of_each_package_import_one_way():
    graph = part_graph()
    assert {"guided_diffusion.sampling", "guided_diffusion.masks", "evaluation.study", "evaluation.segmenter"} \
        <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, f"the parts import each other: {' -> '.join(cycle)}"


def test_the_top_of_guided_diffusion_imports_no_sub_package():
    subpackages = {p.parent.name for p in (REPO / "guided_diffusion").glob("*/__init__.py")}
    assert {"sampling", "masks", "interchange"} <= subpackages
    wrong = [f"{module} imports {target} (line {line})" for module, edges in import_graph().items()
             if module.startswith("guided_diffusion.") and module.count(".") == 1
             for target, line in edges.items() if target.startswith("guided_diffusion.")
             and target.split(".")[1] in subpackages]
    assert not wrong, "the engine's base imports a part built on it: " + "; ".join(wrong)
