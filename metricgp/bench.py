"""`python -m metricgp.bench`: the command lives in `metricgp.experiments.bench`."""

import sys

from metricgp.experiments.bench import main

if __name__ == "__main__":
    sys.exit(main())
