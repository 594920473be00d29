r"""RMS Normalization (Zhang & Sennrich, 2019), the specification.

Over the trailing ``normalized_shape`` dims of each sample (D values), without centering::

    ms   = mean(x[i]^2),  rstd = 1 / sqrt(ms + eps)
    xhat = x * rstd
    y    = weight * xhat                          # no bias

Backward, ``g = dy * weight``::

    dL/dms = -1/2 * rstd^3 * sum(g * x) = -1/2 * rstd^2 * sum(g * xhat)
    dx     = g * rstd + dL/dms * 2 x / D = rstd * (g - xhat * mean(g * xhat))
    dweight = sum over leading dims of dy * xhat

``eps=None`` follows torch.nn.functional.rms_norm: the machine epsilon of the input's dtype.
"""

from __future__ import annotations

import numpy as np

from .. import _checks
from ._core import as_f64, uncentered_backward, uncentered_forward

__all__ = ["rms_norm_forward", "rms_norm_backward"]


def resolve_rms_eps(eps, dtype) -> float:
    """``eps=None`` -> the machine epsilon of the dtype torch computes in.

    That is ``finfo(dtype).eps`` for float32 and wider, float32's for float16 and bfloat16
    (torch accumulates those in float32 and takes the epsilon of that type), and float64's
    for non-float input (the reference computes it in float64).
    """
    if eps is not None:
        _checks.check_eps(eps)
        return float(eps)
    try:
        dtype = np.dtype(dtype)
    except TypeError:          # e.g. a torch dtype such as torch.bfloat16
        dtype = np.dtype(np.float32) if getattr(dtype, "is_floating_point", False) else np.dtype(np.float64)
    if not np.issubdtype(dtype, np.floating):
        dtype = np.dtype(np.float64)
    elif dtype.itemsize < 4:
        dtype = np.dtype(np.float32)
    return float(np.finfo(dtype).eps)


def rms_norm_forward(x, normalized_shape, weight=None, *, eps=None):
    """RMS norm forward in float64. Returns ``(y, cache)``.

    Example:
        >>> import numpy as np
        >>> y, _ = rms_norm_forward(np.full((2, 4), 3.0), 4)
        >>> np.allclose(y, 1.0)
        True
    """
    x = np.asarray(x)
    shape = _checks.normalized_shape_tuple(normalized_shape)
    eps = resolve_rms_eps(eps, x.dtype)
    _checks.check_normalized_shape(x, shape, "rms_norm")
    _checks.check_param_shape(weight, shape, "weight")
    xf = as_f64(x)
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    xhat, ms, rstd = uncentered_forward(xf, axes, eps)        # (*lead, *shape), (*lead, 1..) x2
    y = xhat if weight is None else xhat * as_f64(weight)
    cache = dict(xhat=xhat, rstd=rstd, axes=axes, lead=tuple(range(x.ndim - len(shape))),
                 weight=None if weight is None else np.array(weight, dtype=np.float64), ms=ms, eps=eps)
    return y, cache


def rms_norm_backward(dy, cache):
    """Gradients ``(dx, dweight, None)`` of RMS norm (it has no bias)."""
    dy = as_f64(dy)
    xhat, rstd, axes, lead, w = cache["xhat"], cache["rstd"], cache["axes"], cache["lead"], cache["weight"]
    g = dy if w is None else dy * w
    dx = uncentered_backward(g, xhat, rstd, axes)
    dweight = None if w is None else (dy * xhat).sum(axis=lead)
    return dx, dweight, None
