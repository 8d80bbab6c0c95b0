"""The import graph of mmkern, read from the source with `ast` (nothing is imported): no cycles, and
the layer rules of DESIGN.md ("Layers": data flows down; nothing below imports from above).

Every `import` / `from ... import` statement counts, at module level or inside a function (a function-level
import that closes a cycle only hides the cycle until the function runs). Edges:
    import a.b.c              -> a.b.c
    from a.b import c         -> a.b.c when a.b.c is a module of mmkern (a submodule is imported), else a.b
                                 (a name looked up in a.b's __init__, which runs all of that __init__)
    from . import x / from .m import y   resolved against the importing module
The implicit edge from a submodule to the packages above it (importing a.b.c first runs a/__init__ and
a/b/__init__) is not counted: it is the package re-exporting its submodules, and a package that imports
its own submodules is no cycle. A cycle is an import of a *name* defined (or re-exported) in a module
that, directly or not, imports the importer: e.g. a submodule taking a helper from its package's
__init__, which imports that submodule (mmkern/diffusion/loss.py took `_timesteps` from
mmkern/diffusion/__init__.py so; the helpers now live in mmkern/diffusion/_args.py).

Imports by string (importlib.import_module, the dispatcher's lazy registration tables) are not in
the graph: they name a backend's adapter module for the dispatcher to load on demand.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "mmkern"

# DESIGN.md "Layers": the backends see only the problem record; they import nothing from the public API
# (mmkern/__init__.py, attention.py, norm.py, diffusion/, nn/) or from what is built on it.
BACKENDS = ("mmkern.reference", "mmkern.triton", "mmkern.native", "mmkern.torch_backend")
ABOVE_BACKENDS = ("mmkern.attention", "mmkern.norm", "mmkern.diffusion", "mmkern.nn", "mmkern.integrations",
                  "mmkern.models")
# The float64 oracle shares no numerics decisions with the kernels it judges: it imports nothing from the
# op layer or another backend, and they take nothing (a dtype rule, a coefficient formula) from it.
JUDGED = ("mmkern.ops", "mmkern.triton", "mmkern.native", "mmkern.torch_backend", "mmkern._C")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under mmkern/."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _within(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def import_edges(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported mmkern module: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.append(submodule if submodule in modules else source)
            for target in targets:
                if _within(target, ("mmkern",)) and target != name:
                    # an import of a module mmkern does not have as a file (mmkern._C, the compiled
                    # extension) counts as that name
                    edges.setdefault(target, node.lineno)
    return graph


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in graph:
                continue
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _shortest_cycle(graph, start: str, members: set[str]) -> list[str]:
    """Breadth-first from start back to itself, inside one strongly connected component."""
    paths, frontier = {start: [start]}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return paths[v] + [start]
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a component but on no cycle")


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Import cycles: the shortest through each module that is on one, each cycle once (from its smallest
    module). Empty when the graph has none."""
    cycles = []
    for component in _strongly_connected(graph):
        for start in component:
            cycle = _shortest_cycle(graph, start, set(component))
            first = cycle.index(min(cycle[:-1]))
            canonical = cycle[first:-1] + cycle[:first] + [cycle[first]]
            if canonical not in cycles:
                cycles.append(canonical)
    return cycles


def _describe(graph, path: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(path, path[1:])) + f" -> {path[-1]}"


GRAPH = import_edges(module_files())

# DESIGN.md "Layers", top to bottom. A module imports only from its own layer or the layers below.
# mmkern/__init__.py is the public API (the name "mmkern" stands for that file alone, not the package);
# modules in no layer (cli.py, verify.py, bench/, build/, backends.py, _version.py) are tools around them.
# The op layer's problem records are what every backend sees (DESIGN.md: "each sees only the problem
# record"): a record module of its own, mmkern/ops/<family>_problem.py, with the shape/dtype checks it
# validates with (mmkern/ops/_checks.py), sits under the backends; the rest of the op layer (torch.library
# definitions, autograd, the dispatch calls) above them.
RECORDS = ("mmkern.ops._checks",) + tuple(sorted(m for m in GRAPH if re.fullmatch(r"mmkern\.ops\.\w+_problem", m)))
LAYERS = [
    ("integrations and models", ("mmkern.integrations", "mmkern.models")),
    ("context parallelism", ("mmkern.distributed",)),
    ("public API", ("mmkern", "mmkern.attention", "mmkern.norm", "mmkern.diffusion", "mmkern.nn")),
    ("op layer", ("mmkern.ops",)),
    ("backends", BACKENDS + ("mmkern._C",)),
    ("problem records", RECORDS),
    # the registry the backends register their kernels with and the op layer dispatches through: it
    # stands in DESIGN.md's op row, but the backend packages import it to register themselves, so it
    # sits under them and imports no layer
    ("dispatcher", ("mmkern.dispatch",)),
]


