"""`python -m metricgp.memory`: the command lives in `metricgp.cli.memory`."""
from metricgp.cli.memory import main

if __name__ == "__main__":
    raise SystemExit(main())
