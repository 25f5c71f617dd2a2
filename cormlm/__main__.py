"""``python -m cormlm``: the ``cormlm`` command, as torchrun launches it
(``torchrun --nproc-per-node 2 -m cormlm generate "prompt"``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
