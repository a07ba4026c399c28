"""`python -m metricgp.darwin`: the command lives in `metricgp.cli.darwin`."""

import sys

from metricgp.cli.darwin import main

if __name__ == "__main__":
    sys.exit(main())
