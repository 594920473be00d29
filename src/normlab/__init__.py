"""normlab: Batch Normalization and its successors, exact and fast.

Subpackages: ``normlab.reference`` (float64 specification), ``normlab.layers`` (NumPy layers),
``normlab.estimators`` (scikit-learn transformer).
"""

__version__ = "0.1.0"
