"""The package's import graph: layers that import only downward, no cycles, and the worker
entry point stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "ternarylm"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The package modules a file imports when it runs, at top level or inside functions
    (`from ternarylm.x import y` is module x.y when there is one, else x); imports under
    `if TYPE_CHECKING:` are for annotations only and do not count."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module in modules:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
    return out


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _runtime_imports(ast.parse(path.read_text()), set(files)) - {name}
            for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# The architecture, lowest first: each subpackage (or top-level module) is one layer, and a
# module imports only from its own layer or lower ones. A new subpackage must be placed here
# (the README's Layout section shows the same tree).
LAYERS = ["core", "kernels", "data", "analysis", "model", "config", "tracking", "deploy",
          "training", "evaluation", "orchestration", "cli"]
RANK = {name: i for i, name in enumerate(LAYERS)}


def layer_of(module: str) -> str | None:
    """`ternarylm.deploy.packing` -> `deploy`; the package root has no layer."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a higher layer than its own."""
    return sorted(f"{m} -> {t}" for m, targets in graph.items() if layer_of(m) in RANK
                  for t in targets
                  if layer_of(t) in RANK and RANK[layer_of(t)] > RANK[layer_of(m)])


def test_every_module_has_a_layer():
    unplaced = [m for m in import_graph() if m != "ternarylm" and layer_of(m) not in RANK]
    assert unplaced == []


def test_imports_go_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_an_upward_import_is_found():
    graph = import_graph()
    model = "ternarylm.model.transformer"
    graph[model] = graph[model] | {"ternarylm.tracking"}
    assert upward_imports(graph) == [f"{model} -> ternarylm.tracking"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = import_graph()
    low, high = "ternarylm.core.metrics", "ternarylm.training.train"
    graph[low] = graph[low] | {high}  # upward, and train imports metrics
    assert any(low in c and high in c for c in cycles(graph))


def test_worker_entry_point_imports_no_torch():
    """Ray Train's controller unpickles the entry point only to hand it on: importing it must
    not import torch, DeepSpeed or MLflow (seconds of every trial's start)."""
    heavy = ("torch", "deepspeed", "mlflow")
    code = ("import sys, ternarylm.training.worker; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
