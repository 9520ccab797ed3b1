"""The package layers, read statically: no import circles, and imports only go downwards.

Every ``import`` statement of every module (at module level or inside a function) is an edge
from that module to the project module it names. Lazy imports count for circles too: a
circle hidden inside a function is still a circle for a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("xds_jax", "sharding", "collectives", "serving")

# Lower layers may not import these at all, at module level or lazily ...
FORBIDDEN = {
    "xds_jax": ("serving",),
    "sharding": ("serving",),
    "collectives": ("serving",),
    "serving.core": ("serving.disagg", "serving.entrypoints"),
    "serving.disagg": ("serving.entrypoints",),
}
# ... except the public API, which builds the FlowServe engine it runs on, lazily.
LAZY_EXCEPTIONS = {("xds_jax.llm", "serving")}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module ``name`` refers to (itself, or its nearest project package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """``(imported module, at module level)`` for every import statement of ``module``."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top = {id(node) for node in tree.body}
    annotations_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                        and getattr(block.test, "id", None) == "TYPE_CHECKING"
                        for n in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in annotations_only:  # ``if TYPE_CHECKING:`` imports never run
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.append((target, id(node) in top))
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _in(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def test_imports_only_go_downwards():
    wrong = []
    for module, edges in GRAPH.items():
        for target, top_level in edges:
            for layer, above in FORBIDDEN.items():
                if not _in(module, layer) or not any(_in(target, a) for a in above):
                    continue
                lazy_ok = any(module == m and _in(target, t) for m, t in LAZY_EXCEPTIONS)
                if top_level or not lazy_ok:
                    wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that go up a layer:\n" + "\n".join(sorted(set(wrong)))


def test_no_import_circles():
    graph = {m: {t for t, _ in edges} for m, edges in GRAPH.items()}
    circles = _cycles(graph)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out
