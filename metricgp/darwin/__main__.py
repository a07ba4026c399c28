"""`python -m metricgp.darwin`: the command lives in `metricgp.cli.darwin`."""
from metricgp.cli.darwin import main

if __name__ == "__main__":
    raise SystemExit(main())
