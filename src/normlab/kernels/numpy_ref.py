r"""The ``numpy`` backend: the float64 reference (``normlab.reference``) behind the kernel contract.

Always available, any floating dtype (computes in float64, returns y, dx, statistics and
parameter gradients in x's dtype). Slow: it is the fallback and the yardstick, not a fast path.
Same signatures and conventions as ``numba_cpu`` (NumPy in -> NumPy out, CPU torch tensors in
-> torch tensors out; statistics shaped the same way).

The backward functions rebuild ``xhat = (x - mean) * rstd`` from the saved statistics (the
reference's own backward wants its forward cache); in training the mean is first refined to
the exact batch mean, ``mean + mean(x - mean)``, as the numba kernels do.
"""

from __future__ import annotations

import numpy as np

from .. import _checks
from .. import reference as R
from ..reference._core import (as_f64, centered_backward, channel_view, from_channels_first,
                               to_channels_first, uncentered_backward)
from ..reference.rms_norm import resolve_rms_eps
from . import FUNCTIONS
from . import _arrays as A

NAME = "numpy"

__all__ = list(FUNCTIONS)          # the contract of normlab.kernels


class _Call:
    def __init__(self, x):
        self.torch = A.is_tensor(x)
        self.x = A.to_numpy(x, "x")
        self.dtype = A.check_float_dtype(self.x, NAME)

    def arr(self, a, name):
        return None if a is None else A.to_numpy(a, name)

    def out(self, *arrays):
        return tuple(None if a is None else A.from_numpy(np.asarray(a).astype(self.dtype), self.torch)
                     for a in arrays)


def _want(flag, weight):
    return weight is not None if flag is None else bool(flag)


def _rstd(var, eps):
    return 1.0 / np.sqrt(as_f64(var) + eps)


def _grads(call, dy, x, mean, rstd, axes, w, training, need_w, need_b, param_axes, centered=True):
    """dx, dweight, dbias from saved statistics (all arrays float64, broadcastable)."""
    if training and centered:
        mean = mean + (x - mean).mean(axis=axes, keepdims=True)   # exact batch mean
    xhat = (x - mean) * rstd
    g = dy if w is None else dy * w
    if not training:
        dx = g * rstd
    elif centered:
        dx = centered_backward(g, xhat, rstd, axes)
    else:
        dx = uncentered_backward(g, xhat, rstd, axes)
    dweight = (dy * xhat).sum(axis=param_axes) if need_w else None
    dbias = dy.sum(axis=param_axes) if need_b else None
    return dx, dweight, dbias


def batch_norm_forward(x, weight, bias, eps, *, channels_last=False, mean=None, var=None):
    call = _Call(x)
    y, c = R.batch_norm_forward(call.x, call.arr(weight, "weight"), call.arr(bias, "bias"),
                                mean=call.arr(mean, "mean"), var=call.arr(var, "var"), eps=eps,
                                channels_last=channels_last)
    return call.out(y, c["mean"], c["var"], _rstd(c["var"], eps))


def batch_norm_backward(dy, x, weight, mean, rstd, *, channels_last=False, training=True,
                        need_weight_grad=None, need_bias_grad=None):
    call = _Call(x)
    _checks.check_min_ndim(call.x, 2, "batch_norm", "(N, C, *spatial)")
    xc = to_channels_first(as_f64(call.x), channels_last)
    dyc = to_channels_first(as_f64(call.arr(dy, "dy")), channels_last)
    nd = xc.ndim
    axes = (0,) + tuple(range(2, nd))
    w = None if weight is None else channel_view(call.arr(weight, "weight"), nd)
    dx, dw, db = _grads(call, dyc, xc, channel_view(call.arr(mean, "mean"), nd),
                        channel_view(call.arr(rstd, "rstd"), nd), axes, w, training,
                        _want(need_weight_grad, weight), _want(need_bias_grad, weight), axes)
    return call.out(from_channels_first(dx, channels_last), dw, db)


def layer_norm_forward(x, normalized_shape, weight, bias, eps):
    call = _Call(x)
    y, c = R.layer_norm_forward(call.x, normalized_shape, call.arr(weight, "weight"),
                                call.arr(bias, "bias"), eps=eps)
    lead = call.x.shape[:call.x.ndim - len(c["axes"])]
    return call.out(y, c["mean"].reshape(lead), c["rstd"].reshape(lead))


