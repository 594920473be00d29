r"""Fused autograd: torch.library custom ops whose forward and backward are the fused kernels.

Layers (see ARCHITECTURE.md): ``normlab.kernels`` (the fused kernels: numba on CPU, Triton on
CUDA) -> these ops -> the dispatch in ``normlab.nn.functional`` -> the modules.

Which kernels: the registry's choice for the tensor's device and dtype (``NORMLAB_BACKEND``,
then the device default) when that is a fused backend (``BACKENDS``), else the device's fused
backend (``DEVICE_BACKENDS``). The ops have CPU and CUDA implementations. Statistics outputs are
float32 for 16-bit inputs (Triton's accumulation dtype) and x's dtype otherwise.

One mechanism over a method table. Every method (``METHODS``) is described by one ``Method``
record: how to call the backend's forward and backward kernels, the shape of its statistics,
its memory pattern, and its differentiable torch composite. ``_define`` turns each record into
two custom ops with the same uniform schema::

    normlab::<name>(Tensor x, Tensor? weight, Tensor? bias, Tensor? mean, Tensor? var,
                    SymInt[] arg, float eps) -> (Tensor y, Tensor mean, Tensor var, Tensor rstd)
    normlab::<name>_backward(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd,
                             SymInt[] arg, bool need_weight_grad, bool need_bias_grad)
        -> (Tensor dx, Tensor dweight, Tensor dbias)

``arg`` is ``normalized_shape`` (layer_norm, rms_norm), ``[num_groups]`` (group_norm) or ``[]``;
``mean``/``var`` inputs are the given statistics of ``batch_norm_eval`` (None elsewhere). A
statistic a method does not produce, and a gradient that was not asked for, is an empty
``(0,)`` tensor (custom ops cannot return None). The statistics outputs are not differentiable
(marked so): they are for running-statistics updates, which torch.nn does without grad.

Each op gets a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces through
it, and an autograd formula (``register_autograd``) whose backward is the ``_backward`` op,
i.e. the fused backward kernel. The ops are tagged ``needs_exact_strides``: inductor hands them
inputs with exactly the strides seen while tracing, so the layout decision below is the same in
the fake and the real implementation.

Two paths, one implementation. In plain eager code (``_eager_ok``: not under ``torch.compile``
or ``torch.export`` tracing, no ``TorchDispatchMode`` such as fake tensors or ``make_fx``, no
functorch transform, plain tensors) the entry points skip the dispatcher: a
``torch.autograd.Function`` per method (``EAGER_FUNCTIONS``) calls the same ``_run_forward`` /
``_run_backward`` and computes the same gradients (``_input_grads``), or, where no gradient is
wanted, ``_run_forward`` is called directly. On CPU that path also skips the kernel
contract's validation: its inputs were checked by ``normlab.nn.functional``, so it calls the
numba backend's unchecked ``direct_*`` entries on NumPy views (the same cores the checked
functions run); the custom ops, which can be called directly with anything, keep the checked
functions. ``normlab.nn.functional.layer_norm`` forward + backward, one thread, on the 2-core
development machine (``benchmarks/eager_overhead.py``, 2026-12-05, when the machine ran torch's
own call in 65 us against 21 us when first measured): 8 x 64 182 us eagerly (218 us before the
eager Function returned only what its callers use and kept its statistics as NumPy arrays),
380 us through the ops, torch 65 us; 32 x 1024: 262 (287), 467 and 96 us. Of the 182 us: an
empty ``autograd.Function`` with two saved tensors 82 us (more than torch's whole call: the
floor of any Python-level Function), ``_run_forward`` + ``_run_backward`` (the kernel calls
with the tensor conversions) 33 us, the method's Function around them 9 us, ``_call`` 4 us and
the functional's checks and dispatch 30 us. Everywhere else the custom ops run, so compiled
graphs and dispatch modes see ``normlab::`` ops. The two paths give bit-identical results
(tested); ``EAGER = False`` forces the ops.

Double backward: when the backward runs with ``create_graph=True`` (grad mode on), it
differentiates the method's torch composite (``_composite``) instead of calling the kernel, so
second-order gradients are exact (gradgradcheck passes) at composite speed.

Zero copy and channels-last: the kernels take CPU tensors directly (``.numpy()`` views) and
return tensors wrapping their result arrays. A channel-pattern input (batch/instance/group norm)
of shape ``(N, C, *spatial)`` whose memory is ``(N, *spatial, C)`` -- ``torch.channels_last``,
``channels_last_3d``, or a transposed ``(N, L, C)`` sequence -- is handed over as that contiguous
view with ``channels_last=True``, and its output is created in the same memory format: neither
is copied. Other non-contiguous inputs are made contiguous once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils import _python_dispatch

from ..kernels import get_backend
from . import _composite

__all__ = ["METHODS", "OPS", "EAGER_FUNCTIONS", "EAGER", "BACKEND", "BACKENDS", "DEVICE_BACKENDS",
           "batch_norm_train", "batch_norm_eval", "instance_norm", "group_norm", "layer_norm",
           "rms_norm", "channels_last_view", "plain_eager"]

#: the kernel backend the CPU implementations of the ops call
BACKEND = "numba"
#: the kernel backends these ops can run on, and each device's
BACKENDS = ("numba", "triton")
DEVICE_BACKENDS = {"cpu": BACKEND, "cuda": "triton"}


def _backend(x: Tensor):
    dev = x.device.type
    be = get_backend(None, device=dev, dtype=x.dtype)
    if be.name not in BACKENDS:
        be = get_backend(DEVICE_BACKENDS.get(dev, BACKEND), device=dev, dtype=x.dtype)
    return be


def _stat_dtype(x: Tensor):
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def channels_last_view(x: Tensor) -> bool:
    """True when an (N, C, *spatial) tensor's memory is the contiguous (N, *spatial, C) array.

    Tensors that are plainly contiguous too (C == 1, or no spatial extent) count as
    channels-first: both readings are the same memory, and channels-first is the default.
    """
    return x.ndim >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


_EMPTY_SHAPE = (0,)


def _or_empty(t: Optional[Tensor], like: Tensor, dtype=None) -> Tensor:
    """``t`` as an op output: an empty tensor when not produced (custom ops cannot return None),
    cast to ``dtype`` when one is given."""
    if t is None:
        return like.new_empty(_EMPTY_SHAPE, dtype=dtype or like.dtype)
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


# --- the method table ------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """One normalization method as the generic ops see it.

    ``forward(be, x, weight, bias, mean, var, arg, eps, cl) -> (y, mean, var, rstd)`` and
    ``backward(be, dy, x, weight, mean, rstd, arg, cl, need_w, need_b) -> (dx, dw, db)`` call
    the backend (None for what a method does not produce); ``x``/``dy`` arrive as the kernel
    should see them (``cl``: the ``(N, *spatial, C)`` view). ``direct_forward`` and
    ``direct_backward`` take the same arguments with ``K`` (the numba_cpu module) for ``be``
    and NumPy arrays for tensors, and call its unchecked entries (the eager CPU path).
    ``stats_shape(x, arg)`` is the shape of the returned mean/rstd; ``channel_pattern`` says
    whether channels-last inputs are kept as they are; ``composite(x, weight, bias, mean, var,
    arg, eps) -> y`` is the differentiable torch equivalent used for second-order gradients.
    """

    name: str
    forward: Callable
    backward: Callable
    direct_forward: Callable
    direct_backward: Callable
    stats_shape: Callable
    composite: Callable
    channel_pattern: bool
    given_stats: bool = False     # mean/var are inputs (inference), not outputs
    returns_mean: bool = True     # the op returns the mean (not: given statistics, RMSNorm)
    returns_var: bool = False     # the op returns the biased variance (for running statistics)


def _bn_train_fwd(be, x, w, b, mean, var, arg, eps, cl):
    return be.batch_norm_forward(x, w, b, eps, channels_last=cl)


def _bn_train_direct(K, x, w, b, mean, var, arg, eps, cl):
    return K.direct_batch_norm_forward(x, cl, w, b, eps)


def _bn_eval_fwd(be, x, w, b, mean, var, arg, eps, cl):
    y, _, _, rstd = be.batch_norm_forward(x, w, b, eps, channels_last=cl, mean=mean, var=var)
    return y, None, None, rstd


def _bn_eval_direct(K, x, w, b, mean, var, arg, eps, cl):
    y, _, _, rstd = K.direct_batch_norm_forward(x, cl, w, b, eps, mean, var)
    return y, None, None, rstd


def _bn_bwd(training):
    def backward(be, dy, x, w, mean, rstd, arg, cl, need_w, need_b):
        return be.batch_norm_backward(dy, x, w, mean, rstd, channels_last=cl, training=training,
                                      need_weight_grad=need_w, need_bias_grad=need_b)
    return backward


def _bn_bwd_direct(training):
    def backward(K, dy, x, w, mean, rstd, arg, cl, need_w, need_b):
        return K.direct_batch_norm_backward(dy, x, cl, w, mean, rstd, training, need_w, need_b)
    return backward


def _in_fwd(be, x, w, b, mean, var, arg, eps, cl):
    return be.instance_norm_forward(x, w, b, eps, channels_last=cl)


def _in_direct(K, x, w, b, mean, var, arg, eps, cl):
    return K.direct_grouped_forward(x, cl, x.shape[-1 if cl else 1], w, b, eps, True)


def _in_bwd(be, dy, x, w, mean, rstd, arg, cl, need_w, need_b):
    return be.instance_norm_backward(dy, x, w, mean, rstd, channels_last=cl,
                                     need_weight_grad=need_w, need_bias_grad=need_b)


def _in_bwd_direct(K, dy, x, w, mean, rstd, arg, cl, need_w, need_b):
    return K.direct_grouped_backward(dy, x, cl, x.shape[-1 if cl else 1], w, mean, rstd, need_w,
                                     need_b)


def _gn_fwd(be, x, w, b, mean, var, arg, eps, cl):
    y, m, r = be.group_norm_forward(x, arg[0], w, b, eps, channels_last=cl)
    return y, m, None, r


def _gn_direct(K, x, w, b, mean, var, arg, eps, cl):
    y, m, _, r = K.direct_grouped_forward(x, cl, arg[0], w, b, eps, False)
    return y, m, None, r


def _gn_bwd(be, dy, x, w, mean, rstd, arg, cl, need_w, need_b):
    return be.group_norm_backward(dy, x, arg[0], w, mean, rstd, channels_last=cl,
                                  need_weight_grad=need_w, need_bias_grad=need_b)


def _gn_bwd_direct(K, dy, x, w, mean, rstd, arg, cl, need_w, need_b):
    return K.direct_grouped_backward(dy, x, cl, arg[0], w, mean, rstd, need_w, need_b)


def _ln_fwd(be, x, w, b, mean, var, arg, eps, cl):
    y, m, r = be.layer_norm_forward(x, tuple(arg), w, b, eps)
    return y, m, None, r


def _row_direct(centered):
    def forward(K, x, w, b, mean, var, arg, eps, cl):
        y, m, r = K.direct_row_forward(x, math.prod(arg), w, b, eps, centered)
        lead = x.shape[:x.ndim - len(arg)]
        return y, m.reshape(lead) if centered else None, None, r.reshape(lead)
    return forward


def _ln_bwd(be, dy, x, w, mean, rstd, arg, cl, need_w, need_b):
    return be.layer_norm_backward(dy, x, tuple(arg), w, mean, rstd, need_weight_grad=need_w,
                                  need_bias_grad=need_b)


def _row_bwd_direct(centered):
    def backward(K, dy, x, w, mean, rstd, arg, cl, need_w, need_b):
        dx, dw, db = K.direct_row_backward(dy, x, math.prod(arg), w, mean, rstd, centered, need_w,
                                           need_b)
        shape = tuple(arg)
        return (dx, None if dw is None else dw.reshape(shape),
                None if db is None else db.reshape(shape))
    return backward


def _rms_fwd(be, x, w, b, mean, var, arg, eps, cl):
    y, r = be.rms_norm_forward(x, tuple(arg), w, eps)
    return y, None, None, r


def _rms_bwd(be, dy, x, w, mean, rstd, arg, cl, need_w, need_b):
    dx, dw = be.rms_norm_backward(dy, x, tuple(arg), w, rstd, need_weight_grad=need_w)
    return dx, dw, None


def _per_channel(x, arg):
    return (x.shape[1],)


def _per_instance(x, arg):
    return (x.shape[0], x.shape[1])


def _per_group(x, arg):
    return (x.shape[0], arg[0])


def _per_row(x, arg):
    return tuple(x.shape[:x.ndim - len(arg)])


METHODS = {m.name: m for m in (
    Method("batch_norm_train", _bn_train_fwd, _bn_bwd(True), _bn_train_direct,
           _bn_bwd_direct(True), _per_channel,
           lambda x, w, b, mean, var, arg, eps: _composite.batch_norm(x, w, b, eps)[0],
           channel_pattern=True, returns_var=True),
    Method("batch_norm_eval", _bn_eval_fwd, _bn_bwd(False), _bn_eval_direct,
           _bn_bwd_direct(False), _per_channel,
           lambda x, w, b, mean, var, arg, eps: _composite.batch_norm(x, w, b, eps, mean, var)[0],
           channel_pattern=True, given_stats=True, returns_mean=False),
    Method("instance_norm", _in_fwd, _in_bwd, _in_direct, _in_bwd_direct, _per_instance,
           lambda x, w, b, mean, var, arg, eps: _composite.instance_norm(x, w, b, eps)[0],
           channel_pattern=True, returns_var=True),
    Method("group_norm", _gn_fwd, _gn_bwd, _gn_direct, _gn_bwd_direct, _per_group,
           lambda x, w, b, mean, var, arg, eps: _composite.group_norm(x, arg[0], w, b, eps),
           channel_pattern=True),
    Method("layer_norm", _ln_fwd, _ln_bwd, _row_direct(True), _row_bwd_direct(True), _per_row,
           lambda x, w, b, mean, var, arg, eps: _composite.layer_norm(x, tuple(arg), w, b, eps),
           channel_pattern=False),
    Method("rms_norm", _rms_fwd, _rms_bwd, _row_direct(False), _row_bwd_direct(False),
           _per_row,
           lambda x, w, b, mean, var, arg, eps: _composite.rms_norm(x, tuple(arg), w, eps),
           channel_pattern=False, returns_mean=False),
)}


# --- the generic mechanism -------------------------------------------------------------------

def _kernel_view(method: Method, x: Tensor):
    """``(view, cl)``: x as the kernel reads it, without a copy when its memory allows."""
    if method.channel_pattern and channels_last_view(x):
        return x.movedim(1, -1), True
    return x.contiguous(), False


def _own_layout(t: Tensor, cl: bool) -> Tensor:
    """A kernel result back in (N, C, *spatial) order; for ``cl`` the (N, *spatial, C) memory
    is reinterpreted with channels-last strides.

    Not ``t.movedim(-1, 1)``: that is a view, and autograd forbids in-place changes of a view
    returned by a custom op (``relu(inplace=True)`` after a norm). A fresh tensor ``set_`` to
    the same storage with the permuted strides is not a view, and nothing is copied.
    """
    if not cl:
        return t
    perm = t.movedim(-1, 1)
    out = t.new_empty(0)
    out.set_(t.untyped_storage(), t.storage_offset(), perm.shape, perm.stride())
    return out


def _output_like(method: Method, x: Tensor) -> Tensor:
    """An uninitialised tensor of x's shape in the memory format the op returns (fake impl)."""
    if method.channel_pattern and channels_last_view(x):
        return x.new_empty(x.movedim(1, -1).shape).movedim(-1, 1)
    return x.new_empty(x.shape)


