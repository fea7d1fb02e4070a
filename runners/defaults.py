"""Defaults of a run that the command line shows in its help (a light module: no torch, numpy or pandas).

:class:`~.spec.RunSpec` and :class:`~.spec.Machine` hold the other defaults; these are the
ones that depend on the data set, and the frequency sweep's.
"""

from __future__ import annotations

DEFAULT_DATA = "digits"
DEFAULT_NETS = {"digits": "resnet20", "cifar10": "resnet18", "imagenet": "resnet18"}
DEFAULT_W0 = (5.0, 10.0, 20.0, 30.0, 40.0)  # Figure 4's frequencies
DEFAULT_SWEEP_NET = "resnet20"  # the paper does not name Figure 4's backbone


def default_recipe(data: str) -> str:
    """``quick`` for the digits demo, ``upstream`` (the family's official scripts) otherwise."""
    return "quick" if data == "digits" else "upstream"


__all__ = ["DEFAULT_DATA", "DEFAULT_NETS", "DEFAULT_SWEEP_NET", "DEFAULT_W0", "default_recipe"]
