r"""Fused residual add + LayerNorm / RMSNorm: ``s = x + residual; y = norm(s)``, returning both.

The transformer-block pattern (pre-norm residual stream): one kernel reads x and residual once,
writes the sum (the next block's residual) and the normalized output, instead of an add kernel
and a norm kernel (two more tensor passes). The kernels are the Triton backend's
``add_layer_norm_forward`` / ``add_rms_norm_forward``; the gradient of s (from y and from the
returned sum) is the gradient of both x and residual.

Two custom ops, so that ``torch.compile`` traces through them as through ``_fused``'s::

    normlab::add_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias,
                      SymInt[] normalized_shape, float eps, bool centered)
        -> (Tensor y, Tensor sum, Tensor mean, Tensor rstd)
    normlab::add_norm_backward(Tensor dy, Tensor dsum, Tensor sum, Tensor? weight, Tensor mean,
                               Tensor rstd, SymInt[] normalized_shape, bool centered,
                               bool has_dsum, bool need_weight_grad, bool need_bias_grad)
        -> (Tensor dsum_total, Tensor dweight, Tensor dbias)

``mean`` is empty for RMSNorm; gradients not asked for are empty tensors. They run wherever the
registry picks the ``triton`` backend (CUDA tensors; CPU tensors under the interpreter);
``normlab.nn.functional.add_layer_norm`` / ``add_rms_norm`` fall back to an add and the usual
norm elsewhere.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _composite

BACKEND = "triton"
_EMPTY = (0,)


def _backend(x: Tensor):
    from ..kernels import get_backend

    return get_backend(BACKEND, device=x.device.type, dtype=x.dtype)


def _stat_dtype(x: Tensor):
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty(_EMPTY, dtype=dtype)


@torch.library.custom_op("normlab::add_norm", mutates_args=(), device_types=("cpu", "cuda"))
def add_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             normalized_shape: Sequence[int], eps: float, centered: bool
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    be = _backend(x).impl
    shape = tuple(normalized_shape)
    if centered:
        y, s, mean, rstd = be.add_layer_norm_forward(x, residual, shape, weight, bias, eps)
    else:
        y, s, rstd = be.add_rms_norm_forward(x, residual, shape, weight, eps)
        mean = _empty(x, _stat_dtype(x))
    return y, s, mean, rstd


@add_norm.register_fake
def _(x, residual, weight, bias, normalized_shape, eps, centered):
    lead = tuple(x.shape[:x.ndim - len(normalized_shape)])
    sd = _stat_dtype(x)
    return (x.new_empty(x.shape), x.new_empty(x.shape),
            x.new_empty(lead if centered else _EMPTY, dtype=sd), x.new_empty(lead, dtype=sd))


@torch.library.custom_op("normlab::add_norm_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def add_norm_backward(dy: Tensor, dsum: Tensor, s: Tensor, weight: Optional[Tensor], mean: Tensor,
                      rstd: Tensor, normalized_shape: Sequence[int], centered: bool,
                      has_dsum: bool, need_weight_grad: bool, need_bias_grad: bool
                      ) -> tuple[Tensor, Tensor, Tensor]:
    be = _backend(s).impl
    shape = tuple(normalized_shape)
    ds_in = dsum if has_dsum else None
    if centered:
        ds, dw, db = be.add_layer_norm_backward(dy, ds_in, s, shape, weight, mean, rstd,
                                                need_weight_grad=need_weight_grad,
                                                need_bias_grad=need_bias_grad)
    else:
        ds, dw = be.add_rms_norm_backward(dy, ds_in, s, shape, weight, rstd,
                                          need_weight_grad=need_weight_grad)
        db = None
    return ds, (_empty(s) if dw is None else dw), (_empty(s) if db is None else db)


@add_norm_backward.register_fake
def _(dy, dsum, s, weight, mean, rstd, normalized_shape, centered, has_dsum, need_weight_grad,
      need_bias_grad):
    shape = tuple(normalized_shape)
    return (s.new_empty(s.shape), s.new_empty(shape if need_weight_grad else _EMPTY),
            s.new_empty(shape if need_bias_grad and centered else _EMPTY))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, normalized_shape, eps, centered = inputs
    _, s, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, residual, s, weight, bias, mean, rstd)
    ctx.shape, ctx.eps, ctx.centered = list(normalized_shape), eps, centered


def _composite_y(s, weight, bias, shape, eps, centered):
    if centered:
        return _composite.layer_norm(s, tuple(shape), weight, bias, eps)
    return _composite.rms_norm(s, tuple(shape), weight, eps)


def _autograd_backward(ctx, grad_y, grad_sum, _grad_mean, _grad_rstd):
    x, residual, s, weight, bias, mean, rstd = ctx.saved_tensors
    need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
    need_w = need_w and weight is not None
    need_b = need_b and bias is not None and ctx.centered
    rest = (None,) * 3                        # normalized_shape, eps, centered
    if grad_y is None:
        grad_y = torch.zeros_like(s)
    if torch.is_grad_enabled():               # create_graph=True: differentiate the composite
        wanted = [(t, n) for t, n in ((x, need_x), (residual, need_r), (weight, need_w),
                                      (bias, need_b))]
        leaves = [t for t, n in wanted if n]
        if not leaves:
            return (None,) * 4 + rest
        y = _composite_y(x + residual, weight, bias, ctx.shape, ctx.eps, ctx.centered)
        it = iter(torch.autograd.grad(y, leaves, grad_y, create_graph=True, allow_unused=True))
        out = [next(it) if n else None for _, n in wanted]
        if grad_sum is not None:
            for i in (0, 1):
                if out[i] is not None:
                    out[i] = out[i] + grad_sum
        return tuple(out) + rest
    has = grad_sum is not None
    ds, dw, db = add_norm_backward(grad_y, grad_sum if has else _empty(s), s, weight, mean,
                                   rstd, ctx.shape, ctx.centered, has, need_w, need_b)
    return (ds if need_x else None, ds if need_r else None, dw if need_w else None,
            db if need_b else None) + rest


add_norm.register_autograd(_autograd_backward, setup_context=_setup_context)
