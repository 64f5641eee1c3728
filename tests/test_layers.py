"""The package's import rules and size limit, read from the source (``ast``), so no import has to succeed
and imports inside functions are seen too.

Layers, each allowed to import only the ones below it: **library** < **research** < **cli**.
- research: ``RESEARCH`` (and everything under those packages); cli: ``engram.cli``; library: every other
  module, ``engram/__init__.py`` included, so a new module is library unless it is put in a research
  package or the CLI.

Rules (each checker takes a table of module name -> source, so the tests below can plant a violation in
a made-up package and watch the rule fail):
1. ``layer_violations``: no module imports a higher layer, lazy imports (inside functions) included.
2. ``package_cycles``: no cycle between packages (``engram.model``, ``engram.train``, top-level modules such
   as ``engram.hashing``; the root ``engram/__init__`` is the public facade and not a node), lazy imports
   counted, ``if TYPE_CHECKING:`` imports not (they never run). Only the CLI may leave lazy imports out
   of the graph, by listing them in ``CLI_LAZY``.
3. ``module_cycles``: no cycle between modules at import time (top-level imports).
4. ``optional_imports``: only ``engram.hf`` and ``engram.cli`` import transformers, lm_eval or ``engram.hf``,
   an optional extra (``SHIMS``: a moved module that forwards its old names to the new home).
5. ``long_files``: no ``engram/`` file above ``MAX_LINES`` lines.
"""

import ast
from pathlib import Path

import pytest

ENGRAM = Path(__file__).resolve().parents[1] / "engram"
RESEARCH = ("engram.sweeps", "engram.analysis", "engram.longctx", "engram.demo", "engram.bench", "engram.plotting")
CLI = ("engram.cli",)
OPTIONAL = ("engram.hf", "transformers", "lm_eval")
MAX_LINES = 450
# (module, imported module) lazy imports of the CLI left out of the package graph: none are needed today
CLI_LAZY: set[tuple[str, str]] = set()
# old module -> its new home: the module only forwards names there (with a DeprecationWarning)
SHIMS = {"engram.retrofit": "engram.hf.retrofit"}


def in_package(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def layer_of(module: str) -> int:
    return 2 if in_package(module, CLI) else 1 if in_package(module, RESEARCH) else 0


LAYERS = ("library", "research", "cli")


def module_name(path: Path, root: Path = ENGRAM) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_tree(root: Path = ENGRAM) -> tuple[dict[str, str], set[str]]:
    """(module -> source, the modules that are packages) of every ``.py`` file under ``root``."""
    paths = sorted(root.rglob("*.py"))
    return ({module_name(p, root): p.read_text() for p in paths},
            {module_name(p, root) for p in paths if p.name == "__init__.py"})


SOURCES, PACKAGES = read_tree()


def targets(node, module: str, sources: dict, packages: set) -> list[str]:
    """The engram modules an import statement loads: ``import a.b`` -> a.b; ``from a import b`` -> a.b when
    b is a module, else a (so ``from engram import fileio`` is engram.fileio, not the root facade)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if in_package(a.name, ["engram"]) or in_package(a.name, OPTIONAL)]
    if node.level:  # relative: from the module's package (a package's __init__ is its own package)
        package = module.split(".") if module in packages else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if not (in_package(base, ["engram"]) or in_package(base, OPTIONAL)):
        return []
    submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in sources]
    return submodules if len(submodules) == len(node.names) else [base] + submodules


def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "text"`` assignments (what ``importlib.import_module(NAME)`` may name)."""
    return {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            for t in node.targets if isinstance(t, ast.Name)}


class Imports(ast.NodeVisitor):
    """(line, target, lazy) of every engram (and optional-package) import; ``if TYPE_CHECKING:`` blocks are
    skipped (never run). ``lazy``: inside a function, run later if at all. ``importlib.import_module`` with a
    literal, an f-string (its constant prefix: the package it reaches into) or a module constant counts too."""

    def __init__(self, module: str, sources: dict, packages: set, constants: dict | None = None):
        self.module, self.sources, self.packages = module, sources, packages
        self.constants = constants or {}
        self.found, self.depth = [], 0

    def visit_Call(self, node):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name == "import_module" and node.args:
            arg, target = node.args[0], None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                target = arg.value
            elif isinstance(arg, ast.Name):
                target = self.constants.get(arg.id)
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                target = str(arg.values[0].value).rstrip(".")
            if target and (in_package(target, ["engram"]) or in_package(target, OPTIONAL)):
                self.found.append((node.lineno, target, self.depth > 0))
        self.generic_visit(node)

    def visit_Import(self, node):
        self.found += [(node.lineno, t, self.depth > 0) for t in targets(node, self.module, self.sources,
                                                                           self.packages)]

    visit_ImportFrom = visit_Import

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_If(self, node):
        if "TYPE_CHECKING" in (getattr(node.test, "id", None), getattr(node.test, "attr", None)):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)


