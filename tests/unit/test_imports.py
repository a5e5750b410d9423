"""No import cycle under services/inferencehub: the module graph, read with ast, is acyclic.

In-process and import-free: the graph comes from the source text, so nothing of the package (nor of
tritonclient) is imported. A cycle is an explicit import path from a module back to itself; importing a
submodule runs its parent package first, but that implicit edge is not counted (a package's
``__init__`` may import its own submodules).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "services" / "inferencehub"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Each module of the package and the package's modules it imports (at any depth in its code)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                submodules = {f"{source}.{alias.name}" for alias in node.names} & modules.keys()
                targets.update(submodules)
                if source in modules and len(submodules) < len(node.names):
                    targets.add(source)  # names defined in the module itself, not only its submodules
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read():
    graph = import_graph()
    assert "inferencehub.gateway.keys" in graph["inferencehub.gateway.jobs"]
    assert "inferencehub.gateway.openapi" in graph["inferencehub.gateway.app"]
    assert "inferencehub.inference.runtimes.mlp" in graph["inferencehub.inference.runtimes"]


def test_a_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle_under_the_package():
    assert cycles(import_graph()) == []


def test_the_oip_core_stands_on_no_service_and_no_transport():
    """inferencehub.oip is under the gateway, the replica, the jobs and the client: it imports none of them, nor
    a transport (grpc's channels and servers, aiohttp, nats)."""
    graph = import_graph()
    core = [name for name in graph if name.startswith("inferencehub.oip")]
    assert {"inferencehub.oip.signature", "inferencehub.oip.codec", "inferencehub.oip.coalescing"} <= set(core)
    services = ("inferencehub.gateway", "inferencehub.inference", "inferencehub.client", "inferencehub.jobqueue")
    for name in core:
        assert not [t for t in graph[name] if t.startswith(services)], name
        tree = ast.parse(_modules()[name].read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m.split(".")[0] for m in imported} & {"grpc", "aiohttp", "nats"}, name
