"""``python -m ad.report``: see :mod:`ad.report`."""

from ad.report import main

main()
