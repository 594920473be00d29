r"""Batch Renormalization (Ioffe, 2017), the specification (training mode).

Batch statistics (``mean_B``, biased ``var_B``) are corrected towards the running statistics
(``mean_R``, ``var_R``) by per-channel factors that are treated as constants (no gradient)::

    sigma_B = sqrt(var_B + eps),   sigma_R = sqrt(var_R + eps)
    r       = clip(sigma_B / sigma_R, 1 / r_max, r_max)
    d       = clip((mean_B - mean_R) / sigma_R, -d_max, d_max)
    xhat_B  = (x - mean_B) / sigma_B
    xhat    = xhat_B * r + d
    y       = weight_c * xhat + bias_c

Backward (r, d constant; the batch statistics still depend on x), ``g = dy * weight_c``, means
over the N * prod(spatial) values of channel c. Since ``dL/dxhat_B = r * g``, the batch-norm
backward applies to ``r * g``::

    dx        = r * rstd_B * (g - mean(g) - xhat_B * mean(g * xhat_B))
    dweight_c = sum(dy * xhat),  dbias_c = sum(dy)

With r = 1 and d = 0 (e.g. ``r_max = 1``, ``d_max = 0``) this is batch norm exactly. In
inference, Batch Renorm is batch norm with the running statistics: use ``batch_norm_forward``
with ``mean=running_mean, var=running_var``.
"""

from __future__ import annotations

import numpy as np

from .. import _checks
from ._core import (affine, as_f64, centered_backward, centered_forward, channel_view,
                    from_channels_first, to_channels_first)

__all__ = ["batch_renorm_forward", "batch_renorm_backward"]


def batch_renorm_forward(x, running_mean, running_var, weight=None, bias=None, *,
                         r_max: float = 3.0, d_max: float = 5.0, eps: float = 1e-5,
                         channels_last: bool = False):
    """Batch renorm forward (training) in float64. Returns ``(y, cache)`` with ``cache["r"]``, ``cache["d"]``.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(8, 3))
        >>> y, c = batch_renorm_forward(x, np.zeros(3), np.ones(3), r_max=1.0, d_max=0.0)
        >>> bool(np.all(c["r"] == 1.0) and np.all(c["d"] == 0.0))
        True
    """
    x = np.asarray(x)
    _checks.check_min_ndim(x, 2, "batch_renorm", "(N, C, *spatial)")
    _checks.check_eps(eps)
    r_max = _checks.check_real(r_max, "r_max")
    d_max = _checks.check_real(d_max, "d_max")
    if not (np.isfinite(r_max) and r_max >= 1.0):
        raise ValueError(f"r_max must be a finite number >= 1 (r is clipped to [1/r_max, r_max]), got r_max={r_max!r}")
    if not (np.isfinite(d_max) and d_max >= 0.0):
        raise ValueError(f"d_max must be a finite number >= 0 (d is clipped to [-d_max, d_max]), got d_max={d_max!r}")
    xc = to_channels_first(as_f64(x), channels_last)          # (N, C, *S)
    C = xc.shape[1]
    for name, v in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _checks.check_vector(v, C, name)
    if running_mean is None or running_var is None:
        raise ValueError("batch_renorm needs running_mean and running_var of shape (C,)")
    if np.any(as_f64(running_var) < 0):
        raise ValueError("batch_renorm: running_var has negative entries; a variance must be >= 0")
    axes = (0,) + tuple(range(2, xc.ndim))
    count = xc.size // C if C else 0
    _checks.check_values_per_channel(count, x.shape, "batch_renorm")
    xhat_b, mean_b, var_b, rstd_b = centered_forward(xc, axes, eps)  # (N, C, *S), (1, C, 1..) x3
    sigma_b = np.sqrt(var_b + eps)                                    # (1, C, 1..)
    sigma_r = np.sqrt(channel_view(running_var, xc.ndim) + eps)       # (1, C, 1..)
    r = np.clip(sigma_b / sigma_r, 1.0 / r_max, r_max)                # (1, C, 1..)
    d = np.clip((mean_b - channel_view(running_mean, xc.ndim)) / sigma_r, -d_max, d_max)
    xhat = xhat_b * r + d                                             # (N, C, *S)
    y = affine(xhat, weight, bias, xc.ndim)
    cache = dict(xhat=xhat, xhat_b=xhat_b, rstd=rstd_b, r=r.reshape(C), d=d.reshape(C),
                 r_b=r, axes=axes, channels_last=channels_last,
                 weight=None if weight is None else np.array(weight, dtype=np.float64), has_bias=bias is not None,
                 mean=mean_b.reshape(C), var=var_b.reshape(C), count=count)
    return from_channels_first(y, channels_last), cache


def batch_renorm_backward(dy, cache):
    """Gradients ``(dx, dweight, dbias)`` of batch renorm with r, d held constant."""
    cl = cache["channels_last"]
    dy = to_channels_first(as_f64(dy), cl)
    axes, w = cache["axes"], cache["weight"]
    g = dy if w is None else dy * channel_view(w, dy.ndim)
    dx = centered_backward(g * cache["r_b"], cache["xhat_b"], cache["rstd"], axes)
    dweight = None if w is None else (dy * cache["xhat"]).sum(axis=axes)
    dbias = dy.sum(axis=axes) if cache["has_bias"] else None
    return from_channels_first(dx, cl), dweight, dbias
