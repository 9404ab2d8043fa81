"""Import-layering checker: a package's import graph, read with `ast`, against a layers table.

Nothing here imports the code it checks. Every `import` and `from ... import`
counts, wherever it stands (module level, inside a function, under
`if TYPE_CHECKING:`); only edges between modules of the checked package are
kept. Compiled kernels (`.pyx`) are modules with no imports; `.pxi` files are
fragments included into them, not modules.

The layers table lives in a Markdown file between `<!-- layers` and
`<!-- /layers -->`, one row per layer, top to bottom:

    | layer | modules |
    |---|---|
    | cli | `pkg.cli`, `pkg.cli.*` |

A pattern is an exact module name, or `name.*` for the submodules of the
package `name` (at any depth; the package itself is listed on its own).
"""

from __future__ import annotations

import ast
import re
from collections import deque
from collections.abc import Iterable
from pathlib import Path

Graph = dict[str, dict[str, int]]  # module -> {imported module: line of its first import}
Layers = list[tuple[str, list[str]]]  # (layer, patterns), top to bottom


def module_files(package_dir: Path) -> dict[str, Path]:
    """Every module of the package at `package_dir`, by dotted name (`.py` and `.pyx`)."""
    root = package_dir.parent
    modules = {}
    for path in sorted([*package_dir.rglob("*.py"), *package_dir.rglob("*.pyx")]):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported_names(name: str, path: Path, is_package: bool) -> list[tuple[str, int]]:
    """Dotted names a module imports, with line numbers (`from x import y` yields `x.y`)."""
    if path.suffix == ".pyx":
        return []
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from the package holding this module
                package = name.split(".")
                if not is_package:
                    package.pop()
                if node.level - 1 >= len(package):
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return names


def build_graph(package_dir: Path) -> Graph:
    """Import edges between the modules of the package at `package_dir`.

    An imported name is resolved to the longest module name it starts with, so
    `from pkg import sub` is an edge to `pkg.sub` when that is a module and to
    `pkg` when `sub` is a name defined in it; a module importing names from
    itself is not an edge.
    """
    files = module_files(package_dir)
    graph: Graph = {}
    for name, path in files.items():
        edges = graph.setdefault(name, {})
        for imported, line in _imported_names(name, path, path.stem == "__init__"):
            target = imported
            while target and target not in files:
                target = target.rpartition(".")[0]
            if not target or target == name:
                continue
            edges[target] = min(line, edges.get(target, line))
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """Import cycles, as paths `[a, b, ..., a]` starting at their smallest name.

    The strongly connected components are found with Tarjan's algorithm; for every
    edge inside a component, the shortest cycle through that edge is reported once.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)

    cycles: list[list[str]] = []
    for component in components:
        for source in sorted(component):
            for target in sorted(set(graph.get(source, ())) & component):
                path = [source, *_shortest_path(graph, target, source, component)]
                start = path.index(min(path[:-1]))  # rotate to start at the smallest name
                cycle = path[start:-1] + path[:start] + [path[start]]
                if cycle not in cycles:
                    cycles.append(cycle)
    return sorted(cycles)


def _shortest_path(graph: Graph, start: str, goal: str, within: set[str]) -> list[str]:
    """Breadth-first path `[start, ..., goal]` through the modules in `within`."""
    came_from = {start: start}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            break
        for succ in sorted(graph.get(node, ())):
            if succ in within and succ not in came_from:
                came_from[succ] = node
                queue.append(succ)
    path = [goal]
    while path[-1] != start:
        path.append(came_from[path[-1]])
    return path[::-1]


def parse_layers(markdown: str) -> Layers:
    """The layers table between `<!-- layers` and `<!-- /layers -->`, top layer first."""
    block = re.search(r"<!-- layers\b.*?-->(.*?)<!-- /layers -->", markdown, re.S)
    if block is None:
        raise ValueError("no <!-- layers ... --> ... <!-- /layers --> block")
    layers: Layers = []
    for row in block.group(1).strip().splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("layer", "") or set(cells[0]) <= set("-: "):
            continue  # header, separator or blank line
        layers.append((cells[0], re.findall(r"`([^`]+)`", cells[1])))
    return layers


def _matches(pattern: str, module: str) -> bool:
    if pattern.endswith(".*"):
        return module.startswith(pattern[:-1])
    return module == pattern


def _layers_of(module: str, layers: Layers) -> list[int]:
    return [i for i, (_, patterns) in enumerate(layers) if any(_matches(p, module) for p in patterns)]


def check_table(modules: Iterable[str], layers: Layers) -> list[str]:
    """Problems with the table: a module in no layer or in several, a pattern matching no module."""
    modules = sorted(modules)
    problems = []
    for module in modules:
        found = _layers_of(module, layers)
        if not found:
            problems.append(f"{module} matches no layer")
        elif len(found) > 1:
            problems.append(f"{module} matches several layers: {', '.join(layers[i][0] for i in found)}")
    for layer, patterns in layers:
        for pattern in patterns:
            if not any(_matches(pattern, module) for module in modules):
                problems.append(f"pattern `{pattern}` of layer {layer} matches no module")
    return problems


def check_imports(graph: Graph, layers: Layers) -> list[str]:
    """Problems with the imports: an import of a higher layer, an import cycle (even within a layer)."""
    problems = []
    for module in sorted(graph):
        for imported, line in sorted(graph[module].items()):
            here, there = _layers_of(module, layers), _layers_of(imported, layers)
            if len(here) == len(there) == 1 and there[0] < here[0]:
                problems.append(
                    f"{module} (layer {layers[here[0]][0]}) imports {imported}"
                    f" (higher layer {layers[there[0]][0]}) at line {line}"
                )
    return problems + ["cycle: " + " -> ".join(cycle) for cycle in find_cycles(graph)]


def check_layers(graph: Graph, layers: Layers) -> list[str]:
    """Every problem: the table's first, then the imports'."""
    return check_table(graph, layers) + check_imports(graph, layers)
