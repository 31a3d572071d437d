"""``python -m prism_otel.collector --config FILE.yaml``."""

import sys

from prism_otel.collector.cli import main

sys.exit(main())
