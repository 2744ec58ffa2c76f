"""``python -m art_queen``: the ``art-queen`` command."""

import sys

from art_queen.cli import main

if __name__ == "__main__":
    sys.exit(main())
