"""``python -m bnnbench``: the command line, also as torchrun's module (``torchrun ... -m bnnbench run ...``).

``record`` writes an uncaught exception to the error file torchrun's agent reads, so its failure
report names the exception and traceback of the rank that failed.
"""

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from .cli import main

if __name__ == "__main__":
    sys.exit(record(main)())
