"""`python -m viscpm ...`: the same program as the `viscpm` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
