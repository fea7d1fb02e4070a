"""The backbone registry: ``register_net``, ``list_nets``, ``lookup_net`` (``build_model`` is in :mod:`.spec`)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import ConfigError

NetFactory = Callable[..., nn.Module]

FAMILIES = ("cifar", "imagenet")
_NETS: dict[tuple[str, str], NetFactory] = {}


def register_net(family: str, name: str) -> Callable[[NetFactory], NetFactory]:
    """Register a backbone factory ``fn(layers: BinaryLayers, num_classes=..., **options)``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

    def decorator(fn: NetFactory) -> NetFactory:
        _NETS[(family, name)] = fn
        return fn

    return decorator


def list_nets(family: str | None = None) -> list[str]:
    """Registered backbones as "family/name"."""
    return sorted(f"{f}/{n}" for f, n in _NETS if family in (None, f))


def lookup_net(family: str, net: str) -> NetFactory:
    """The factory of ``family/net``, or a clear error listing the family's networks."""
    try:
        return _NETS[(family, net)]
    except KeyError:
        valid = ", ".join(n for f, n in sorted(_NETS) if f == family)
        raise ConfigError(f"unknown {family} network {net!r}; valid {family} networks: {valid}") from None
