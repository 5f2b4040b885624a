"""Benchmark harness for beach-rescue: reference relays, a load generator and the run matrix.

Run from the repository root: ``python -m bench.run --quick`` (see ``docs/perf/README.md``).
"""
