"""`python -m metricgp.compare`: the command lives in `metricgp.experiments.compare`."""

import sys

from metricgp.experiments.compare import main

if __name__ == "__main__":
    sys.exit(main())