def _np(t: Optional[Tensor]):
    return None if t is None else t.detach().numpy()


def _tensor(a):
    """A kernel result as a tensor: NumPy arrays wrapped (no copy), tensors and None as they are."""
    return torch.from_numpy(a) if type(a) is np.ndarray else a


def _run_forward(method: Method, x: Tensor, weight, bias, mean, var, arg, eps, be=None, *,
                 op=False):
    """The forward kernel on x as the kernel reads it: ``(y, mean, var, rstd)``. ``be``: the
    backend, when the caller resolved it already.

    ``op``: for the custom op, whose inputs nothing has checked (it can be called as
    ``torch.ops.normlab.*`` directly): the backend's contract functions, which validate, and
    tensors, empty for the statistics a method does not produce. Otherwise (the eager path,
    inputs validated by ``normlab.nn.functional``) the numba backend's unchecked entries run
    on NumPy views, and the statistics are the kernel's NumPy arrays (None where not
    produced): the eager path wraps only those it returns."""
    xk, cl = _kernel_view(method, x)
    be = be or _backend(x)
    if be.name == BACKEND and not op:
        y, m, v, r = method.direct_forward(be.impl, xk.detach().numpy(), _np(weight), _np(bias),
                                           _np(mean), _np(var), arg, eps, cl)
        return _own_layout(torch.from_numpy(y), cl), m, v, r
    y, m, v, r = method.forward(be, xk, weight, bias, mean, var, arg, eps, cl)
    sd = _stat_dtype(x)
    if not op:
        return (_own_layout(y, cl),) + tuple(t if t is None else _or_empty(t, x, sd)
                                             for t in (m, v, r))
    return _own_layout(y, cl), _or_empty(m, x, sd), _or_empty(v, x, sd), _or_empty(r, x, sd)


