"""Errors a user's input causes; the CLI prints them as one line (exit 2), other exceptions keep their traceback."""

from __future__ import annotations


class ConfigError(ValueError, TypeError):
    """A bad name, option or value in a method, network or run configuration.

    Also a ``TypeError``, like Python's own error for an unexpected keyword argument.
    """


class PathError(ConfigError):
    """A path given to a command that it cannot use: read-only, on a full disk, a file where a folder is needed."""


class UnknownMethodError(KeyError, ValueError):
    """A method name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


# What ``bnnbench`` reports as one clear line: bad configuration (ValueError and its
# subclasses above, data and path errors included), missing files, plugins that fail to import.
# The CLI also reports an OSError the environment caused (full disk, read-only folder) in one
# line: see ``bnnbench.preflight.environment_problem``.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, ImportError)
