"""`python -m metricgp.darwin.compare`: the command lives in `metricgp.experiments.darwin`."""
from metricgp.experiments.darwin import main

if __name__ == "__main__":
    raise SystemExit(main())
