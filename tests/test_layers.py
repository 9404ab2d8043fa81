"""The import layering of migcore, checked against the layers table in docs/architecture.md.

The checker (`_layers`) reads the imports with `ast`; it imports no project code.
The synthetic packages below show that it finds exactly the problems it should.
"""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest
from _layers import build_graph, check_layers, check_table, find_cycles, parse_layers

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "src" / "migcore"
ARCHITECTURE = REPO / "docs" / "architecture.md"


def _package(root: Path, files: dict[str, str]) -> Path:
    """Write a package under `root` from {relative path: source}; return its directory."""
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dedent(source))
    return root / next(iter(files)).split("/")[0]


def _table(*rows: tuple[str, str]) -> str:
    lines = ["<!-- layers: top to bottom -->", "| layer | modules |", "|---|---|"]
    lines += [f"| {layer} | {modules} |" for layer, modules in rows]
    return "\n".join([*lines, "<!-- /layers -->"])


# --- migcore itself ---------------------------------------------------------------


def test_every_module_is_in_exactly_one_layer_and_no_pattern_is_stale() -> None:
    problems = check_table(build_graph(PACKAGE), parse_layers(ARCHITECTURE.read_text()))
    assert not problems, "docs/architecture.md does not describe src/migcore:\n" + "\n".join(problems)


def test_migcore_imports_follow_the_layers() -> None:
    problems = check_layers(build_graph(PACKAGE), parse_layers(ARCHITECTURE.read_text()))
    assert not problems, "layering problems:\n" + "\n".join(problems)


def test_the_layers_table_is_read_in_order() -> None:
    layers = [name for name, _ in parse_layers(ARCHITECTURE.read_text())]
    assert layers == ["cli", "tools", "api", "engine", "links", "wire", "tracking", "kernels"]


def test_compiled_kernels_are_modules_without_imports() -> None:
    graph = build_graph(PACKAGE)
    assert graph["migcore._fastpath"] == {} and graph["migcore._uffd"] == {}
    assert not any(name.endswith(("_bitmaps", "_hashing", "_iovec", "_xbzrle")) for name in graph)


# --- the checker on synthetic packages ----------------------------------------------

LAYERS = _table(("top", "`pkg.top`"), ("middle", "`pkg.mid`, `pkg.sub`, `pkg.sub.*`"), ("bottom", "`pkg`, `pkg.low`"))


def test_a_cycle_is_reported_as_its_path(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg import b\n",
            "pkg/b.py": "import pkg.c\n",
            "pkg/c.py": "from pkg.a import something\n",
        },
    )
    layers = parse_layers(_table(("all", "`pkg`, `pkg.a`, `pkg.b`, `pkg.c`")))
    assert check_layers(build_graph(package), layers) == ["cycle: pkg.a -> pkg.b -> pkg.c -> pkg.a"]


def test_an_upward_import_is_reported(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/top.py": "from pkg import mid\n",
            "pkg/mid.py": "import os\n",
            "pkg/low.py": "import json\n\nfrom pkg.mid import helper\n",
        },
    )
    layers = parse_layers(_table(("top", "`pkg.top`"), ("middle", "`pkg.mid`"), ("bottom", "`pkg`, `pkg.low`")))
    assert check_layers(build_graph(package), layers) == [
        "pkg.low (layer bottom) imports pkg.mid (higher layer middle) at line 3",
    ]


def test_a_clean_package_has_no_problems(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.low import Thing\n",
            "pkg/top.py": "import pkg\nfrom pkg import mid, Thing\nimport pkg.sub.deep\n",
            "pkg/mid.py": "from pkg import low\nimport numpy\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/deep.py": "from pkg.mid import name\n",
            "pkg/low.py": "import os.path\nclass Thing: ...\n",
        },
    )
    graph = build_graph(package)
    assert graph["pkg.top"] == {"pkg": 1, "pkg.mid": 2, "pkg.sub.deep": 3}
    assert check_layers(graph, parse_layers(LAYERS)) == []


def test_relative_function_level_and_type_checking_imports_count(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {
            "pkg/__init__.py": "from . import low\n",
            "pkg/mid.py": dedent(
                """\
                from typing import TYPE_CHECKING
                from .low import value
                if TYPE_CHECKING:
                    from pkg.sub.deep import Deep
                """
            ),
            "pkg/sub/__init__.py": "from .. import mid\n",
            "pkg/sub/deep.py": "def late():\n    from ..top import entry\n    from . import sibling\n",
            "pkg/sub/sibling.py": "",
            "pkg/top.py": "",
            "pkg/low.py": "",
        },
    )
    graph = build_graph(package)
    assert graph["pkg"] == {"pkg.low": 1}
    assert graph["pkg.mid"] == {"pkg.low": 2, "pkg.sub.deep": 4}
    assert graph["pkg.sub"] == {"pkg.mid": 1}
    assert graph["pkg.sub.deep"] == {"pkg.top": 2, "pkg.sub.sibling": 3}
    assert check_layers(graph, parse_layers(LAYERS)) == [
        "pkg.sub.deep (layer middle) imports pkg.top (higher layer top) at line 2",
    ]


def test_modules_outside_the_table_overlaps_and_stale_patterns_are_reported(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {"pkg/__init__.py": "", "pkg/lost.py": "", "pkg/both.py": "", "pkg/_kernel.pyx": "import pkg.lost\n"},
    )
    layers = parse_layers(_table(("up", "`pkg.both`, `pkg.gone`"), ("down", "`pkg`, `pkg.both`, `pkg._kernel`, `pkg.old.*`")))
    assert check_layers(build_graph(package), layers) == [
        "pkg.both matches several layers: up, down",
        "pkg.lost matches no layer",
        "pattern `pkg.gone` of layer up matches no module",
        "pattern `pkg.old.*` of layer down matches no module",
    ]


def test_every_cycle_of_a_tangle_is_shown() -> None:
    graph = {"a": {"b": 1}, "b": {"a": 1, "c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert find_cycles(graph) == [["a", "b", "a"], ["a", "b", "c", "a"]]
