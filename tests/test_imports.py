"""The import graph of ``hmora_ds``: no cycles, and imports only go down the declared layers.

Every module is parsed with ``ast`` (nothing is imported, so this runs in well under a second):
imports at module level and inside functions (lazy imports) count alike and relative imports
are resolved. For cycles, importing ``a.b.c`` also depends on the packages ``a.b`` and ``a``
(Python runs their ``__init__`` first) unless the importer lives inside them.
``docs/architecture.md`` describes the layers for contributors.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

# Also run inside the CPU image by `make image-test` (tests/test_image.py).
pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "hmora_ds"

#: The top-level modules and subpackages of ``hmora_ds``, bottom layer first. A module may import
#: from its own layer and from the layers below, never from a layer above. ``__init__`` is the
#: root package itself (``__version__`` and the public names it resolves lazily).
LAYERS: dict[int, tuple[str, ...]] = {
    # foundations: configs, losses, the frozen base model, assets, process/model loading
    # and the command-line helpers and shipped config files every command uses
    0: (
        "__init__",
        "config",
        "losses",
        "lm_head",
        "base_model",
        "assets",
        "runtime",
        "cli",
        "resources",
        "_lm_eval_hook",
    ),
    # expert banks and dispatchers, routers and the routing context, routing statistics, the
    # K-means pre-clustering of prompts (HiMoLE stage 1; a method may use it)
    1: ("experts", "routing", "metrics", "cluster"),
    # the methods: one file each, and the registry
    2: ("methods",),
    # the wrapper model and what works on it directly; the LoRA library (its adapters' files)
    # and building a model that composes one
    3: (
        "model",
        "params",
        "adapter_io",
        "optim",
        "parallel",
        "memory",
        "library",
        "composition",
        "compile",
        "peft_interop",
        "full_model",
    ),
    # libraries over the model: datasets, benchmark evaluation (training validates with eval)
    4: ("data", "eval"),
    # training and what reads its checkpoints
    5: ("train", "export"),
    # tools built on everything below; the LoRA library's commands (``python -m
    # hmora_ds.library build | lorahub | show``) sit here while its manifest and loader (the
    # package itself) are layer 3
    6: (
        "analysis",
        "analyze",
        "bench",
        "plan",
        "ablate",
        "config_doc",
        "library.build",
        "library.hub",
        "library.cli",
        "library.__main__",
        "inference",
        "chat",
        "generate",
        "lm_eval_model",
        "__main__",
    ),
}

#: Imports the layer order would allow but which are not wanted: tools that run a model without
#: training it share ``runtime`` with ``train`` instead of depending on it. (``eval`` importing
#: ``train`` is already an upward import.)
FORBIDDEN: set[tuple[str, str]] = {
    ("analysis", "train"),
    ("analyze", "train"),
    ("bench", "train"),
}

#: Import cycles tolerated for now, each as the set of modules of one strongly connected
#: component. Nothing may be added here: fix a new cycle instead.
KNOWN_CYCLES: set[frozenset[str]] = set()


# ---------------------------------------------------------------------------------------------
# the graph


def discover(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is_package) for every module of ``package`` under ``root``."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        modules[".".join(parts)] = (path, is_package)
    return modules


def lazy_names(path: Path) -> dict[str, str]:
    """``{name: module}`` of a package ``__init__`` that resolves names lazily via ``_LAZY``."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in targets):
                return ast.literal_eval(node.value)
    return {}


