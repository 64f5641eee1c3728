"""Dependencies point one way (issue 13): the library never imports the research tools or the CLI, and no
two engram modules import each other in a cycle.

The check reads every module under engram/ as source (``ast``), so it needs no import to succeed and
sees imports inside functions too. Layers:

- research and CLI: ``RESEARCH`` below (and everything under those packages);
- library: every other module, ``engram/__init__.py`` included, so a new module is library unless it
  is put in a research package.
"""

import ast
from pathlib import Path

ENGRAM = Path(__file__).resolve().parents[1] / "engram"
RESEARCH = ("engram.sweeps", "engram.analysis", "engram.longctx", "engram.demo", "engram.bench", "engram.plotting",
            "engram.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ENGRAM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ENGRAM.rglob("*.py"))}


def in_package(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def targets(node: ast.AST, module: str) -> list[str]:
    """The engram modules an import statement loads: ``import a.b`` -> a.b; ``from a import b`` -> a, and
    a.b when b is a module (a package's ``__init__`` is the package's own name)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if in_package(a.name, ["engram"])]
    if node.level:  # relative: from the module's package (a package's __init__ is its own package)
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if not in_package(base, ["engram"]):
        return []
    return [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]


class Imports(ast.NodeVisitor):
    """(line, target) of every engram import; ``top_level`` leaves out function bodies (run later, if at
    all) and ``if TYPE_CHECKING:`` blocks (never run)."""

    def __init__(self, module: str, top_level: bool):
        self.module, self.top_level, self.found = module, top_level, []

    def visit_Import(self, node):
        self.found += [(node.lineno, t) for t in targets(node, self.module)]

    visit_ImportFrom = visit_Import

    def visit_FunctionDef(self, node):
        if not self.top_level:
            self.generic_visit(node)

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_If(self, node):
        type_checking = "TYPE_CHECKING" in (getattr(node.test, "id", None), getattr(node.test, "attr", None))
        if not (self.top_level and type_checking):
            self.generic_visit(node)


def imports(module: str, top_level: bool) -> list[tuple[int, str]]:
    visitor = Imports(module, top_level)
    visitor.visit(ast.parse(MODULES[module].read_text(), str(MODULES[module])))
    return visitor.found


def test_the_layers_are_found():
    library = [m for m in MODULES if not in_package(m, RESEARCH)]
    assert {"engram", "engram.config", "engram.model.engram", "engram.train.loop"} <= set(library)
    assert {"engram.sweeps.runner", "engram.analysis.hooks", "engram.cli", "engram.demo"} <= set(MODULES) - set(library)
    # a stale engram/experiments/__pycache__ may outlive a checkout; only source files count
    assert not [m for m in MODULES if in_package(m, ["engram.experiments"])], \
        "engram/experiments was regrouped into engram.sweeps, engram.analysis, engram.demo and engram.bench"


def test_the_library_never_imports_research_code_or_the_cli():
    bad = [f"{MODULES[m].relative_to(ENGRAM.parent)}:{line}: library module {m} imports {target}"
           for m in MODULES if not in_package(m, RESEARCH)
           for line, target in imports(m, top_level=False) if in_package(target, RESEARCH)]
    assert not bad, ("the library layer must not depend on the research tools or the CLI "
                     f"({', '.join(RESEARCH)}):\n  " + "\n  ".join(bad))


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that returns to its first module) per strongly connected group of modules."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(v):  # Tarjan; module graphs are small, so recursion depth is no concern
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                groups.append(set(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for group in groups:  # the shortest way from the group's first module back to it (breadth first)
        start = min(group)
        came_from, queue, last = {start: None}, [start], None
        while last is None:
            v = queue.pop(0)
            for w in sorted(graph[v] & group):
                if w == start:
                    last = v
                    break
                if w not in came_from:
                    came_from[w] = v
                    queue.append(w)
        path = [start]
        while last != start:
            path.insert(1, last)
            last = came_from[last]
        cycles.append(path + [start])
    return cycles


def test_find_cycles_reports_a_loop():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_engram_modules():
    lines = {}
    graph = {m: set() for m in MODULES}
    for m in MODULES:
        for line, target in imports(m, top_level=True):
            if target in MODULES and target != m:
                graph[m].add(target)
                lines.setdefault((m, target), line)
    cycles = find_cycles(graph)
    described = [" -> ".join(c) + "\n    " + "; ".join(
        f"{MODULES[a].relative_to(ENGRAM.parent)}:{lines[a, b]} imports {b}" for a, b in zip(c, c[1:])) for c in cycles]
    assert not cycles, "module-level import cycles:\n  " + "\n  ".join(described)


def test_only_the_hf_integration_and_the_cli_import_transformers_and_engram_hf():
    """transformers is an optional extra: the core library imports neither it nor ``engram.hf``."""
    optional = ("engram.hf", "transformers", "lm_eval")
    bad = [f"{MODULES[m].relative_to(ENGRAM.parent)}:{line}: {m} imports {target}"
           for m in MODULES if not in_package(m, ("engram.hf", "engram.cli"))
           for line, target in imports(m, top_level=False) if in_package(target, optional)]
    assert not bad, "\n  ".join(bad)
