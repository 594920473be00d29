"""The one forward/backward pair every NumPy layer computes through.

``forward(method, x, weight, bias, **options) -> (y, ctx, stats)`` and
``backward(ctx, dy) -> (dx, dweight, dbias)`` look ``method`` up in ``_METHODS`` and run its
implementation. Today every entry is the float64 reference (``normlab.reference``); a fused
backend registers other entries with the same contract and no layer changes.

Contract of an entry ``(fwd, bwd)``:

* ``fwd(x, weight, bias, **options) -> (y, cache, stats)``: ``x`` in the caller's dtype; ``y``
  of any floating dtype (it is cast to ``x.dtype`` here); ``stats`` the batch statistics the
  output was normalized with, as float64 ``Stats(mean, var, count)`` (``var`` biased, ``count``
  values per statistic) when the method computed per-channel (BN, Batch Renorm) or
  per-(sample, channel) (IN) statistics from ``x``, else None. Running-statistics policy is the
  layer's business, not the entry's.
* ``bwd(dy, cache) -> (dx, dweight, dbias)``; ``dx`` is cast to ``x.dtype`` here, the
  parameter gradients are left to the layer (it stores them in the parameter dtype).

The dtype policy in one sentence: compute in float64 (the reference) or at least float32
(kernels), return ``y`` and ``dx`` in the input's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import reference

__all__ = ["Stats", "forward", "backward"]


class Stats(NamedTuple):
    mean: np.ndarray   # (C,) or (N, C), float64
    var: np.ndarray    # biased, same shape as mean
    count: int         # values behind each statistic


class _Context(NamedTuple):
    method: str
    cache: dict
    dtype: np.dtype    # x's dtype: the dtype dx comes back in


def _batch_norm_forward(x, weight, bias, *, mean=None, var=None, eps, channels_last):
    y, cache = reference.batch_norm_forward(x, weight, bias, mean=mean, var=var, eps=eps,
                                            channels_last=channels_last)
    stats = Stats(cache["mean"], cache["var"], cache["count"]) if cache["training"] else None
    return y, cache, stats


def _batch_renorm_forward(x, weight, bias, *, running_mean, running_var, r_max, d_max, eps,
                          channels_last):
    y, cache = reference.batch_renorm_forward(x, running_mean, running_var, weight, bias,
                                              r_max=r_max, d_max=d_max, eps=eps,
                                              channels_last=channels_last)
    return y, cache, Stats(cache["mean"], cache["var"], cache["count"])


def _instance_norm_forward(x, weight, bias, *, mean=None, var=None, eps, channels_last):
    y, cache = reference.instance_norm_forward(x, weight, bias, mean=mean, var=var, eps=eps,
                                               channels_last=channels_last)
    stats = Stats(cache["mean"], cache["var"], cache["count"]) if cache["kind"] == "instance" else None
    return y, cache, stats


def _group_norm_forward(x, weight, bias, *, num_groups, eps, channels_last):
    y, cache = reference.group_norm_forward(x, num_groups, weight, bias, eps=eps,
                                            channels_last=channels_last)
    return y, cache, None


def _layer_norm_forward(x, weight, bias, *, normalized_shape, eps):
    y, cache = reference.layer_norm_forward(x, normalized_shape, weight, bias, eps=eps)
    return y, cache, None


def _rms_norm_forward(x, weight, bias, *, normalized_shape, eps):
    assert bias is None, "RMSNorm has no bias"
    # x keeps its own dtype here: eps=None resolves from it as in torch (resolve_rms_eps)
    y, cache = reference.rms_norm_forward(x, normalized_shape, weight, eps=eps)
    return y, cache, None


_METHODS = {
    "batch_norm": (_batch_norm_forward, reference.batch_norm_backward),
    "batch_renorm": (_batch_renorm_forward, reference.batch_renorm_backward),
    "instance_norm": (_instance_norm_forward, reference.instance_norm_backward),
    "group_norm": (_group_norm_forward, reference.group_norm_backward),
    "layer_norm": (_layer_norm_forward, reference.layer_norm_backward),
    "rms_norm": (_rms_norm_forward, reference.rms_norm_backward),
}


def forward(method: str, x: np.ndarray, weight, bias, **options):
    """Normalize ``x`` with ``method``; returns ``(y, ctx, stats)`` with ``y`` of ``x.dtype``."""
    fwd, _ = _METHODS[method]
    y, cache, stats = fwd(x, weight, bias, **options)
    return y.astype(x.dtype, copy=False), _Context(method, cache, x.dtype), stats


def backward(ctx: _Context, dy: np.ndarray):
    """Gradients ``(dx, dweight, dbias)`` for the forward call that returned ``ctx``."""
    _, bwd = _METHODS[ctx.method]
    dx, dweight, dbias = bwd(dy, ctx.cache)
    return dx.astype(ctx.dtype, copy=False), dweight, dbias
