"""`python -m metricgp.darwin.compare`: the command lives in `metricgp.experiments.darwin`."""

import sys

from metricgp.experiments.darwin import main

if __name__ == "__main__":
    sys.exit(main())
