"""The ``bnnbench`` command line.

Each sub-command is a module in :mod:`bnnbench.commands` defining ``HELP``
(one line), ``add_arguments(parser)`` and ``main(args) -> int``; modules are
found automatically, so a new command is a new file.  Command modules import
torch, numba, pandas and seaborn inside ``main``, so that ``bnnbench --help``
and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings
from types import ModuleType

from . import commands
from .errors import USER_ERRORS


def _command_modules() -> dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules(commands.__path__):
        if info.name.startswith("_"):
            continue
        found[info.name.replace("_", "-")] = importlib.import_module(f"{commands.__name__}.{info.name}")
    return dict(sorted(found.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnnbench", description="Binary neural network binarizers under one protocol.")
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE.py",
        help="import a Python file that registers extra methods with @bnnbench.register_method (repeatable)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in _command_modules().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


_PYTHON_FORMAT = warnings.formatwarning


def format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
    """bnnbench's own warnings (a category defined in bnnbench, such as a damaged run folder) as one
    line saying what happened; any other warning as Python shows it."""
    if category.__module__.startswith("bnnbench."):
        return f"bnnbench: warning: {message}\n"
    return _PYTHON_FORMAT(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = format_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.plugin:
            from .registry import load_plugin

            for path in args.plugin:
                load_plugin(path)
        return int(args._main(args) or 0)
    except KeyboardInterrupt:
        print("bnnbench: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"bnnbench: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a read-only folder met after the up-front checks
        from .preflight import environment_problem

        problem = environment_problem(exc)
        if problem is None:
            raise
        print(f"bnnbench: error: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
