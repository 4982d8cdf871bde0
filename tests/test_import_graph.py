"""The import graph of ``src/mae`` has no cycle and no upward import: layers only look down.

Layers, bottom to top (a module may import its own layer and the layers below it, never one above):

0. foundation: `mae.errors`, `mae.files`, `mae.threads`, `mae.version`, `mae.config`, `mae.presets`, `mae.weights`
   (they import only each other, the standard library and yaml; `mae.weights` also huggingface_hub, filelock and
   tqdm; every layer above reads configs, writes files and finds released weights through them);
1. `mae.models`; 2. `mae.data`; 3. `mae.train`;
4. the consumers of a trained model, siblings: `mae.interop`, `mae.eval`, `mae.viz`, `mae.transfer`, `mae.bench`.
   A sibling may import another sibling (``transfer`` reads encoders through ``interop``); the cycle check keeps
   such imports one-way;
5. `mae.recipes`; 6. the entry points: `mae.cli`, `mae.api`, the package root `mae` and `mae.__main__`.

What counts as an import: every ``import`` statement anywhere in a module (module level, inside functions, under
``if TYPE_CHECKING:``), relative imports resolved. ``import a.b`` and ``from a import b`` where ``a.b`` is a module
are edges to ``a.b``; ``from a import name`` where ``name`` is not a module is an edge to ``a`` (its ``__init__``).

Packages: a package ``__init__`` is the module named after the package, in that package's layer (``mae`` itself is
an entry point). Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so those are edges too, except
for the packages that hold the importer: their ``__init__`` is already running (or done) when the importer runs.
That is what lets an ``__init__`` re-export its submodules (``mae.data``, ``mae.interop``) while they import each
other, and it still shows the real cycles through an ``__init__``: a submodule that imports names from its own
package (``from mae.data import x`` inside ``mae.data.shards``), or a module that imports ``a.b.c`` while
``a/b/__init__`` imports that module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "mae"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("mae.errors", "mae.files", "mae.threads", "mae.version", "mae.config", "mae.presets", "mae.weights"),
    ("mae.models",),
    ("mae.data",),
    ("mae.train",),
    ("mae.interop", "mae.eval", "mae.viz", "mae.transfer", "mae.bench"),
    ("mae.recipes",),
    ("mae.cli", "mae.api", "mae.__main__", "mae"),
)


@dataclass(frozen=True)
class Edge:
    """One import: `source` imports `target` at `path`:`line` (`via`: the submodule whose import runs the package
    `target`'s ``__init__``)."""

    source: str
    target: str
    path: str
    line: int
    via: str = ""

    def __str__(self) -> str:
        how = f", running its __init__ to import {self.via}" if self.via else ""
        return f"{self.path}:{self.line} ({self.source} -> {self.target}{how})"


def module_name(path: Path, root: Path) -> str:
    """``root/mae/data/__init__.py`` -> ``mae.data``; ``root/mae/data/shards.py`` -> ``mae.data.shards``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_sources(root: Path, package: str = PACKAGE) -> dict[str, tuple[str, str]]:
    """module name -> (path relative to `root`'s parent, source text) for every module of `package` under `root`."""
    return {module_name(p, root): (str(p.relative_to(root.parent)), p.read_text(encoding="utf-8"))
            for p in sorted((root / package).rglob("*.py"))}


def import_edges(sources: Mapping[str, tuple[str, str]]) -> list[Edge]:
    """Every import between the modules of `sources` (module name -> (path, text)), wherever it stands."""
    packages = {name for name, (path, _) in sources.items() if path.endswith("__init__.py")}
    edges = []
    for source, (path, text) in sources.items():
        here = source if source in packages else source.rpartition(".")[0]  # the package relative imports start at
        holders = {".".join(source.split(".")[:i]) for i in range(1, source.count(".") + 2)}  # itself included
        for node in ast.walk(ast.parse(text, filename=path)):
            for target in _targets(node, here, sources):
                line = node.lineno  # type: ignore[attr-defined]
                if target != source:
                    edges.append(Edge(source, target, path, line))
                for i in range(1, target.count(".") + 1):  # the packages above the target run their __init__
                    package = ".".join(target.split(".")[:i])
                    if package not in holders and package in packages:
                        edges.append(Edge(source, package, path, line, via=target))
    return edges


def _targets(node: ast.AST, here: str, modules: Mapping[str, object]) -> Iterable[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = here.split(".")[:len(here.split(".")) - node.level + 1]
        pkg = ".".join([*base, *([node.module] if node.module else [])])
    else:
        pkg = node.module or ""
    found = []
    for alias in node.names:
        if f"{pkg}.{alias.name}" in modules:
            found.append(f"{pkg}.{alias.name}")  # a submodule
        elif pkg in modules:
            found.append(pkg)
    return found


def layer_of(module: str, layers: tuple[tuple[str, ...], ...] = LAYERS) -> int:
    """Index of the layer that holds `module` (the longest prefix listed wins: ``mae`` only for the root itself)."""
    best, found = -1, None
    for index, members in enumerate(layers):
        for member in members:
            if (module == member or module.startswith(member + ".")) and len(member) > best and member != PACKAGE:
                best, found = len(member), index
            elif module == member == PACKAGE:
                return index
    if found is None:
        raise AssertionError(f"module {module} is in no layer; add it to LAYERS in {Path(__file__).name}")
    return found


def upward_imports(edges: Iterable[Edge], layers: tuple[tuple[str, ...], ...] = LAYERS) -> list[Edge]:
    """Edges from a module to a module of a higher layer (the implied ``__init__`` edges add nothing here: a package
    is in the layer of its submodules)."""
    return [e for e in edges if not e.via and layer_of(e.target, layers) > layer_of(e.source, layers)]


def cycles(edges: Iterable[Edge]) -> list[list[Edge]]:
    """The strongly connected sets of more than one module (Tarjan), each as the edges inside it, sorted."""
    edges = list(edges)
    graph: dict[str, list[str]] = {}
    for e in edges:
        graph.setdefault(e.source, []).append(e.target)
        graph.setdefault(e.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [sorted({e for e in edges if e.source in c and e.target in c}, key=str) for c in components]


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _report(ups: list[Edge], loops: list[list[Edge]]) -> str:
    lines = [f"upward import: {e}" for e in ups]
    for loop in loops:
        members = sorted({e.source for e in loop})
        lines.append(f"import cycle through {', '.join(members)}:")
        lines += [f"    {e}" for e in loop]
    return "\n".join(lines)


def test_package_has_no_import_cycle_and_no_upward_import():
    """No module imports a higher layer and no set of modules imports itself in a circle; the failure names each
    offending import as file:line (from -> to)."""
    edges = import_edges(read_sources(SRC))
    ups, loops = upward_imports(edges), cycles(edges)
    assert not ups and not loops, "\n" + _report(ups, loops)


def test_every_module_is_in_a_layer():
    """A new top-level module or package must be placed in `LAYERS` (else the rule would not cover it)."""
    for name in read_sources(SRC):
        layer_of(name)


# ---------------------------------------------------------------------------------------------------- the checker
FAKE = {
    "mae": ("mae/__init__.py", "from mae.low import thing\n"),
    "mae.low": ("mae/low/__init__.py", "from mae.low.a import A\nfrom .b import B\n"),
    "mae.low.a": ("mae/low/a.py", "import os\n"),
    "mae.low.b": ("mae/low/b.py", "from . import a\n"),
    "mae.high": ("mae/high.py", "def f():\n    from mae.low import b\n"),
}
FAKE_LAYERS = (("mae.low",), ("mae.high",), ("mae",))


def _pairs(edges: list[Edge]) -> set[tuple[str, str, str]]:
    return {(e.source, e.target, e.via) for e in edges}


def test_checker_accepts_a_clean_graph_and_resolves_every_import_form():
    """Absolute, relative, ``from package import submodule`` and function-local imports all become edges; importing
    a submodule from outside its package also runs the package's ``__init__`` (an edge `via` the submodule), and a
    package that re-exports its submodules is not a cycle."""
    edges = import_edges(FAKE)
    assert _pairs(edges) == {
        ("mae", "mae.low", ""), ("mae.low", "mae.low.a", ""), ("mae.low", "mae.low.b", ""),
        ("mae.low.b", "mae.low.a", ""), ("mae.high", "mae.low.b", ""), ("mae.high", "mae.low", "mae.low.b")}
    assert upward_imports(edges, FAKE_LAYERS) == []
    assert cycles(edges) == []


def test_checker_flags_a_planted_upward_import_with_its_file_and_line():
    """A function-local import of a higher layer is an upward import, named as file:line (from -> to)."""
    planted = {**FAKE, "mae.low.a": ("mae/low/a.py", "import os\n\n\ndef g():\n    import mae.high\n")}
    edges = import_edges(planted)
    ups = upward_imports(edges, FAKE_LAYERS)
    assert [str(e) for e in ups] == ["mae/low/a.py:5 (mae.low.a -> mae.high)"]
    assert "upward import: mae/low/a.py:5 (mae.low.a -> mae.high)" in _report(ups, cycles(edges))


def test_checker_flags_a_submodule_that_imports_its_own_package():
    """``from mae.low import A`` inside ``mae.low.b``, while ``mae.low`` imports ``mae.low.b``, is a cycle."""
    planted = {**FAKE, "mae.low.b": ("mae/low/b.py", "from mae.low import A\n")}
    loops = cycles(import_edges(planted))
    assert [sorted({e.source for e in loop}) for loop in loops] == [["mae.low", "mae.low.b"]]
    assert "import cycle through mae.low, mae.low.b:" in _report([], loops)


def test_checker_flags_a_cycle_through_an_init_that_runs_first():
    """``mae.top`` imports ``mae.low.a`` (which runs ``mae/low/__init__`` first) while that ``__init__`` imports a
    module that imports ``mae.top`` back: a real cycle, though no statement names ``mae.low`` itself."""
    planted = {**FAKE, "mae.top": ("mae/top.py", "from mae.low.a import A\n"),
               "mae.low.b": ("mae/low/b.py", "import mae.top\n")}
    loops = cycles(import_edges(planted))
    assert len(loops) == 1
    assert {e.source for e in loops[0]} == {"mae.top", "mae.low", "mae.low.b"}
    assert any(e.via == "mae.low.a" for e in loops[0])
