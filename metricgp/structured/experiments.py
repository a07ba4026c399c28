"""`python -m metricgp.structured.experiments`: the command lives in `metricgp.experiments.structured`."""

import sys

from metricgp.experiments.structured import main

if __name__ == "__main__":
    sys.exit(main())
