r"""Batch Normalization (Ioffe & Szegedy, 2015), the specification.

Forward, per channel c, over the N * prod(spatial) values of that channel::

    mean_c = mean(x[:, c])                         # batch statistics in training,
    var_c  = mean((x[:, c] - mean_c)^2)            # biased; or given (running) statistics
    rstd_c = 1 / sqrt(var_c + eps)
    xhat   = (x - mean_c) * rstd_c
    y      = weight_c * xhat + bias_c

Backward, with ``g = dy * weight_c`` and means over the M = N * prod(spatial) values of c::

    training (batch statistics depend on x):
        dx = rstd_c * (g - mean(g) - xhat * mean(g * xhat))
    inference (given statistics are constants):
        dx = g * rstd_c
    dweight_c = sum(dy * xhat),  dbias_c = sum(dy)

Layout: ``(N, C, *spatial)`` or, with ``channels_last=True``, ``(N, *spatial, C)``; any number of
spatial dims (including none: ``(N, C)``).

Running statistics are a policy on top of this (see ``moments.running_stats_update``): the
batch mean and biased variance come back in ``cache["mean"]``, ``cache["var"]`` with the count.
"""

from __future__ import annotations

import numpy as np

from .. import _checks
from ._core import (affine, as_f64, centered_backward, centered_forward, channel_view,
                    from_channels_first, to_channels_first)

__all__ = ["batch_norm_forward", "batch_norm_backward"]


def batch_norm_forward(x, weight=None, bias=None, *, mean=None, var=None, eps: float = 1e-5,
                       channels_last: bool = False):
    """Batch norm forward in float64. Returns ``(y, cache)``.

    Args:
        x: ``(N, C, *spatial)`` (or ``(N, *spatial, C)`` with ``channels_last``).
        weight, bias: ``(C,)`` or None (no scale / no shift).
        mean, var: ``(C,)`` given statistics (inference); both None means batch statistics.
        eps: added to the variance, > 0.

    Example:
        >>> import numpy as np
        >>> y, cache = batch_norm_forward(np.arange(8.0).reshape(4, 2))
        >>> np.allclose(y.mean(axis=0), 0)
        True
    """
    x = np.asarray(x)
    _checks.check_min_ndim(x, 2, "batch_norm", "(N, C, *spatial)")
    _checks.check_eps(eps)
    _checks.check_stats_pair(mean, var, "batch_norm")
    xc = to_channels_first(as_f64(x), channels_last)          # (N, C, *S)
    C = xc.shape[1]
    for name, v in (("weight", weight), ("bias", bias), ("mean", mean), ("var", var)):
        _checks.check_vector(v, C, name)
    axes = (0,) + tuple(range(2, xc.ndim))                    # all but the channel axis
    count = xc.size // C if C else 0
    training = mean is None
    if training:
        _checks.check_values_per_channel(count, x.shape, "batch_norm")
        xhat, m, v, rstd = centered_forward(xc, axes, eps)    # (N, C, *S), (1, C, 1..) x3
    else:
        bad = ~(as_f64(var) >= 0)                            # negative or NaN
        if np.any(bad):
            raise ValueError(
                f"batch_norm: the given var has a negative or NaN entry (a variance must be >= 0), got var[{int(np.argmax(bad))}]="
                f"{float(as_f64(var)[bad][0])!r}; pass the running variance, not a log-variance or std")
        m = channel_view(mean, xc.ndim)                      # (1, C, 1..)
        v = channel_view(var, xc.ndim)                       # (1, C, 1..)
        rstd = 1.0 / np.sqrt(v + eps)                        # (1, C, 1..)
        xhat = (xc - m) * rstd                               # (N, C, *S)
    y = affine(xhat, weight, bias, xc.ndim)                  # (N, C, *S)
    cache = dict(xhat=xhat, rstd=rstd, axes=axes, training=training, channels_last=channels_last,
                 weight=None if weight is None else np.array(weight, dtype=np.float64), has_bias=bias is not None,
                 mean=np.array(m.reshape(C)), var=np.array(v.reshape(C)), count=count)
    return from_channels_first(y, channels_last), cache


def batch_norm_backward(dy, cache):
    """Gradients ``(dx, dweight, dbias)`` of batch norm; None for an absent parameter."""
    cl = cache["channels_last"]
    dy = to_channels_first(as_f64(dy), cl)                   # (N, C, *S)
    xhat, rstd, axes, w = cache["xhat"], cache["rstd"], cache["axes"], cache["weight"]
    g = dy if w is None else dy * channel_view(w, dy.ndim)   # (N, C, *S)
    if cache["training"]:
        dx = centered_backward(g, xhat, rstd, axes)
    else:
        dx = g * rstd
    dweight = None if w is None else (dy * xhat).sum(axis=axes)   # (C,)
    dbias = dy.sum(axis=axes) if cache["has_bias"] else None      # (C,)
    return from_channels_first(dx, cl), dweight, dbias