def _run_backward(method: Method, dy: Tensor, x: Tensor, weight, mean, rstd, arg, need_weight_grad,
                  need_bias_grad, be=None, *, op=False):
    """The backward kernel: ``(dx, dweight, dbias)``, None (``op``: empty) where not asked.
    ``mean``/``rstd``: as ``_run_forward`` returned them (or given statistics: tensors)."""
    xk, cl = _kernel_view(method, x)
    dyk = (dy.movedim(1, -1) if cl else dy).contiguous()
    be = be or _backend(x)
    if be.name == BACKEND and not op:
        if isinstance(mean, Tensor):
            mean = mean.detach().numpy()
        dx, dw, db = method.direct_backward(be.impl, dyk.detach().numpy(), xk.detach().numpy(),
                                            _np(weight), mean, rstd, arg, cl, need_weight_grad,
                                            need_bias_grad)
        return _own_layout(torch.from_numpy(dx), cl), _tensor(dw), _tensor(db)
    dx, dw, db = method.backward(be, dyk, xk, weight, mean, rstd, arg, cl, need_weight_grad,
                                 need_bias_grad)
    if not op:
        return _own_layout(dx, cl), dw, db
    return _own_layout(dx, cl), _or_empty(dw, x), _or_empty(db, x)


def _save(ctx, method: Method, x, weight, bias, mean, var, arg, eps, output):
    """What the custom op's backward needs: the statistics outputs are not differentiable."""
    _, m, v, r = output
    ctx.mark_non_differentiable(m, v, r)
    ctx.set_materialize_grads(False)         # no zero-filled gradients for the statistics
    ctx.save_for_backward(x, weight, bias, mean if method.given_stats else m, var, r)
    ctx.arg, ctx.eps = list(arg), eps


