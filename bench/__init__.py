"""Benchmarks (SPEC §9). Run with ``make bench``; results are recorded in ``docs/benchmarks.md``."""