def _row_grads(call, dy, normalized_shape, weight, mean, rstd, centered, need_w, need_b):
    x = as_f64(call.x)
    k = len(_checks.normalized_shape_tuple(normalized_shape))
    axes = tuple(range(x.ndim - k, x.ndim))
    lead = tuple(range(x.ndim - k))
    keep = x.shape[:x.ndim - k] + (1,) * k
    m = as_f64(call.arr(mean, "mean")).reshape(keep) if centered else 0.0
    w = None if weight is None else as_f64(call.arr(weight, "weight"))
    return _grads(call, as_f64(call.arr(dy, "dy")), x, m,
                  as_f64(call.arr(rstd, "rstd")).reshape(keep), axes, w, True, need_w, need_b,
                  lead, centered=centered)


def layer_norm_backward(dy, x, normalized_shape, weight, mean, rstd, *, need_weight_grad=None,
                        need_bias_grad=None):
    call = _Call(x)
    out = _row_grads(call, dy, normalized_shape, weight, mean, rstd, True,
                     _want(need_weight_grad, weight), _want(need_bias_grad, weight))
    return call.out(*out)


def rms_norm_forward(x, normalized_shape, weight, eps=None):
    call = _Call(x)
    eps = resolve_rms_eps(eps, call.dtype)
    y, c = R.rms_norm_forward(call.x, normalized_shape, call.arr(weight, "weight"), eps=eps)
    lead = call.x.shape[:call.x.ndim - len(c["axes"])]
    return call.out(y, c["rstd"].reshape(lead))


def rms_norm_backward(dy, x, normalized_shape, weight, rstd, *, need_weight_grad=None):
    call = _Call(x)
    dx, dw, _ = _row_grads(call, dy, normalized_shape, weight, None, rstd, False,
                           _want(need_weight_grad, weight), False)
    return call.out(dx, dw)


def group_norm_forward(x, num_groups, weight, bias, eps, *, channels_last=False):
    call = _Call(x)
    y, c = R.group_norm_forward(call.x, num_groups, call.arr(weight, "weight"), call.arr(bias, "bias"),
                                eps=eps, channels_last=channels_last)
    return call.out(y, c["mean"], _rstd(c["var"], eps))


def _grouped_grads(call, dy, G, weight, mean, rstd, channels_last, need_w, need_b):
    xc = to_channels_first(as_f64(call.x), channels_last)             # (N, C, *S)
    dyc = to_channels_first(as_f64(call.arr(dy, "dy")), channels_last)
    N, C = xc.shape[:2]
    xg = xc.reshape(N, G, C // G, -1)                                 # (N, G, C/G, S)
    dyg = dyc.reshape(xg.shape)
    w = None if weight is None else as_f64(call.arr(weight, "weight")).reshape(1, G, C // G, 1)
    stat = (N, G, 1, 1)
    dx, dw, db = _grads(call, dyg, xg, as_f64(call.arr(mean, "mean")).reshape(stat),
                        as_f64(call.arr(rstd, "rstd")).reshape(stat), (2, 3), w, True, need_w,
                        need_b, (0, 3))
    dw = None if dw is None else dw.reshape(C)
    db = None if db is None else db.reshape(C)
    return from_channels_first(dx.reshape(xc.shape), channels_last), dw, db


def group_norm_backward(dy, x, num_groups, weight, mean, rstd, *, channels_last=False,
                        need_weight_grad=None, need_bias_grad=None):
    call = _Call(x)
    out = _grouped_grads(call, dy, int(num_groups), weight, mean, rstd, channels_last,
                         _want(need_weight_grad, weight), _want(need_bias_grad, weight))
    return call.out(*out)


def instance_norm_forward(x, weight, bias, eps, *, channels_last=False):
    call = _Call(x)
    y, c = R.instance_norm_forward(call.x, call.arr(weight, "weight"), call.arr(bias, "bias"),
                                   eps=eps, channels_last=channels_last)
    return call.out(y, c["mean"], c["var"], _rstd(c["var"], eps))


def instance_norm_backward(dy, x, weight, mean, rstd, *, channels_last=False, need_weight_grad=None,
                           need_bias_grad=None):
    call = _Call(x)
    C = call.x.shape[-1] if channels_last else call.x.shape[1]
    out = _grouped_grads(call, dy, C, weight, mean, rstd, channels_last,
                         _want(need_weight_grad, weight), _want(need_bias_grad, weight))
    return call.out(*out)
