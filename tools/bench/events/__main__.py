"""``python -m tools.bench.events``: the same as ``python -m tools.bench
events``."""

import sys

from tools.bench.events import cli

sys.exit(cli.main())
