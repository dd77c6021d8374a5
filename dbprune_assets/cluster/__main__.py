"""``python -m dbprune_assets.cluster webserver [ARGS]``: see :mod:`dbprune_assets.cluster.webserver`."""

import sys

from dbprune_assets.cluster.webserver import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
