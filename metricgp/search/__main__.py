"""`python -m metricgp.search`: the command lives in `metricgp.cli.search`."""

import sys

from metricgp.cli.search import main

if __name__ == "__main__":
    sys.exit(main())