def _input_grads(method: Method, ctx, saved, grad_y, needs, backward):
    """``(dx, dweight, dbias)`` (None where not needed) for both paths; ``saved`` is ``(x,
    weight, bias, mean, var, rstd)`` and ``backward`` the fused backward (the custom op, or
    ``_run_backward`` directly). Under ``create_graph=True`` (grad mode on) the composite is
    differentiated instead, so second order is exact."""
    if grad_y is None:                       # only a statistic was used: nothing flows back
        return None, None, None
    x, weight, bias, mean, var, rstd = saved
    need_x, need_w, need_b = needs
    need_w, need_b = need_w and weight is not None, need_b and bias is not None
    if torch.is_grad_enabled():              # create_graph=True: differentiate the composite
        wanted = [t for t, need in ((x, need_x), (weight, need_w), (bias, need_b)) if need]
        if not wanted:
            return None, None, None
        y = method.composite(x, weight, bias, mean, var, ctx.arg, ctx.eps)
        grads = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True, allow_unused=True))
        return tuple(next(grads) if need else None for need in (need_x, need_w, need_b))
    dx, dw, db = backward(grad_y, x, weight, mean, rstd, ctx.arg, need_w, need_b)
    return dx if need_x else None, dw if need_w else None, db if need_b else None


def _define(method: Method):
    """Register ``normlab::<name>`` and ``normlab::<name>_backward`` with fake and autograd."""
    name = method.name
    tags = (torch.Tag.needs_exact_strides,) if hasattr(torch.Tag, "needs_exact_strides") else ()

    def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Optional[Tensor],
                var: Optional[Tensor], arg: Sequence[int], eps: float
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _run_forward(method, x, weight, bias, mean, var, arg, eps, op=True)

    forward.__name__ = name
    fwd_op = torch.library.custom_op(f"normlab::{name}", forward, mutates_args=(),
                                     device_types=("cpu", "cuda"), tags=tags)

    @fwd_op.register_fake
    def _(x, weight, bias, mean, var, arg, eps):
        stats = method.stats_shape(x, arg)
        sd = _stat_dtype(x)
        m = x.new_empty(stats if method.returns_mean else _EMPTY_SHAPE, dtype=sd)
        v = x.new_empty(stats if method.returns_var else _EMPTY_SHAPE, dtype=sd)
        return _output_like(method, x), m, v, x.new_empty(stats, dtype=sd)

    def backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                 arg: Sequence[int], need_weight_grad: bool, need_bias_grad: bool
                 ) -> tuple[Tensor, Tensor, Tensor]:
        return _run_backward(method, dy, x, weight, mean, rstd, arg, need_weight_grad,
                             need_bias_grad, op=True)

    backward.__name__ = f"{name}_backward"
    bwd_op = torch.library.custom_op(f"normlab::{name}_backward", backward, mutates_args=(),
                                     device_types=("cpu", "cuda"), tags=tags)

    @bwd_op.register_fake
    def _(dy, x, weight, mean, rstd, arg, need_weight_grad, need_bias_grad):
        dx = _output_like(method, x)
        shape = (x.shape[1],) if method.channel_pattern else tuple(arg)   # weight's shape
        dw = x.new_empty(shape if need_weight_grad else _EMPTY_SHAPE)
        db = x.new_empty(shape if need_bias_grad else _EMPTY_SHAPE)
        return dx, dw, db

    def setup_context(ctx, inputs, output):
        _save(ctx, method, *inputs, output)

    def autograd_backward(ctx, grad_y, _grad_mean, _grad_var, _grad_rstd):
        grads = _input_grads(method, ctx, ctx.saved_tensors, grad_y, ctx.needs_input_grad[:3],
                             bwd_op)
        return grads + (None,) * 4             # mean, var (given statistics: constants), arg, eps

    fwd_op.register_autograd(autograd_backward, setup_context=setup_context)
    return fwd_op, bwd_op


