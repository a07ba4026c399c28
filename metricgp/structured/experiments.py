"""`python -m metricgp.structured.experiments`: the command lives in `metricgp.experiments.structured`."""
from metricgp.experiments.structured import main

if __name__ == "__main__":
    raise SystemExit(main())