def imports_of(module: str, sources: dict, packages: set) -> list[tuple[int, str, bool]]:
    tree = ast.parse(sources[module], module)
    visitor = Imports(module, sources, packages, _constants(tree))
    visitor.visit(tree)
    return visitor.found


# -- the rules ---------------------------------------------------------------------------------------------

def layer_violations(sources: dict, packages: set) -> list[str]:
    return [f"{m}:{line}: {LAYERS[layer_of(m)]} module {m} imports {LAYERS[layer_of(t)]} module {t}"
            for m in sources for line, t, _ in imports_of(m, sources, packages)
            if in_package(t, ["engram"]) and layer_of(t) > layer_of(m)]


def package_of(module: str) -> str | None:
    """engram.model.engram -> engram.model; engram.hashing -> engram.hashing; the root facade -> None."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that returns to its first node) per strongly connected group of nodes."""
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
    for group in groups:  # the shortest way from the group's first node back to it (breadth first)
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


def _describe(cycles, where) -> list[str]:
    return [" -> ".join(c) + "\n    " + "; ".join(f"{where[a, b]} imports {b}" for a, b in zip(c, c[1:]))
            for c in cycles]


def package_cycles(sources: dict, packages: set, cli_lazy: set = frozenset()) -> list[str]:
    graph, where = {}, {}
    for m in sources:
        a = package_of(m)
        if a is None:
            continue
        graph.setdefault(a, set())
        for line, t, lazy in imports_of(m, sources, packages):
            b = package_of(t) if in_package(t, ["engram"]) else None
            if b is None or b == a or (lazy and (m, t) in cli_lazy):
                continue
            graph[a].add(b)
            graph.setdefault(b, set())
            where.setdefault((a, b), f"{m}:{line}{' (lazy)' if lazy else ''}")
    return _describe(find_cycles(graph), where)


def module_cycles(sources: dict, packages: set) -> list[str]:
    graph, where = {m: set() for m in sources}, {}
    for m in sources:
        for line, t, lazy in imports_of(m, sources, packages):
            if not lazy and t in sources and t != m:
                graph[m].add(t)
                where.setdefault((m, t), f"{m}:{line}")
    return _describe(find_cycles(graph), where)


def optional_imports(sources: dict, packages: set, shims: dict = SHIMS) -> list[str]:
    return [f"{m}:{line}: {m} imports {t}" for m in sources if not in_package(m, ("engram.hf",) + CLI)
            for line, t, _ in imports_of(m, sources, packages) if in_package(t, OPTIONAL)
            and not (m in shims and in_package(shims[m], [t]))]  # the new home, or its package


def long_files(sources: dict, limit: int = MAX_LINES) -> list[str]:
    return [f"{m}: {n} lines" for m, text in sorted(sources.items()) if (n := len(text.splitlines())) > limit]


# -- the package obeys them ---------------------------------------------------------------------------------

def test_the_layers_are_found():
    library = [m for m in SOURCES if layer_of(m) == 0]
    assert {"engram", "engram.config", "engram.model.engram", "engram.train.loop", "engram.schema"} <= set(library)
    assert {"engram.sweeps.runner", "engram.analysis.hooks", "engram.demo"} <= {m for m in SOURCES if layer_of(m) == 1}
    assert {"engram.cli", "engram.cli.commands"} <= {m for m in SOURCES if layer_of(m) == 2}
    # a stale engram/experiments/__pycache__ may outlive a checkout; only source files count
    assert not [m for m in SOURCES if in_package(m, ["engram.experiments"])], \
        "engram/experiments was regrouped into engram.sweeps, engram.analysis, engram.demo and engram.bench"


def test_no_module_imports_a_higher_layer():
    bad = layer_violations(SOURCES, PACKAGES)
    assert not bad, "library < research < cli, lazy imports included:\n  " + "\n  ".join(bad)


def test_no_import_cycles_between_packages_lazy_imports_counted():
    assert all(in_package(m, CLI) for m, _ in CLI_LAZY), "only the CLI's lazy imports may be left out"
    cycles = package_cycles(SOURCES, PACKAGES, CLI_LAZY)
    assert not cycles, "package-level import cycles:\n  " + "\n  ".join(cycles)


def test_no_import_cycles_among_modules():
    cycles = module_cycles(SOURCES, PACKAGES)
    assert not cycles, "module-level import cycles:\n  " + "\n  ".join(cycles)


