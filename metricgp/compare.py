"""`python -m metricgp.compare`: the command lives in `metricgp.experiments.compare`."""
from metricgp.experiments.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
