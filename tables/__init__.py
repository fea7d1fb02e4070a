"""Table specs (TOML): Tables 1-4 of the BiPer paper (``table1`` ... ``table4``) and bnnbench's own tables."""

from __future__ import annotations

from importlib import resources

PAPER_TABLES = (1, 2, 3, 4)


def shipped_specs() -> list[str]:
    """Names (file stems) of every spec shipped here, Tables 1-4 included."""
    return sorted(p.name.removesuffix(".toml") for p in resources.files(__name__).iterdir() if p.name.endswith(".toml"))


def named_specs() -> list[str]:
    """The shipped specs besides Tables 1-4 (``bnnbench table NAME``)."""
    return [name for name in shipped_specs() if name not in {f"table{k}" for k in PAPER_TABLES}]


def read_spec_text(name: str) -> str:
    return resources.files(__name__).joinpath(f"{name}.toml").read_text()


__all__ = ["PAPER_TABLES", "named_specs", "read_spec_text", "shipped_specs"]
