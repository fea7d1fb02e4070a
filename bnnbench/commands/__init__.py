"""Sub-commands of the ``bnnbench`` CLI, one module each (see :mod:`bnnbench.cli`)."""
