"""``python -m adapterkit.hub ...``: the hub's commands alone (same as ``adapterkit hub ...``)."""

import sys

from .cli import main

sys.exit(main())
