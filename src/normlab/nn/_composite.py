"""Plain-torch composite of the normalize contract: runs on any device and dtype.

The same math as the reference (see normlab/reference/_core.py), written with torch ops so that
autograd differentiates it (to any order). Half-precision inputs are computed in float32 and the
result is cast back: statistics always accumulate in at least float32.
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
