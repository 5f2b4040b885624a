"""Shared test configuration.

Sections are owned by the part of the product they serve; add fixtures next to the section they
belong to. Every network test binds 127.0.0.1 port 0 and has a ``trio.fail_after`` bound.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# CI machines are small and noisy: no per-example deadline, and fewer examples unless asked.
settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
settings.register_profile("thorough", deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
