"""The package's layers: imports point down only and no module imports one that imports it
back (lazy imports inside functions count too: they are the same dependency, only later).
The few known exceptions are listed in KNOWN; any other one fails."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "genre_tasks"
#: top first; a module may import its own layer or any layer below it
LAYERS = [
    {"cli", "report"},
    {"feedback"},
    {"registry"},
    {"evaluation"},
    {"models", "features"},
    {"data"},
    {"schema", "config", "io", "logs", "errors", "manifests"},
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every genre_tasks module ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("genre_tasks.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("genre_tasks"):
            for a in node.names:  # `from genre_tasks.x import y`: y may be a module
                sub = f"{node.module}.{a.name}"
                found.add(sub if _exists(sub) else node.module)
    return {m for m in found if m != "genre_tasks"}


def _exists(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PKG / rel).with_suffix(".py").is_file() or (PKG / rel / "__init__.py").is_file()


#: known exceptions, each to be removed (a new one fails the tests), all upward, none a cycle:
#: the train stage logs its live curve into MLflow and warm-starts from the @champion in the
#: registry; the validation metric models are early-stopped and selected on is the evaluation's
#: nDCG (one definition of the metric for selection and for the report).
KNOWN = {
    ("genre_tasks.models.train", "genre_tasks.registry.serving"),
    ("genre_tasks.models.train", "genre_tasks.registry.stage_logging"),
    ("genre_tasks.models.train", "genre_tasks.registry.tracking_store"),
    ("genre_tasks.models.train", "genre_tasks.evaluation.metrics"),
    ("genre_tasks.models.validation", "genre_tasks.evaluation.metrics"),
}
GRAPH = {module_name(p): imports(p) for p in sorted(PKG.rglob("*.py"))}
GRAPH = {m: {d for d in deps if (m, d) not in KNOWN} for m, deps in GRAPH.items()}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module}: in no layer of tests/test_layers.py; add it to LAYERS")


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "genre_tasks"))
def test_imports_point_down(module: str) -> None:
    up = sorted(dep for dep in GRAPH[module] if layer(dep) < layer(module))
    assert not up, f"{module} imports a layer above it: {up}"


def test_no_import_cycles() -> None:
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(GRAPH.get(node, ())):
            if dep.startswith(node + ".") or node.startswith(dep + "."):
                continue  # a package and its own modules
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
