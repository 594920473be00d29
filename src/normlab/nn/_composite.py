"""Plain-torch composite of the normalize contract: runs on any device and dtype.

The same math as the reference (see normlab/reference/_core.py), written with torch ops so that
autograd differentiates it (to any order). Half-precision inputs are computed in float32 and the
result is cast back: statistics always accumulate in at least float32.

Two users: ``normlab.nn.functional`` when no fused backend applies (other devices, 16-bit
dtypes, ``NORMLAB_BACKEND=numpy``), and the fused ops of ``_fused`` for second-order gradients
(their backward differentiates these functions when a graph must be created).

The per-method functions take torch.nn.functional's per-channel (or ``normalized_shape``)
``weight``/``bias`` and return ``y`` first.
"""

from __future__ import annotations

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def normalize(x, dims, eps, *, mean=None, var=None, weight=None, bias=None):
    """``y = (x - mean) * rsqrt(var + eps) * weight + bias`` with statistics over ``dims``.

    ``mean``/``var`` given (broadcastable to x) means fixed statistics; otherwise the biased
    batch statistics over ``dims`` are computed (torch.var_mean is a stable one-pass/Welford
    algorithm). ``weight``/``bias`` must already broadcast against x. Returns
    ``(y, mean, var)`` with the statistics in the compute dtype and keepdim shape.
    """
    xf = x.to(compute_dtype(x.dtype))
    if mean is None:
        var, mean = torch.var_mean(xf, dim=dims, keepdim=True, correction=0)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype), mean, var


def rms_normalize(x, dims, eps, *, weight=None):
    xf = x.to(compute_dtype(x.dtype))
    ms = (xf * xf).mean(dim=dims, keepdim=True)
    y = xf * torch.rsqrt(ms + eps)
    if weight is not None:
        y = y * weight
    return y.to(x.dtype), ms


def channel_view(v, ndim):
    """A per-channel ``(C,)`` vector shaped to broadcast against ``(N, C, *spatial)``."""
    if v is None:
        return None
    return v.view((1, -1) + (1,) * (ndim - 2))


def batch_norm(x, weight, bias, eps, mean=None, var=None):
    """BatchNorm over N and the spatial axes: ``(y, mean (C,), var (C,))``.

    ``mean``/``var`` ``(C,)`` given: they normalize (inference) and are returned as given.
    """
    C = x.shape[1]
    dims = [0] + list(range(2, x.ndim))
    y, m, v = normalize(x, dims, eps, mean=channel_view(mean, x.ndim), var=channel_view(var, x.ndim),
                        weight=channel_view(weight, x.ndim), bias=channel_view(bias, x.ndim))
    return y, m.reshape(C), v.reshape(C)


def instance_norm(x, weight, bias, eps):
    """InstanceNorm (each sample and channel over its spatial values): ``(y, mean, var)``, (N, C)."""
    N, C = x.shape[:2]
    y, m, v = normalize(x, list(range(2, x.ndim)), eps, weight=channel_view(weight, x.ndim),
                        bias=channel_view(bias, x.ndim))
    return y, m.reshape(N, C), v.reshape(N, C)


def layer_norm(x, normalized_shape, weight, bias, eps):
    dims = list(range(x.ndim - len(normalized_shape), x.ndim))
    y, _, _ = normalize(x, dims, eps, weight=weight, bias=bias)
    return y


def group_norm(x, num_groups, weight, bias, eps):
    N = x.shape[0]
    yg, _, _ = normalize(x.reshape(N, num_groups, -1), [2], eps)
    y = yg.reshape(x.shape)
    if weight is not None or bias is not None:
        yf = y.to(compute_dtype(y.dtype))
        if weight is not None:
            yf = yf * channel_view(weight, x.ndim)
        if bias is not None:
            yf = yf + channel_view(bias, x.ndim)
        y = yf.to(x.dtype)
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous(memory_format=torch.channels_last)
    return y


def rms_norm(x, normalized_shape, weight, eps):
    dims = list(range(x.ndim - len(normalized_shape), x.ndim))
    y, _ = rms_normalize(x, dims, eps, weight=weight)
    return y
