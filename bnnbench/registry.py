"""The method registry: ``register_method``, ``get_method``, ``list_methods``, plugins.

Built-in binarizers live in ``bnnbench.methods`` (one file each) and register
themselves on import.  Third-party binarizers register from outside the
package through the ``bnnbench.methods`` entry-point group or a plugin file
(``bnnbench --plugin my_method.py ...``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import sys
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

from .errors import ConfigError, UnknownMethodError
from .method import LOSS_REDUCTIONS, SCALES, Method

ENTRY_POINT_GROUP = "bnnbench.methods"

M = TypeVar("M", bound=type[Method])

_METHODS: dict[str, type[Method]] = {}
_PLUGINS: list[str] = []  # plugin files loaded in this process (worker processes load them again)
_loaded = False


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator registering a :class:`Method` subclass under ``name``.

    The class must be a dataclass subclass of :class:`bnnbench.Method`; its
    fields are the method's hyper-parameters.
    """

    def decorator(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register_method({name!r}) expects a subclass of bnnbench.Method, got {cls!r}")
        if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
            cls = dataclasses.dataclass(cls)  # type: ignore[assignment]
        if cls.scale not in SCALES:
            raise ValueError(f"method {name!r}: scale {cls.scale!r} is not one of {SCALES}")
        if cls.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"method {name!r}: loss_reduction {cls.loss_reduction!r} is not one of {LOSS_REDUCTIONS}")
        existing = _METHODS.get(name)
        if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ConfigError(
                f"method {name!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
                f"register {cls.__module__}.{cls.__qualname__} under another name"
            )
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def _load_builtin_and_entry_points() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("bnnbench.methods")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not break the built-ins
            print(f"bnnbench: could not load method plugin {ep.name!r} ({ep.value}): {exc}", file=sys.stderr)


def load_plugin(path: str | Path) -> None:
    """Import a Python file that registers methods with ``@register_method``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plugin file {str(path)!r} does not exist; pass the path of a .py file defining a method")
    module_name = f"bnnbench_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import plugin {str(path)!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the plugin's own error, whatever it is, told as the plugin's
        del sys.modules[module_name]
        where = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) else ""
        raise ImportError(f"plugin {str(path)!r} failed to import{where}: {type(exc).__name__}: {exc}; fix the plugin file") from exc
    _PLUGINS.append(str(path.resolve()))


def loaded_plugins() -> list[str]:
    """Absolute paths of the plugin files loaded so far (for worker processes to load them too)."""
    return list(_PLUGINS)


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _load_builtin_and_entry_points()
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    """The registered class for ``name`` (clear error listing valid names)."""
    _load_builtin_and_entry_points()
    try:
        return _METHODS[name]
    except KeyError:
        valid = ", ".join(sorted(_METHODS))
        raise UnknownMethodError(f"unknown method {name!r}; valid methods: {valid}") from None


def get_method(name: str, **hparams: Any) -> Method:
    """Instantiate method ``name`` with hyper-parameters ``hparams``.

    String values (from the command line) are converted to the field's type.
    """
    cls = method_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(hparams) - set(fields))
    if unknown:
        valid = ", ".join(f"{k}={f.default!r}" for k, f in fields.items()) or "none"
        raise ConfigError(f"method {name!r} has no hyper-parameter {', '.join(map(repr, unknown))}; valid: {valid}")
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(name, k, v, hints.get(k)) for k, v in hparams.items()}
    return cls(**values)


def _coerce(method: str, key: str, value: Any, hint: Any) -> Any:
    """``value`` as the field's type: strings from the command line are parsed, ints widen to float,
    anything else of the wrong type is refused (so that 20 and 20.0 name the same run)."""
    if hint not in (bool, int, float, str):
        return value
    bad = ConfigError(f"method {method!r}: hyper-parameter {key}={value!r} is not a valid {hint.__name__}")
    if isinstance(value, str) and hint is not str:
        if hint is bool:
            lowered = value.lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no"):
                raise bad
            return lowered in ("1", "true", "yes")
        try:
            return hint(value)
        except ValueError:
            raise bad from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise bad
    return value
