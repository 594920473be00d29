r"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017), the specification (training mode).

"Train longer, generalize better: closing the generalization gap in large batch training of
neural networks", NeurIPS 2017, Algorithm 1. A batch of N samples is cut into virtual ("ghost")
batches along the sample axis and each is batch-normalized with its own statistics, so that the
noise of the normalization is that of a small batch even when the optimizer's batch is large::

    x = [X^1; X^2; ...; X^k]                       # virtual batches, along axis 0
    mean_l = mean(X^l[:, c]),  var_l = mean((X^l[:, c] - mean_l)^2)      # per channel c
    y^l    = weight_c * (X^l - mean_l) / sqrt(var_l + eps) + bias_c

Each virtual batch is an independent batch norm, so the backward is batch norm's backward
applied to each virtual batch separately (``g = dy * weight_c``, means over the values of
channel c inside virtual batch l), and the parameter gradients add up over virtual batches::

    dx^l      = rstd_l * (g^l - mean_l(g^l) - xhat^l * mean_l(g^l * xhat^l))
    dweight_c = sum over all N of dy * xhat,  dbias_c = sum(dy)

How the batch is cut (``virtual_batch_slices``): consecutive slices of ``virtual_batch_size``
samples; a remainder of ``N mod virtual_batch_size`` samples is merged into the last full
virtual batch, so no virtual batch is ever smaller than ``virtual_batch_size`` (a lone
remainder of 1 sample would otherwise have zero variance, and a small one noisier statistics
than the method intends). With ``N <= virtual_batch_size`` there is one virtual batch: plain
batch norm.

Running statistics (a policy on top, as for batch norm): the cache holds the mean and biased
variance of the *whole* batch (equal to the count-weighted Chan merge of the virtual batches'
statistics), which the modules feed to the usual running-statistics rule once per step. They
estimate the population statistics used in inference, exactly as batch norm's.
"""

from __future__ import annotations

import numpy as np

from .. import _checks
from ._core import as_f64, from_channels_first, to_channels_first
from .batch_norm import batch_norm_backward, batch_norm_forward
from .moments import moments

__all__ = ["ghost_batch_norm_forward", "ghost_batch_norm_backward", "virtual_batch_slices"]


def virtual_batch_slices(n: int, virtual_batch_size: int) -> list:
    """Slices of ``range(n)`` into virtual batches; the remainder joins the last full one.

    Example:
        >>> virtual_batch_slices(10, 4)
        [slice(0, 4, None), slice(4, 10, None)]
        >>> virtual_batch_slices(3, 8)
        [slice(0, 3, None)]
    """
    vbs = _checks.check_positive_int(virtual_batch_size, "virtual_batch_size")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer (the batch size), got n={n!r}")
    k = max(int(n) // vbs, 1)                              # number of virtual batches
    starts = [i * vbs for i in range(k)]
    ends = starts[1:] + [int(n)]
    return [slice(s, e) for s, e in zip(starts, ends)]


def ghost_batch_norm_forward(x, weight=None, bias=None, *, virtual_batch_size: int, eps: float = 1e-5,
                             channels_last: bool = False):
    """Ghost batch norm forward (training) in float64. Returns ``(y, cache)``.

    Args:
        x: ``(N, C, *spatial)`` (or ``(N, *spatial, C)`` with ``channels_last``).
        weight, bias: ``(C,)`` or None.
        virtual_batch_size: samples per virtual batch (> 0); see ``virtual_batch_slices``.
        eps: added to each virtual batch's variance, > 0.

    ``cache["mean"]``, ``cache["var"]`` (biased) and ``cache["count"]`` describe the whole batch,
    for the running statistics.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(8, 3))
        >>> y, c = ghost_batch_norm_forward(x, virtual_batch_size=4)
        >>> bool(np.allclose(y[:4].mean(axis=0), 0) and np.allclose(y[4:].mean(axis=0), 0))
        True
    """
    x = np.asarray(x)
    _checks.check_min_ndim(x, 2, "ghost_batch_norm", "(N, C, *spatial)")
    _checks.check_eps(eps)
    xc = to_channels_first(as_f64(x), channels_last)          # (N, C, *S)
    N, C = xc.shape[:2]
    for name, v in (("weight", weight), ("bias", bias)):
        _checks.check_vector(v, C, name)
    slices = virtual_batch_slices(N, virtual_batch_size)
    ys, caches = [], []
    for s in slices:
        y_l, c_l = batch_norm_forward(xc[s], weight, bias, eps=eps)   # (n_l, C, *S)
        ys.append(y_l)
        caches.append(c_l)
    y = np.concatenate(ys, axis=0)                              # (N, C, *S)
    axes = (0,) + tuple(range(2, xc.ndim))
    mean, var = moments(xc, axes, keepdims=False)               # (C,) whole batch, biased
    cache = dict(slices=slices, caches=caches, channels_last=channels_last, mean=mean, var=var,
                 count=xc.size // C if C else 0, virtual_batch_size=virtual_batch_size)
    return from_channels_first(y, channels_last), cache


def ghost_batch_norm_backward(dy, cache):
    """Gradients ``(dx, dweight, dbias)``: batch norm's backward per virtual batch, summed params."""
    cl = cache["channels_last"]
    dy = to_channels_first(as_f64(dy), cl)                    # (N, C, *S)
    dxs, dw, db = [], None, None
    for s, c_l in zip(cache["slices"], cache["caches"]):
        dx_l, dw_l, db_l = batch_norm_backward(dy[s], c_l)
        dxs.append(dx_l)
        dw = dw_l if dw is None else dw + dw_l
        db = db_l if db is None else db + db_l
    dx = np.concatenate(dxs, axis=0)
    return from_channels_first(dx, cl), dw, db
