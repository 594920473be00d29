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

Under pytest-xdist the controller compiles the numba kernels (or loads them from numba's cache)
before the workers start, so that the workers only load them: two processes compiling the same
``cache=True`` functions at once can write cache entries that disagree (numba issues #10128,
#10486), which once failed every test of one worker here with a numba TypingError.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("ci", max_examples=30, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=800, derandomize=False, **_COMMON)
settings.load_profile("ci")


def compile_numba_kernels():
    """Every numba kernel the suite runs, float32 and float64: normlab.kernels' (serial twins and
    parallel kernels) and the fused LayerNorm-LSTM step kernels."""
    import numpy as np
    import torch

    from normlab.kernels import _numba_rnn, numba_cpu
    from normlab.nn import LayerNormLSTM

    numba_cpu.compile_all()
    for dt in (np.float32, np.float64):
        _numba_rnn.sigmoid_tanh(np.zeros(4, dt), np.empty(4, dt), np.empty(4, dt))
    for dtype in (torch.float32, torch.float64):
        lstm = LayerNormLSTM(3, 4).to(dtype)
        x = torch.randn(2, 2, 3, dtype=dtype, requires_grad=True)
        lstm(x)[0].sum().backward()


def pytest_configure(config):
    workers = getattr(config.option, "numprocesses", None)
    if workers and not hasattr(config, "workerinput"):      # the xdist controller, before workers
        compile_numba_kernels()