class _Eager(torch.autograd.Function):
    """The eager fast path: the same kernels and gradients as the custom ops, without the
    dispatcher's per-call cost (see the module docstring). One subclass per method
    (``EAGER_FUNCTIONS``), so ``grad_fn`` names the method (``normlab_layer_normBackward``).
    Taken where nothing can observe the difference: see ``_eager_ok``.

    Leaner than the op's autograd formula, since each output and saved tensor costs
    microseconds: it returns ``y``, plus ``(mean, var)`` for the methods whose callers update
    running statistics (``returns_var``); the inputs are saved with ``save_for_backward`` (torch
    then detects in-place changes before the backward), the statistics it computed (neither
    inputs nor returned) as attributes."""

    method: Method

    @classmethod
    def forward(cls, ctx, x, weight, bias, mean, var, arg, eps, be):
        method = cls.method
        ctx.be = be                            # resolved once for forward and backward
        y, m, v, r = _run_forward(method, x, weight, bias, mean, var, arg, eps, be)
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.stats, ctx.arg, ctx.eps = (m, r), arg, eps
        if not method.returns_var:
            return y
        m, v = _tensor(m), _tensor(v)
        ctx.mark_non_differentiable(m, v)
        ctx.set_materialize_grads(False)       # no zero-filled gradients for the statistics
        return y, m, v

    @classmethod
    def backward(cls, ctx, grad_y, *_grad_stats):
        method, be = cls.method, ctx.be
        x, weight, bias, mean, var = ctx.saved_tensors
        m, r = ctx.stats

        def fused_backward(*args):
            return _run_backward(method, *args, be=be)

        saved = x, weight, bias, mean if method.given_stats else m, var, r
        grads = _input_grads(method, ctx, saved, grad_y, ctx.needs_input_grad[:3], fused_backward)
        return grads + (None,) * 5             # mean, var, arg, eps, be


