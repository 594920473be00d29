r"""The two primitives shared by every method: normalize, and its backward pass.

Every method reduces some axes of a float64 array ``x`` and normalizes::

    mean, var = moments(x, over=axes)
    rstd      = 1 / sqrt(var + eps)
    xhat      = (x - mean) * rstd
    y         = xhat * weight + bias

The backward pass, for ``g = dy * weight`` and a reduction group of ``M`` elements, is derived
once here (see docs/ for the step-by-step version)::

    dL/dxhat = g
    dL/dvar  = -1/2 * rstd^3 * sum(g * (x - mean))  = -1/2 * rstd^2 * sum(g * xhat)
    dL/dmean = -rstd * sum(g)        (the path through var vanishes: sum(x - mean) = 0)
    dx       = g * rstd + dL/dvar * 2 (x - mean) / M + dL/dmean / M
             = rstd * (g - mean(g) - xhat * mean(g * xhat))

For the uncentered RMS form (no mean), ``xhat = x * rstd`` with ``rstd = 1/sqrt(mean(x^2)+eps)``
and ``dx = rstd * (g - xhat * mean(g * xhat))``.

With statistics that do not depend on ``x`` (inference with given statistics), ``dx = g * rstd``.
Parameter gradients reduce over every axis that is not a parameter axis::

    dweight = sum(dy * xhat),  dbias = sum(dy)
"""

from __future__ import annotations

import numpy as np

from .moments import moments


def as_f64(x):
    return np.asarray(x, dtype=np.float64)


def centered_forward(x, axes, eps):
    """``x`` float64 -> ``(xhat, mean, var, rstd)`` with statistics kept as broadcastable arrays."""
    mean, var = moments(x, axes)                     # (.., 1, ..) each
    rstd = 1.0 / np.sqrt(var + eps)                  # (.., 1, ..)
    xhat = (x - mean) * rstd                         # like x
    return xhat, mean, var, rstd


def centered_backward(g, xhat, rstd, axes):
    """``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` over ``axes``."""
    mean_g = g.mean(axis=axes, keepdims=True)              # (.., 1, ..)
    mean_gx = (g * xhat).mean(axis=axes, keepdims=True)    # (.., 1, ..)
    return rstd * (g - mean_g - xhat * mean_gx)            # like g


def uncentered_forward(x, axes, eps):
    """RMS form: ``x -> (xhat, ms, rstd)`` with ``ms = mean(x^2)`` and ``rstd = 1/sqrt(ms + eps)``."""
    ms = (x * x).mean(axis=axes, keepdims=True)      # (.., 1, ..)
    rstd = 1.0 / np.sqrt(ms + eps)                   # (.., 1, ..)
    return x * rstd, ms, rstd


def uncentered_backward(g, xhat, rstd, axes):
    """``dx = rstd * (g - xhat * mean(g * xhat))`` over ``axes``."""
    mean_gx = (g * xhat).mean(axis=axes, keepdims=True)
    return rstd * (g - xhat * mean_gx)


def to_channels_first(x, channels_last: bool):
    """(N, *spatial, C) -> (N, C, *spatial) as a view; identity for channels-first data."""
    return np.moveaxis(x, -1, 1) if channels_last else x


def from_channels_first(x, channels_last: bool):
    return np.moveaxis(x, 1, -1) if channels_last else x


def channel_view(v, ndim: int, axis: int = 1):
    """A per-channel vector (C,) reshaped to broadcast along ``axis`` of an ``ndim`` array."""
    shape = [1] * ndim
    shape[axis] = -1
    return as_f64(v).reshape(shape)


def affine(xhat, weight, bias, ndim: int, axis: int = 1):
    y = xhat
    if weight is not None:
        y = y * channel_view(weight, ndim, axis)
    if bias is not None:
        y = y + channel_view(bias, ndim, axis)
    return y
