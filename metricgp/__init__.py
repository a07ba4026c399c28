"""metricgp: discover and use pruning metrics for large language models."""

__version__ = "0.1.0"
