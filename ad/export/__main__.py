"""``python -m ad.export``: see ``ad.export.cli``."""

import sys

from ad.export.cli import main

sys.exit(main())
