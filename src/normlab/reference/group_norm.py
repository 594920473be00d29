r"""Group Normalization (Wu & He, 2018), the specification.

The C channels of each sample are split into G groups of C/G consecutive channels; each
(sample, group) is normalized over its (C/G) * prod(spatial) values::

    mean_ng = mean(x[n, group g]),  var_ng = mean((x[n, g] - mean_ng)^2)
    xhat    = (x - mean_ng) / sqrt(var_ng + eps)
    y       = weight_c * xhat + bias_c                 # per-channel affine

Backward, ``g = dy * weight_c``, means over the values of one (sample, group)::

    dx        = rstd_ng * (g - mean(g) - xhat * mean(g * xhat))
    dweight_c = sum over n, spatial of dy * xhat,  dbias_c = sum over n, spatial of dy

G = 1 is LayerNorm over (C, *spatial) (with per-channel affine); G = C is InstanceNorm.
"""

from __future__ import annotations

import numpy as np

from .. import _checks
from ._core import (affine, as_f64, centered_backward, centered_forward, channel_view,
                    from_channels_first, to_channels_first)

__all__ = ["group_norm_forward", "group_norm_backward"]


def group_norm_forward(x, num_groups: int, weight=None, bias=None, *, eps: float = 1e-5,
                       channels_last: bool = False):
    """Group norm forward in float64. Returns ``(y, cache)``; ``cache["mean"]``, ``cache["var"]`` are (N, G).

    Example:
        >>> import numpy as np
        >>> y, c = group_norm_forward(np.random.default_rng(0).normal(size=(2, 4, 5)), 2)
        >>> c["mean"].shape
        (2, 2)
    """
    x = np.asarray(x)
    _checks.check_min_ndim(x, 2, "group_norm", "(N, C, *spatial)")
    _checks.check_eps(eps)
    xc = to_channels_first(as_f64(x), channels_last)          # (N, C, *S)
    N, C = xc.shape[:2]
    _checks.check_groups(num_groups, C)
    _checks.check_vector(weight, C, "weight")
    _checks.check_vector(bias, C, "bias")
    G = int(num_groups)
    S = int(np.prod(xc.shape[2:], dtype=np.int64))
    if S == 0:
        raise ValueError(f"group_norm needs at least one spatial element, got an input of shape "
                         f"{tuple(x.shape)} with an empty spatial dimension")
    xg = xc.reshape(N, G, C // G, S)                          # (N, G, C/G, S); N may be 0
    axes = (2, 3)
    xhat, mean, var, rstd = centered_forward(xg, axes, eps)   # (N, G, C/G, S), (N, G, 1, 1) x3
    xhat = xhat.reshape(xc.shape)                             # (N, C, *S)
    y = affine(xhat, weight, bias, xc.ndim)
    cache = dict(xhat=xhat, rstd=rstd, G=G, channels_last=channels_last,
                 weight=None if weight is None else np.array(weight, dtype=np.float64), has_bias=bias is not None,
                 mean=mean.reshape(N, G), var=var.reshape(N, G))
    return from_channels_first(y, channels_last), cache


def group_norm_backward(dy, cache):
    """Gradients ``(dx, dweight, dbias)`` of group norm; None for an absent parameter."""
    cl = cache["channels_last"]
    dy = to_channels_first(as_f64(dy), cl)                    # (N, C, *S)
    N, C = dy.shape[:2]
    G, w, xhat = cache["G"], cache["weight"], cache["xhat"]
    g = dy if w is None else dy * channel_view(w, dy.ndim)
    S = int(np.prod(dy.shape[2:], dtype=np.int64))
    dxg = centered_backward(g.reshape(N, G, C // G, S), xhat.reshape(N, G, C // G, S),
                            cache["rstd"], (2, 3))            # (N, G, C/G, S)
    axes = (0,) + tuple(range(2, dy.ndim))
    dweight = None if w is None else (dy * xhat).sum(axis=axes)
    dbias = dy.sum(axis=axes) if cache["has_bias"] else None
    return from_channels_first(dxg.reshape(dy.shape), cl), dweight, dbias
