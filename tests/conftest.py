"""Shared pytest configuration: hypothesis settings profiles.

* ``ci`` (loaded by default): few examples per property, derandomized (the same examples on
  every run, so CI is reproducible), no example database, no deadline (timings on a shared
  2-core machine are noise, not a property). tests/test_fuzz.py runs in well under a minute.
* ``long``: ``pytest --hypothesis-profile=long tests/test_fuzz.py`` -- 800 examples per
  property instead of 30, fresh random draws every run (a failure prints the
  ``@reproduce_failure`` blob to replay it).

Tests that pin their own ``max_examples`` with ``@settings(...)`` keep it under both profiles.
tests/test_fuzz.py has 26 property tests: 780 cases under ``ci``, 20,800 under ``long``
(docs/reliability.md).
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("ci", max_examples=30, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=800, derandomize=False, **_COMMON)
settings.load_profile("ci")
