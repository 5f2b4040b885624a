"""Chaos harness for SPEC §10 (run ``python chaos/run.py --help``); soak/ reuses its fleet and traffic."""
