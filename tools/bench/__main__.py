"""``python -m tools.bench``: see :mod:`tools.bench`."""

import sys

from tools.bench import cli

sys.exit(cli.main())
