"""Benchmarks: each reports ratios measured in one run; run them as `python -m bench.NAME` or by path."""