EAGER_FUNCTIONS = {name: type(f"normlab_{name}", (_Eager,), {"method": m})
                   for name, m in METHODS.items()}


#: take the eager fast path where it applies (False: always the custom ops, e.g. to compare)
EAGER = True
_PLAIN = (Tensor, torch.nn.Parameter)


def plain_eager() -> bool:
    """Nothing observes the torch operations run now: not ``torch.compile``/``torch.export``
    tracing, no ``TorchDispatchMode`` (fake tensors, ``make_fx``, user modes) and no functorch
    transform. Code may then skip the dispatcher (the eager path here, the running-statistics
    update of ``functional``)."""
    return (not torch.compiler.is_compiling()
            and not _python_dispatch.is_in_torch_dispatch_mode()
            and not torch._C._are_functorch_transforms_active())


def _eager_ok(*tensors) -> bool:
    """The eager path applies in ``plain_eager`` code (dispatch modes see the ``normlab::`` ops)
    and on plain tensors (subclasses get the ops)."""
    if not (EAGER and plain_eager()):
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    return True


OPS = {name: _define(m) for name, m in METHODS.items()}


# --- entry points (called by normlab.nn.functional) ------------------------------------------

def _call(name, x, weight, bias, mean, var, arg, eps, be=None):
    """``(y, mean, var)``: the statistics None (eager) or empty (op) where not produced. ``be``:
    the backend ``normlab.nn.functional`` resolved (eager code), or None."""
    eps = float(eps)
    if not _eager_ok(x, weight, bias, mean, var):
        return OPS[name][0](x, weight, bias, mean, var, arg, eps)[:3]
    if be is None or be is True:     # True: ``_use_fused`` under torch.compile (not reached)
        be = _backend(x)
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        out = EAGER_FUNCTIONS[name].apply(x, weight, bias, mean, var, arg, eps, be)
        return out if METHODS[name].returns_var else (out, None, None)
    y, m, v, _ = _run_forward(METHODS[name], x, weight, bias, mean, var, arg, eps, be)
    return y, _tensor(m), _tensor(v)


