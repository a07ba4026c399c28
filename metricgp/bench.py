"""`python -m metricgp.bench`: the command lives in `metricgp.experiments.bench`."""
from metricgp.experiments.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
