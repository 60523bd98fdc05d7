"""Entry point of a store writer process: `python -m shared.store_procs ARGS` (see shared/store/procs.py).

A separate module so the process runs a plain `-m` module that no one has imported yet (runpy warns
when `-m` names a module its own package already imported); the store package never imports this.
"""

import sys

from shared.store.procs import ALIGN, WriterProcess, main

__all__ = ["ALIGN", "WriterProcess", "main"]

if __name__ == "__main__":
    main(sys.argv[1:])
