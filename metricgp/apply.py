"""`python -m metricgp.apply`: the command lives in `metricgp.cli.apply`."""
from metricgp.cli.apply import main

if __name__ == "__main__":
    raise SystemExit(main())
