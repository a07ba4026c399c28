"""`python -m metricgp.apply`: the command lives in `metricgp.cli.apply`."""

import sys

from metricgp.cli.apply import main

if __name__ == "__main__":
    sys.exit(main())
