"""``python -m adapterkit ...``: the same command line as the ``adapterkit`` script."""

import sys

from .cli import main

sys.exit(main())
