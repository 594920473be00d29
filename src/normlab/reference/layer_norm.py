r"""Layer Normalization (Ba, Kiros & Hinton, 2016), the specification.

Over the trailing ``normalized_shape`` dims of each sample (D = prod(normalized_shape) values)::

    mean = mean(x[i]),  var = mean((x[i] - mean)^2),  rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd
    y    = weight * xhat + bias                    # weight, bias of shape normalized_shape

Backward, ``g = dy * weight``, means over the D values of one sample::

    dx      = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dweight = sum over leading dims of dy * xhat,  dbias = sum over leading dims of dy
"""

from __future__ import annotations

import numpy as np

from .. import _checks
from ._core import as_f64, centered_backward, centered_forward

__all__ = ["layer_norm_forward", "layer_norm_backward"]


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, *, eps: float = 1e-5):
    """Layer norm forward in float64 (torch.nn.functional.layer_norm semantics). Returns ``(y, cache)``.

    Example:
        >>> import numpy as np
        >>> y, _ = layer_norm_forward(np.arange(6.0).reshape(2, 3), 3)
        >>> np.allclose(y.mean(axis=1), 0)
        True
    """
    x = np.asarray(x)
    shape = _checks.normalized_shape_tuple(normalized_shape)
    _checks.check_eps(eps)
    _checks.check_normalized_shape(x, shape, "layer_norm")
    _checks.check_param_shape(weight, shape, "weight")
    _checks.check_param_shape(bias, shape, "bias")
    xf = as_f64(x)                                             # (*lead, *shape)
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    xhat, mean, var, rstd = centered_forward(xf, axes, eps)    # (*lead, *shape), (*lead, 1..)
    y = xhat
    if weight is not None:
        y = y * as_f64(weight)
    if bias is not None:
        y = y + as_f64(bias)
    lead = tuple(range(x.ndim - len(shape)))
    cache = dict(xhat=xhat, rstd=rstd, axes=axes, lead=lead,
                 weight=None if weight is None else np.array(weight, dtype=np.float64), has_bias=bias is not None,
                 mean=mean, var=var)
    return y, cache


def layer_norm_backward(dy, cache):
    """Gradients ``(dx, dweight, dbias)`` of layer norm; None for an absent parameter."""
    dy = as_f64(dy)
    xhat, rstd, axes, lead, w = cache["xhat"], cache["rstd"], cache["axes"], cache["lead"], cache["weight"]
    g = dy if w is None else dy * w
    dx = centered_backward(g, xhat, rstd, axes)
    dweight = None if w is None else (dy * xhat).sum(axis=lead)
    dbias = dy.sum(axis=lead) if cache["has_bias"] else None
    return dx, dweight, dbias
