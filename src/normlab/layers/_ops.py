"""The one forward/backward pair every NumPy layer computes through.

``forward(method, x, weight, bias, *, backend=None, **options) -> (y, ctx, stats)`` and
``backward(ctx, dy) -> (dx, dweight, dbias)`` look ``method`` up in ``_METHODS`` and run its
entry on a kernel backend chosen by ``normlab.kernels.get_backend(backend, device="cpu",
dtype=x.dtype)``: the fused numba kernels for float32/float64, and (automatically, e.g. for
float16, or when asked for with ``backend="numpy"`` or ``NORMLAB_BACKEND=numpy``) the float64
NumPy backend. Batch Renorm has no kernel yet and always runs on the float64 reference.

Contract of an entry ``(fwd, bwd)``:

* ``fwd(be, x, weight, bias, **options) -> (y, cache, stats)``: ``x`` in the caller's dtype;
  ``y`` of any floating dtype (it is cast to ``x.dtype`` here); ``stats`` the batch statistics
  the output was normalized with, as float64 ``Stats(mean, var, count)`` (``var`` biased,
  ``count`` values per statistic) when the method computed per-channel (BN, Batch Renorm) or
  per-(sample, channel) (IN) statistics from ``x``, else None. Running-statistics policy is the
  layer's business, not the entry's.
* ``bwd(be, dy, cache) -> (dx, dweight, dbias)``; ``dx`` is cast to ``x.dtype`` here, the
  parameter gradients are left to the layer (it stores them in the parameter dtype); a
  gradient is None where its parameter is absent.

The cache keeps a reference to ``x`` (the kernels' backward recomputes ``xhat`` from it, as
torch saves its input): modifying ``x`` in place between forward and backward changes the
gradient, as it would in torch without its version check.

The dtype policy in one sentence: compute in float64 (reference, numpy backend) or with float64
accumulation (numba kernels), return ``y`` and ``dx`` in the input's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import kernels, reference

__all__ = ["Stats", "forward", "backward"]


class Stats(NamedTuple):
    mean: np.ndarray   # (C,) or (N, C), float64
    var: np.ndarray    # biased, same shape as mean
    count: int         # values behind each statistic


class _Context(NamedTuple):
    method: str
    backend: str       # the name of the backend that ran the forward (picklable)
    cache: dict
    dtype: np.dtype    # x's dtype: the dtype dx comes back in


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _batch_norm_forward(be, x, weight, bias, *, mean=None, var=None, eps, channels_last):
    y, m, v, rstd = be.batch_norm_forward(x, weight, bias, eps, channels_last=channels_last,
                                          mean=mean, var=var)
    training = mean is None
    cache = dict(x=x, weight=weight, has_bias=bias is not None, mean=m, rstd=rstd,
                 training=training, channels_last=channels_last)
    count = x.size // x.shape[-1 if channels_last else 1]
    return y, cache, (Stats(_f64(m), _f64(v), count) if training else None)


def _batch_norm_backward(be, dy, c):
    return be.batch_norm_backward(dy, c["x"], c["weight"], c["mean"], c["rstd"],
                                  channels_last=c["channels_last"], training=c["training"],
                                  need_weight_grad=c["weight"] is not None,
                                  need_bias_grad=c["has_bias"])


def _batch_renorm_forward(be, x, weight, bias, *, running_mean, running_var, r_max, d_max, eps,
                          channels_last):
    y, cache = reference.batch_renorm_forward(x, running_mean, running_var, weight, bias,
                                              r_max=r_max, d_max=d_max, eps=eps,
                                              channels_last=channels_last)
    return y, cache, Stats(cache["mean"], cache["var"], cache["count"])


def _batch_renorm_backward(be, dy, cache):
    return reference.batch_renorm_backward(dy, cache)


def _instance_norm_forward(be, x, weight, bias, *, mean=None, var=None, eps, channels_last):
    if mean is not None:      # given (running) statistics: per channel, as in batch norm eval
        return _batch_norm_forward(be, x, weight, bias, mean=mean, var=var, eps=eps,
                                   channels_last=channels_last)
    y, m, v, rstd = be.instance_norm_forward(x, weight, bias, eps, channels_last=channels_last)
    cache = dict(kind="instance", x=x, weight=weight, has_bias=bias is not None, mean=m,
                 rstd=rstd, channels_last=channels_last)
    N, C = x.shape[0], x.shape[-1 if channels_last else 1]
    count = x.size // (N * C)
    return y, cache, Stats(_f64(m).reshape(N, C), _f64(v).reshape(N, C), count)


def _instance_norm_backward(be, dy, c):
    if c.get("kind") != "instance":
        return _batch_norm_backward(be, dy, c)
    return be.instance_norm_backward(dy, c["x"], c["weight"], c["mean"], c["rstd"],
                                     channels_last=c["channels_last"],
                                     need_weight_grad=c["weight"] is not None,
                                     need_bias_grad=c["has_bias"])


def _group_norm_forward(be, x, weight, bias, *, num_groups, eps, channels_last):
    y, m, rstd = be.group_norm_forward(x, num_groups, weight, bias, eps,
                                       channels_last=channels_last)
    cache = dict(x=x, weight=weight, has_bias=bias is not None, mean=m, rstd=rstd,
                 num_groups=num_groups, channels_last=channels_last)
    return y, cache, None


def _group_norm_backward(be, dy, c):
    return be.group_norm_backward(dy, c["x"], c["num_groups"], c["weight"], c["mean"], c["rstd"],
                                  channels_last=c["channels_last"],
                                  need_weight_grad=c["weight"] is not None,
                                  need_bias_grad=c["has_bias"])


def _layer_norm_forward(be, x, weight, bias, *, normalized_shape, eps):
    y, m, rstd = be.layer_norm_forward(x, normalized_shape, weight, bias, eps)
    cache = dict(x=x, weight=weight, has_bias=bias is not None, mean=m, rstd=rstd,
                 normalized_shape=normalized_shape)
    return y, cache, None


def _layer_norm_backward(be, dy, c):
    return be.layer_norm_backward(dy, c["x"], c["normalized_shape"], c["weight"], c["mean"],
                                  c["rstd"], need_weight_grad=c["weight"] is not None,
                                  need_bias_grad=c["has_bias"])


def _rms_norm_forward(be, x, weight, bias, *, normalized_shape, eps):
    assert bias is None, "RMSNorm has no bias"
    # eps=None resolves from x's dtype as in torch (reference.rms_norm.resolve_rms_eps)
    y, rstd = be.rms_norm_forward(x, normalized_shape, weight, eps)
    return y, dict(x=x, weight=weight, rstd=rstd, normalized_shape=normalized_shape), None


def _rms_norm_backward(be, dy, c):
    dx, dweight = be.rms_norm_backward(dy, c["x"], c["normalized_shape"], c["weight"], c["rstd"])
    return dx, dweight, None


_METHODS = {
    "batch_norm": (_batch_norm_forward, _batch_norm_backward),
    "batch_renorm": (_batch_renorm_forward, _batch_renorm_backward),
    "instance_norm": (_instance_norm_forward, _instance_norm_backward),
    "group_norm": (_group_norm_forward, _group_norm_backward),
    "layer_norm": (_layer_norm_forward, _layer_norm_backward),
    "rms_norm": (_rms_norm_forward, _rms_norm_backward),
}


def forward(method: str, x: np.ndarray, weight, bias, *, backend=None, **options):
    """Normalize ``x`` with ``method``; returns ``(y, ctx, stats)`` with ``y`` of ``x.dtype``.

    ``backend``: a kernel backend name (``"numba"``, ``"numpy"``) or None for the registry's
    choice (``NORMLAB_BACKEND``, then the CPU default, then the fallback).
    """
    fwd, _ = _METHODS[method]
    be = kernels.get_backend(backend, device="cpu", dtype=x.dtype)
    y, cache, stats = fwd(be, x, weight, bias, **options)
    return y.astype(x.dtype, copy=False), _Context(method, be.name, cache, x.dtype), stats


def backward(ctx: _Context, dy: np.ndarray):
    """Gradients ``(dx, dweight, dbias)`` for the forward call that returned ``ctx``."""
    _, bwd = _METHODS[ctx.method]
    be = kernels.get_backend(ctx.backend, device="cpu", dtype=ctx.dtype)
    dx, dweight, dbias = bwd(be, dy, ctx.cache)
    return dx.astype(ctx.dtype, copy=False), dweight, dbias
