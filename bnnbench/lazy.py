"""Package attributes imported on first use: ``__getattr__`` and ``__dir__`` for a package's ``__init__``.

``bnnbench`` and ``bnnbench.data`` name their public objects without importing torch, so
that the command line answers ``--help`` at once; the module holding a name is imported
when the name is first read, and the name is then kept in the package's namespace.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, namespace: dict[str, Any], exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose name ``n`` lives in its submodule ``exports[n]``."""

    def getattr_(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return getattr_, dir_


__all__ = ["lazy_exports"]