def build_graph(root: Path, package: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The import graph: module → {imported module: ``file:line`` of the first import}.

    Also returns the imports of ``package`` modules that do not exist (a lazy import left
    behind by a move would otherwise only fail when its function runs).
    """
    modules = discover(root, package)
    lazy = lazy_names(modules[package][0])
    graph: dict[str, dict[str, str]] = {}
    missing: list[str] = []
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
        edges: dict[str, str] = {}
        for node in sorted(imports, key=lambda n: n.lineno):
            where = f"{path.relative_to(root).as_posix()}:{node.lineno}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == package or alias.name.startswith(package + "."):
                        if alias.name in modules:
                            edges.setdefault(alias.name, where)
                        else:
                            missing.append(f"{where} imports {alias.name}, which does not exist")
                continue
            if node.level:  # relative: `from .. import x` inside package `here`
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source != package and not source.startswith(package + "."):
                continue
            if source not in modules:
                missing.append(f"{where} imports from {source}, which does not exist")
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules:
                    edges.setdefault(sub, where)
                elif source == package and alias.name in lazy:
                    edges.setdefault(lazy[alias.name], where)
                else:
                    edges.setdefault(source, where)
        edges.pop(name, None)
        graph[name] = edges
    return graph, missing


def with_packages(graph: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The graph plus the packages Python imports first: importing ``a.b.c`` runs ``a`` and
    ``a.b`` (except the importer's own enclosing packages, which are already running)."""
    full = {}
    for importer, edges in graph.items():
        full[importer] = dict(edges)
        for target, where in edges.items():
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if importer != parent and not importer.startswith(parent + "."):
                    full[importer].setdefault(parent, f"{where} (package of {target})")
    return full


def strongly_connected(graph: dict[str, dict[str, str] | set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one node (Tarjan, iterative)."""
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
            node, successors = work[-1]
            for succ in successors:
                if succ not in graph:
                    continue
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
    return components


def cycle_through(graph: dict[str, dict[str, str] | set[str]], component: set[str]) -> list[str]:
    """A shortest cycle inside ``component``, as ``[a, b, …, a]`` (starting at its first node)."""
    start = min(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph[node]):
            if succ == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if succ in component and succ not in came_from:
                came_from[succ] = node
                queue.append(succ)
    raise AssertionError(f"no cycle in {sorted(component)}")


def unit(module: str) -> str:
    """The top-level module or subpackage of ``hmora_ds`` a module belongs to (its LAYERS key),
    or the module of a subpackage that LAYERS places on its own (``library.build``)."""
    parts = module.split(".")
    if len(parts) > 2 and ".".join(parts[1:3]) in layer_of():
        return ".".join(parts[1:3])
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of() -> dict[str, int]:
    return {name: layer for layer, names in LAYERS.items() for name in names}


@pytest.fixture(scope="module")
def scanned():
    return build_graph(ROOT, PACKAGE)


@pytest.fixture(scope="module")
def graph(scanned):
    return scanned[0]


# ---------------------------------------------------------------------------------------------
# the rules


def test_imported_modules_exist(scanned):
    missing = scanned[1]
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_no_import_cycles(graph):
    graph = with_packages(graph)
    found = {frozenset(c): c for c in strongly_connected(graph)}
    new = [
        " -> ".join(cycle_through(graph, c)) + f"   (component: {', '.join(sorted(c))})"
        for key, c in found.items()
        if key not in KNOWN_CYCLES
    ]
    assert not new, "import cycles:\n" + "\n".join(new)
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"no longer a cycle, remove from KNOWN_CYCLES: {gone}"


def test_layer_table_is_consistent():
    names = [name for names in LAYERS.values() for name in names]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    assert not duplicated, f"in more than one layer of LAYERS: {duplicated}"
    assert sorted(LAYERS) == list(range(len(LAYERS)))
    unknown = sorted({n for pair in FORBIDDEN for n in pair} - set(names))
    assert not unknown, f"FORBIDDEN names what LAYERS does not: {unknown}"


def test_every_module_has_a_layer(graph):
    layers = layer_of()
    absent = sorted({unit(m) for m in graph} - set(layers))
    assert not absent, (
        f"hmora_ds.{{{', '.join(absent)}}} not in the layer table: add it to LAYERS in "
        "tests/test_imports.py (and to docs/architecture.md)"
    )


def test_imports_go_down_the_layers(graph):
    layers = layer_of()
    upward = []
    for importer, edges in sorted(graph.items()):
        for imported, where in sorted(edges.items()):
            a, b = unit(importer), unit(imported)
            if a == b or a not in layers or b not in layers:
                continue
            if layers[a] < layers[b]:
                upward.append(
                    f"{where}: {importer} ({a}, layer {layers[a]}) imports {imported} "
                    f"({b}, layer {layers[b]})"
                )
            elif (a, b) in FORBIDDEN:
                upward.append(f"{where}: {importer} imports {imported} ({a} must not use {b})")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


# ---------------------------------------------------------------------------------------------
# the checker itself (so the rules above cannot pass vacuously)


def test_cycle_finder_finds_a_synthetic_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [{"a", "b", "c"}]
    assert cycle_through(graph, {"a", "b", "c"}) == ["a", "b", "c", "a"]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_graph_sees_lazy_relative_and_package_imports(tmp_path):
    files = {
        "pkg/__init__.py": "_LAZY = {'Thing': 'pkg.sub.c'}\n",
        "pkg/a.py": "def f():\n    from . import b\n    from .sub.c import g\n",
        "pkg/b.py": "import os\nfrom pkg import Thing\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "def g():\n    from ..a import f\n    import pkg.gone\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph, missing = build_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.b": "pkg/a.py:2", "pkg.sub.c": "pkg/a.py:3"}
    assert graph["pkg.b"] == {"pkg.sub.c": "pkg/b.py:2"}  # through the lazy name
    assert graph["pkg.sub.c"] == {"pkg.a": "pkg/sub/c.py:2"}
    assert missing == ["pkg/sub/c.py:3 imports pkg.gone, which does not exist"]
    assert strongly_connected(graph) == [{"pkg.a", "pkg.b", "pkg.sub.c"}]
    assert set(with_packages(graph)["pkg.a"]) == {"pkg.b", "pkg.sub", "pkg.sub.c"}
    assert set(with_packages(graph)["pkg.sub.c"]) == {"pkg.a"}  # pkg.sub is its own package
    # a package importing its own submodule is no cycle; one closed through an __init__ is
    plain = {"p": {"p.x": "1"}, "p.x": {}, "q": {"p.x": "2"}}
    assert strongly_connected(with_packages(plain)) == []
    looped = with_packages({"p": {"p.x": "1"}, "p.x": {"q": "2"}, "q": {"p.y": "3"}, "p.y": {}})
    assert strongly_connected(looped) == [{"p", "p.x", "q"}]
