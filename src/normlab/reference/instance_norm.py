r"""Instance Normalization (Ulyanov, Vedaldi & Lempitsky, 2016), the specification.

Each (sample n, channel c) is normalized over its prod(spatial) values::

    mean_nc = mean(x[n, c]),  var_nc = mean((x[n, c] - mean_nc)^2)
    xhat    = (x - mean_nc) / sqrt(var_nc + eps)
    y       = weight_c * xhat + bias_c

Backward, ``g = dy * weight_c``, means over the spatial values of one (n, c)::

    dx        = rstd_nc * (g - mean(g) - xhat * mean(g * xhat))
    dweight_c = sum over n, spatial of dy * xhat,  dbias_c = sum over n, spatial of dy

With given per-channel statistics (``mean``, ``var``: inference with running statistics, as
torch.nn.InstanceNorm with ``track_running_stats=True`` in eval mode) the transform is batch
norm's inference transform and ``dx = g * rstd_c``.
"""

from __future__ import annotations

import numpy as np

from .. import _checks
from ._core import (affine, as_f64, centered_backward, centered_forward, channel_view,
                    from_channels_first, to_channels_first)
from .batch_norm import batch_norm_backward, batch_norm_forward

__all__ = ["instance_norm_forward", "instance_norm_backward"]


def instance_norm_forward(x, weight=None, bias=None, *, mean=None, var=None, eps: float = 1e-5,
                          channels_last: bool = False):
    """Instance norm forward in float64. Returns ``(y, cache)``; batch statistics are (N, C).

    Example:
        >>> import numpy as np
        >>> y, c = instance_norm_forward(np.random.default_rng(0).normal(size=(2, 3, 5)))
        >>> np.allclose(y.mean(axis=2), 0)
        True
    """
    x = np.asarray(x)
    _checks.check_min_ndim(x, 3, "instance_norm", "(N, C, *spatial) with at least one spatial dim")
    _checks.check_stats_pair(mean, var, "instance_norm")
    if mean is not None:
        y, cache = batch_norm_forward(x, weight, bias, mean=mean, var=var, eps=eps,
                                      channels_last=channels_last)
        cache["kind"] = "given"
        return y, cache
    _checks.check_eps(eps)
    xc = to_channels_first(as_f64(x), channels_last)          # (N, C, *S)
    N, C = xc.shape[:2]
    _checks.check_vector(weight, C, "weight")
    _checks.check_vector(bias, C, "bias")
    spatial = xc.size // (N * C) if N * C else 0
    if spatial <= 1:
        raise ValueError(
            f"instance_norm in training needs more than 1 spatial element per channel, got an "
            f"input of shape {tuple(x.shape)} ({spatial} spatial element); InstanceNorm of a "
            f"single value is always 0: use LayerNorm or BatchNorm for (N, C) data")
    axes = tuple(range(2, xc.ndim))
    xhat, m, v, rstd = centered_forward(xc, axes, eps)        # (N, C, *S), (N, C, 1..) x3
    y = affine(xhat, weight, bias, xc.ndim)
    cache = dict(kind="instance", xhat=xhat, rstd=rstd, axes=axes, channels_last=channels_last,
                 weight=None if weight is None else np.array(weight, dtype=np.float64), has_bias=bias is not None,
                 mean=m.reshape(N, C), var=v.reshape(N, C), count=spatial)
    return from_channels_first(y, channels_last), cache


def instance_norm_backward(dy, cache):
    """Gradients ``(dx, dweight, dbias)`` of instance norm; None for an absent parameter."""
    if cache["kind"] == "given":
        return batch_norm_backward(dy, cache)
    cl = cache["channels_last"]
    dy = to_channels_first(as_f64(dy), cl)
    xhat, rstd, axes, w = cache["xhat"], cache["rstd"], cache["axes"], cache["weight"]
    g = dy if w is None else dy * channel_view(w, dy.ndim)
    dx = centered_backward(g, xhat, rstd, axes)
    paxes = (0,) + axes
    dweight = None if w is None else (dy * xhat).sum(axis=paxes)
    dbias = dy.sum(axis=paxes) if cache["has_bias"] else None
    return from_channels_first(dx, cl), dweight, dbias
