"""Optional dependencies: the package behind each extra, imported on first use with an error that names the extra.

The core (the engine, the links, the fast path) needs only NumPy and xxhash.
Compression codecs, the command line's terminal output and the bench's
plots are extras of the ``migcore`` distribution (``pyproject.toml``,
``[project.optional-dependencies]``); :data:`EXTRAS` says which extra brings
which module, and a test checks it against the installed metadata.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: The top-level module each extra brings, by module name (the extra ``all`` brings every one).
EXTRAS: dict[str, str] = {
    "zstandard": "zstd",
    "lz4": "lz4",
    "rich": "cli",
    "matplotlib": "bench",
}


class MissingExtraError(ImportError, ValueError):
    """A feature was asked for whose optional package is not installed; the message names the extra.

    It is a ``ValueError`` too: asking ``migrate()`` for a codec that cannot
    run here is a refused option, like any other.
    """

    def __init__(self, message: str, *, extra: str, module: str) -> None:
        super().__init__(message, name=module)
        self.extra = extra


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` (a name in :data:`EXTRAS`, or a submodule of one) for ``what``; say which extra is missing."""
    top = module.partition(".")[0]
    extra = EXTRAS[top]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{what} needs the {top!r} package, which is not installed: pip install 'migcore[{extra}]' ({exc})",
            extra=extra,
            module=top,
        ) from exc
