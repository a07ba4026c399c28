"""`python -m metricgp.search`: the command lives in `metricgp.cli.search`."""
from metricgp.cli.search import main

if __name__ == "__main__":
    raise SystemExit(main())