def test_graph_sees_the_package():
    """The walk finds the modules and edges it must (a walk that finds nothing passes every rule)."""
    assert {"mmkern", "mmkern.dispatch", "mmkern.ops.norm", "mmkern.reference.norm", "mmkern.diffusion",
            "mmkern.integrations.transformers"} <= set(GRAPH)
    assert "mmkern.dispatch" in GRAPH["mmkern"]
    assert "mmkern.ops.norm" in GRAPH["mmkern.norm"]


def test_find_cycles_finds_a_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_relative_and_package_imports_resolve(tmp_path):
    modules = {"mmkern": tmp_path / "__init__.py", "mmkern.pkg": tmp_path / "pkg" / "__init__.py",
               "mmkern.pkg.a": tmp_path / "pkg" / "a.py", "mmkern.pkg.b": tmp_path / "pkg" / "b.py"}
    for path, text in [(modules["mmkern"], ""), (modules["mmkern.pkg"], "from .a import f\nfrom . import b\n"),
                       (modules["mmkern.pkg.a"], "def f():\n    from mmkern.pkg import g\n"),
                       (modules["mmkern.pkg.b"], "import mmkern.pkg.a\n")]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    graph = import_edges(modules)
    assert graph["mmkern.pkg"] == {"mmkern.pkg.a": 1, "mmkern.pkg.b": 2}
    assert graph["mmkern.pkg.a"] == {"mmkern.pkg": 2}       # a name from the package's __init__
    assert graph["mmkern.pkg.b"] == {"mmkern.pkg.a": 1}     # a submodule: not an edge to the package
    assert find_cycles(graph) == [["mmkern.pkg", "mmkern.pkg.a", "mmkern.pkg"],
                                  ["mmkern.pkg", "mmkern.pkg.b", "mmkern.pkg.a", "mmkern.pkg"]]


def test_no_import_cycles():
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles among mmkern modules:\n" + "\n".join(_describe(GRAPH, c) for c in cycles)


def _violations(importers, forbidden) -> list[str]:
    return [f"{module} imports {target} (line {line})" for module, edges in sorted(GRAPH.items())
            if _within(module, importers) for target, line in sorted(edges.items()) if _within(target, forbidden)]


def test_backends_import_nothing_from_above():
    """reference / triton / native / torch_backend import nothing from the public API, nn, integrations or
    models (nor the package itself: mmkern/__init__.py is the public API)."""
    bad = _violations(BACKENDS, ABOVE_BACKENDS) + [
        f"{module} imports mmkern (line {edges['mmkern']})" for module, edges in sorted(GRAPH.items())
        if _within(module, BACKENDS) and "mmkern" in edges]
    assert not bad, "backends importing from above (DESIGN.md, Layers):\n" + "\n".join(bad)


def test_reference_imports_nothing_from_the_kernels():
    bad = _violations(("mmkern.reference",), JUDGED)
    assert not bad, "the float64 oracle imports from the op layer or another backend:\n" + "\n".join(bad)


def test_kernels_import_nothing_from_the_reference():
    """The op layer and the other backends take no numerics decision from the oracle (it would then judge
    its own rule): what a dtype or a coefficient must be lives in the op layer's numerics contract."""
    bad = _violations(JUDGED, ("mmkern.reference",))
    assert not bad, "the op layer or a backend imports from the float64 oracle:\n" + "\n".join(bad)


def layer_of(module: str) -> int | None:
    """Index in LAYERS (0 = top) of the longest package prefix naming the module; None: a tool."""
    best, found = -1, None
    for i, (_, packages) in enumerate(LAYERS):
        for p in packages:
            hit = module == p if p == "mmkern" else _within(module, (p,))
            if hit and len(p) > best:
                best, found = len(p), i
    return found


def test_layer_of():
    assert layer_of("mmkern") == 2 and layer_of("mmkern.nn.norm") == 2 and layer_of("mmkern.ops.norm") == 3
    assert layer_of("mmkern.triton.norm") == 4 and layer_of("mmkern.models.denoiser") == 0
    assert layer_of("mmkern.ops._checks") == 5 and layer_of("mmkern.dispatch") == 6
    assert layer_of("mmkern.cli") is None and layer_of("mmkern.normx") is None


def test_no_layer_imports_from_above():
    bad = []
    for module, edges in sorted(GRAPH.items()):
        here = layer_of(module)
        for target, line in sorted(edges.items()):
            there = layer_of(target)
            if here is not None and there is not None and there < here:
                bad.append(f"{module} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]}), line {line}")
    assert not bad, "imports from a layer above (DESIGN.md, Layers: data flows down):\n" + "\n".join(bad)
