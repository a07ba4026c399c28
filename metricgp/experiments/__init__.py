"""The drivers behind results/: each remakes its tables from the library, which never imports them.

    compare.py, noise.py   metric x setting tables, the noise floor (python -m metricgp.compare)
    bench.py               throughput and fidelity benchmarks (python -m metricgp.bench)
    structured.py          structured tables: defaults, speed, profile (python -m metricgp.structured.experiments)
    table.py, report.py    every method x keep level, and table.md/png
    saap.py, seeds.py      the SAAP ablation, the seed-to-seed spread
    darwin.py              level-search runs side by side (python -m metricgp.darwin.compare)
    rows.py                the shared table I/O
"""
