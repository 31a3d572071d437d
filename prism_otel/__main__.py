"""``python -m prism_otel ...``: the ``prism-otel`` command where its console script is not on PATH."""

import sys

from prism_otel.cli import main

if __name__ == "__main__":
    sys.exit(main())
