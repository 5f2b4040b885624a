"""Soak harness for SPEC §10 (run ``python soak/run.py --help``)."""