def batch_norm_train(x, weight, bias, eps, be=None):
    """``(y, mean, var)``: batch statistics ``(C,)`` (biased variance), for the running update.
    ``be`` (every entry point): the kernel backend, when the caller resolved it."""
    return _call("batch_norm_train", x, weight, bias, None, None, [], eps, be)


def batch_norm_eval(x, weight, bias, mean, var, eps, be=None):
    """``y`` normalized with the given per-channel statistics (BN inference, IN with running stats)."""
    return _call("batch_norm_eval", x, weight, bias, mean, var, [], eps, be)[0]


def instance_norm(x, weight, bias, eps, be=None):
    """``(y, mean, var)``: per-(sample, channel) statistics ``(N, C)``."""
    return _call("instance_norm", x, weight, bias, None, None, [], eps, be)


def group_norm(x, num_groups, weight, bias, eps, be=None):
    return _call("group_norm", x, weight, bias, None, None, [int(num_groups)], eps, be)[0]


def layer_norm(x, normalized_shape, weight, bias, eps, be=None):
    return _call("layer_norm", x, weight, bias, None, None, list(normalized_shape), eps, be)[0]


def rms_norm(x, normalized_shape, weight, eps, be=None):
    return _call("rms_norm", x, weight, None, None, None, list(normalized_shape), eps, be)[0]
