"""``python -m metafit``: the ``metafit`` command line (see :mod:`metafit.cli`)."""
import sys

from metafit.cli import main

if __name__ == "__main__":
    sys.exit(main())
