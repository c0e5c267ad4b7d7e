"""`python -m qistudio ...` (and `torchrun ... -m qistudio generate ...`): the `qistudio` command."""

import sys

from .cli.main import main

if __name__ == "__main__":  # not when a spawned process imports this module as its parent's main
    sys.exit(main())
