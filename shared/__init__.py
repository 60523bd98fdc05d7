"""Shared contracts of both phases: the released head, checkpoint IO, the cache format, samples."""

import logging

# transformers imports torchao when it is installed; on a CPU (or another CUDA build) torchao logs a
# warning per prebuilt kernel library it cannot load and torch one per Enum it registers. They concern
# kernels this project does not call, and they buried each command's first line: errors only.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
