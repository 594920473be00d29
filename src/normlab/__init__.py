"""normlab: Batch Normalization and its successors, exact and fast.

Subpackages: ``normlab.reference`` (float64 specification), ``normlab.layers`` (NumPy layers),
``normlab.estimators`` (scikit-learn transformer), ``normlab.nn`` (PyTorch).

Top level: the policy for training batches with non-finite statistics (docs/reliability.md):
``nonfinite_policy`` (context manager), ``set_nonfinite_policy`` / ``get_nonfinite_policy``
(process default), ``NonFiniteWarning``, ``NonFiniteError``, ``NONFINITE_POLICIES``.
"""

from ._checks import (NONFINITE_POLICIES, NonFiniteError, NonFiniteWarning, get_nonfinite_policy,
                      nonfinite_policy, set_nonfinite_policy)

__version__ = "0.1.0"

__all__ = ["NONFINITE_POLICIES", "NonFiniteError", "NonFiniteWarning", "get_nonfinite_policy",
           "nonfinite_policy", "set_nonfinite_policy", "__version__"]