def test_only_the_hf_integration_and_the_cli_import_transformers_and_engram_hf():
    """transformers is an optional extra: the core library imports neither it nor ``engram.hf``."""
    bad = optional_imports(SOURCES, PACKAGES)
    assert not bad, "\n  ".join(bad)


def test_a_shim_only_forwards_to_the_new_home():
    for old, new in SHIMS.items():
        found = {t for _, t, lazy in imports_of(old, SOURCES, PACKAGES) if lazy}
        assert len(SOURCES[old].splitlines()) < 40 and new in found, old  # it reaches the new home, lazily
        assert all(t == new or layer_of(t) == 0 and not in_package(t, OPTIONAL) for t in found), found


def test_no_file_is_longer_than_the_limit():
    bad = long_files(SOURCES)
    assert not bad, f"engram/ files above {MAX_LINES} lines (split them by concern):\n  " + "\n  ".join(bad)


# -- each rule fails on a planted violation -------------------------------------------------------------------

def planted(**modules: str) -> tuple[dict[str, str], set[str]]:
    """A made-up package: module name -> source; a name ending in ``/`` is a package (its ``__init__``)."""
    sources = {name.rstrip("/").replace("/", "."): text for name, text in modules.items()}
    packages = {name.rstrip("/").replace("/", ".") for name in modules if name.endswith("/")}
    return sources, packages


def test_find_cycles_reports_a_loop():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_a_library_module_importing_research_or_the_cli_is_caught():
    sources, packages = planted(**{"engram.model.engram": "def f():\n    from engram.sweeps import plan\n",
                                   "engram.sweeps.plan": "from engram.cli.flags import seed\n",
                                   "engram.cli.flags": "seed = 1\n", "engram.cli.commands": "import engram.sweeps.plan\n"})
    bad = layer_violations(sources, packages)
    assert len(bad) == 2  # the CLI importing research is fine
    assert "library module engram.model.engram imports research module engram.sweeps" in bad[0]
    assert "research module engram.sweeps.plan imports cli module engram.cli.flags" in bad[1]


def test_a_package_cycle_through_a_lazy_import_is_caught():
    sources, packages = planted(**{
        "engram.train.loop": "from engram.distributed.parallelize import parallelize\n",
        "engram.distributed.parallelize": "def save():\n    from engram.train import checkpoint\n",
        "engram.train/": "", "engram.train.checkpoint": "",
        "engram.model.config": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from engram.hashing import H\n",
        "engram.hashing": "from engram.model.config import C\n"})
    cycles = package_cycles(sources, packages)
    assert len(cycles) == 1 and cycles[0].startswith("engram.distributed -> engram.train -> engram.distributed")
    assert "(lazy)" in cycles[0]
    assert not module_cycles(sources, packages)  # at import time there is no loop: only the lazy import closes it
    lazy = {("engram.distributed.parallelize", "engram.train.checkpoint")}
    assert not package_cycles(sources, packages, lazy)  # what an allow-list entry would do (the CLI's only)


def test_a_module_cycle_at_import_time_is_caught():
    sources, packages = planted(**{"engram.model.a": "from engram.model import b\n",
                                   "engram.model/": "", "engram.model.b": "import engram.model.a\n"})
    assert module_cycles(sources, packages) and not package_cycles(sources, packages)


def test_dynamic_imports_count():
    sources, packages = planted(**{
        "engram.model.a": "import importlib\ndef f(x):\n    return importlib.import_module(f'engram.sweeps.{x}')\n",
        "engram.data.b": "import importlib\nHOME = 'engram.cli.flags'\nm = importlib.import_module(HOME)\n"})
    bad = layer_violations(sources, packages)
    assert len(bad) == 2 and "imports research module engram.sweeps" in bad[0] and "engram.cli.flags" in bad[1]


def test_the_optional_rule_catches_transformers_outside_the_hf_package():
    sources, packages = planted(**{"engram.storage.apply": "def f():\n    import transformers\n",
                                   "engram.retrofit": "x = 'engram.hf.retrofit'\n",
                                   "engram.hf.modeling": "import transformers\n"})
    bad = optional_imports(sources, packages)
    assert len(bad) == 1 and "engram.storage.apply imports transformers" in bad[0]
    sources["engram.retrofit"] = "def __getattr__(name):\n    from engram.hf import retrofit\n"
    assert len(optional_imports(sources, packages)) == 1  # a declared shim may forward
    assert len(optional_imports(sources, packages, shims={})) == 2


@pytest.mark.parametrize("lines, caught", [(MAX_LINES, False), (MAX_LINES + 1, True)])
def test_the_size_rule_catches_a_file_one_line_too_long(lines, caught):
    sources, _ = planted(**{"engram.model.big": "x = 1\n" * lines})
    assert bool(long_files(sources)) is caught
