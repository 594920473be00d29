r"""normlab.nn.functional: torch.nn.functional's normalization functions, same signatures.

Each function is one choice of reduced axes plus a statistics policy over the shared normalize
primitive (see ARCHITECTURE.md). Running statistics are updated in place when training, with
torch.nn's rule (``f`` = ``momentum``; the caller passes ``1 / num_batches_tracked`` for a
cumulative average, as torch.nn's modules do)::

    running_mean <- (1 - f) * running_mean + f * mean_B
    running_var  <- (1 - f) * running_var  + f * var_B * M / (M - 1)     # unbiased

Channels-last (``torch.channels_last`` / ``channels_last_3d``) inputs give channels-last outputs.

Which implementation runs: the kernel registry (``normlab.kernels.get_backend``) is asked for
the input's device and dtype. When it picks a fused backend -- ``numba`` (CPU, float32/float64)
or ``triton`` (CUDA, float16/bfloat16/float32/float64) -- with weight and bias of the input's
dtype, the fused custom ops of ``_fused`` run (fused forward and backward kernels,
``torch.compile``-able); otherwise -- other devices, 16-bit dtypes on CPU,
``NORMLAB_BACKEND=numpy`` -- the differentiable torch composite (``_composite``) runs. As
everywhere in normlab, an explicit choice (``NORMLAB_BACKEND``) that cannot run raises
``ValueError``; the automatic choice falls back. Empty inputs always take the composite path.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch.autograd.graph import increment_version

from .. import _checks
from ..kernels import ENV_VAR, get_backend
from . import _composite, _fused, _fused_add

__all__ = ["batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "add_layer_norm",
           "add_rms_norm"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _registry_fused(device_type: str, dtype):
    """The registry's backend for ``device_type`` and ``dtype`` when it is a fused backend
    (``_fused.BACKENDS``), else None; an explicit choice (``NORMLAB_BACKEND``) that cannot run
    raises the registry's error."""
    try:
        be = get_backend(None, device=device_type, dtype=dtype)
    except ValueError:
        if os.environ.get(ENV_VAR, "").strip():   # an explicit choice that cannot run
            raise
        return None         # no kernel backend at all (e.g. bfloat16): the torch composite
    return be if be.name in _fused.BACKENDS else None


@torch.compiler.assume_constant_result
def _registry_picks_fused(device_type: str, dtype_name: str, env: str) -> bool:
    """``_registry_fused`` as a trace-time constant under ``torch.compile`` (dynamo does not
    trace the registry): a compiled model keeps the choice made when it was traced, and
    changing ``NORMLAB_BACKEND`` (``env``, its value) afterwards needs ``torch._dynamo.reset()``
    (or a fresh ``torch.compile``) to take effect."""
    return _registry_fused(device_type, dtype_name) is not None


def _use_fused(input, *params):
    """The fused backend that runs ``input`` (see the module docstring), or None: the torch
    composite runs. In eager code the ``kernels.Backend``, handed on to ``_fused`` (resolved
    once per call); under ``torch.compile`` True (the custom ops resolve it when they run).
    The parameters' devices were checked by ``_check_tensors``: only their dtypes matter here."""
    if input.numel() == 0:
        return None
    dtype = input.dtype
    if torch.compiler.is_compiling():
        be = _registry_picks_fused(input.device.type, str(dtype).replace("torch.", ""),
                                   os.environ.get(ENV_VAR, ""))
    else:
        be = _registry_fused(input.device.type, dtype)
    if not be or dtype not in _KERNEL_DTYPES:
        return None
    for p in params:
        if p is not None and p.dtype != dtype:
            return None
    return be


def _check_input(input, what):
    """input: a floating-point torch.Tensor (no silent conversion of arrays or integers)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(
            f"{what} expects input to be a torch.Tensor, got {type(input).__name__}; convert it "
            f"with torch.as_tensor(x) (or use normlab.layers for NumPy arrays)")
    if not input.is_floating_point():
        raise TypeError(
            f"{what} expects a floating-point input (float16, bfloat16, float32, float64), got "
            f"dtype {input.dtype}; convert it first, e.g. input.float()")


def _check_tensors(input, what, **tensors):
    """Optional per-channel tensors: torch.Tensor, floating point, on the input's device."""
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor or None, got "
                            f"{type(t).__name__}; convert it with torch.as_tensor({name})")
        if not t.is_floating_point():
            raise TypeError(f"{what}: {name} must be a floating-point tensor, got dtype {t.dtype}; "
                            f"convert it, e.g. {name}.to({input.dtype})")
        if t.device != input.device:
            raise ValueError(f"{what}: {name} is on device {t.device} but the input is on "
                             f"{input.device}; move them to one device, e.g. {name}.to(input.device) "
                             f"(or module.to(device) for a module)")


def _check_stat_vectors(C, _input=None, _what="batch_norm", **vectors):
    for name, v in vectors.items():
        if v is not None and tuple(v.shape) != (C,):
            got = ""
            if _input is not None:
                got = f" for an input of shape {tuple(_input.shape)} (C={C} channels on axis 1)"
            raise ValueError(
                f"{_what}: {name} must have shape ({C},) (one value per channel){got}, got shape "
                f"{tuple(v.shape)}; pass an input with {v.shape[0] if v.ndim == 1 else '?'} "
                f"channels, or {name} of shape ({C},)")


@torch.compiler.assume_constant_result
def _context_policy() -> str:
    """The context's or process default non-finite policy.

    Under ``torch.compile`` this is a trace-time constant (dynamo cannot read a ContextVar): a
    compiled model keeps the policy in force when it was traced; ``torch._dynamo.reset()`` (or a
    fresh ``torch.compile``) picks up a new one. A module's ``nonfinite_policy`` attribute and
    the ``nonfinite=`` argument are read as usual.
    """
    return _checks.get_nonfinite_policy()


def _policy(owner, nonfinite) -> str:
    """nonfinite= of the call, then ``owner.nonfinite_policy``, then the context/default."""
    if nonfinite is not None:
        return nonfinite
    attr = None if owner is None else getattr(owner, "nonfinite_policy", None)
    if attr is not None:
        return _checks.check_nonfinite_policy(attr, name=f"{type(owner).__name__}.nonfinite_policy")
    return _context_policy()


_HOST_DTYPES = (torch.float32, torch.float64)


def _fold_on_host(running_mean, running_var, mean, var, count, f, policy, num_batches_tracked,
                  owner) -> bool:
    """``_update_running`` for the common eager case -- CPU plain tensors of one dtype, float32
    or float64, nothing requiring grad -- in one numba call on NumPy views of the same memory
    (``kernels._numba_kernels.fold_running``: the same formula and rounding as the torch path
    below, ``running * (1 - f) + f * batch`` in that dtype, equal to rounding since torch's
    ``add_(alpha=)`` may fuse the multiply-add); the version counters of the updated tensors are
    bumped as an in-place torch operation would. Returns False (nothing done) when the case is
    not that one.

    Why not torch operations: a dozen of them on C values cost more than the normalization of a
    small batch (measured: 60 of 174 us of a BatchNorm2d forward on 32x64x8x8), and right after
    a kernel has streamed a large batch through the caches every Python-level operation is slow:
    on the 2-core development machine this update measured 30 us with warm caches and 361 us
    after a 64 MiB copy as a chain of NumPy operations, 8.5 and 186 us as one numba call.
    """
    dt = mean.dtype
    if dt not in _HOST_DTYPES or var.dtype != dt:
        return False
    for t in (running_mean, running_var):
        if t is not None and (type(t) is not torch.Tensor or t.dtype != dt or not t.is_cpu
                              or t.requires_grad):
            return False
    for t in (mean, var, num_batches_tracked):
        if t is not None and (type(t) is not torch.Tensor or not t.is_cpu or t.requires_grad):
            return False
    if num_batches_tracked is not None and num_batches_tracked.dtype != torch.int64:
        return False
    if not _fused.plain_eager():
        return False
    if not _FOLD:                                 # numba is imported on first use only
        from ..kernels._numba_kernels import fold_running
        _FOLD.append(fold_running)
    fold_running = _FOLD[0]
    none = _NO_STATS[dt]
    corr = count / max(count - 1, 1)             # biased -> unbiased variance
    nbt = _NO_COUNT if num_batches_tracked is None else num_batches_tracked.numpy().reshape(1)
    ok = fold_running(none if running_mean is None else running_mean.numpy(),
                      none if running_var is None else running_var.numpy(),
                      mean.numpy(), var.numpy(), corr, f, policy != "propagate", nbt)
    if not ok:
        bad = ~(np.isfinite(mean.numpy()) & np.isfinite(var.numpy() * corr))
        _checks.nonfinite_found(owner, policy, np.flatnonzero(bad).tolist())
        return True
    increment_version([t for t in (running_mean, running_var, num_batches_tracked) if t is not None])
    return True


_FOLD: list = []             # [kernels._numba_kernels.fold_running] once imported
_NO_COUNT = np.empty(0, np.int64)
_NO_STATS = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}


def _update_running(running_mean, running_var, mean, var, count, momentum, *,
                    num_batches_tracked=None, owner=None, nonfinite=None):
    """Fold the batch statistics ``mean``/``var`` (C,) into the running statistics, in place.

    ``momentum=None`` is the cumulative average ``f = 1 / (t + 1)`` with ``t`` the
    ``num_batches_tracked`` before this batch. ``num_batches_tracked`` (when given) is
    incremented exactly when the batch is folded in.

    The non-finite policy (``normlab.nonfinite_policy``; ``nonfinite`` overrides it, then the
    ``owner`` module's ``nonfinite_policy`` attribute): unless it is "propagate", a batch whose
    mean or unbiased variance is not finite in some channel leaves the running statistics and
    ``num_batches_tracked`` unchanged ("skip": NonFiniteWarning naming ``owner``; "raise":
    NonFiniteError). The check reads only the C statistics, never the batch. Under
    ``torch.compile`` the skip is done without a branch (``torch.where``), and no warning or
    error can be issued from the compiled graph.
    """
    policy = _policy(owner, nonfinite)
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        f = 1.0 / (float(num_batches_tracked) + 1.0)
    else:
        f = float(momentum)
    if _fold_on_host(running_mean, running_var, mean, var, count, f, policy, num_batches_tracked,
                     owner):
        return
    with torch.no_grad():          # here only: entering it costs more than the host update
        _update_running_torch(running_mean, running_var, mean, var, count, f, policy,
                              num_batches_tracked, owner)


def _update_running_torch(running_mean, running_var, mean, var, count, f, policy,
                          num_batches_tracked, owner):
    """``_update_running`` as torch operations (under ``torch.no_grad``): any device and dtype,
    and what dispatch modes and ``torch.compile`` must see."""
    unbiased = var * (count / max(count - 1, 1))
    if policy != "propagate" and torch.compiler.is_compiling():
        ok = torch.isfinite(mean).all() & torch.isfinite(unbiased).all()
        if running_mean is not None:
            new = running_mean * (1.0 - f) + mean.to(running_mean.dtype) * f
            running_mean.copy_(torch.where(ok, new, running_mean))
        if running_var is not None:
            new = running_var * (1.0 - f) + unbiased.to(running_var.dtype) * f
            running_var.copy_(torch.where(ok, new, running_var))
        if num_batches_tracked is not None:
            num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))
        return
    if policy != "propagate":
        bad = ~(torch.isfinite(mean) & torch.isfinite(unbiased))
        if bool(bad.any()):
            _checks.nonfinite_found(owner, policy, bad.nonzero().flatten().tolist())
            return
    if running_mean is not None:
        running_mean.mul_(1.0 - f).add_(mean.to(running_mean.dtype), alpha=f)
    if running_var is not None:
        running_var.mul_(1.0 - f).add_(unbiased.to(running_var.dtype), alpha=f)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)


def _normalize_given(input, running_mean, running_var, weight, bias, eps):
    """Normalize every channel with the given statistics (BN inference, IN with running stats)."""
    be = _use_fused(input, weight, bias, running_mean, running_var)
    if be:
        return _fused.batch_norm_eval(input, weight, bias, running_mean, running_var, eps, be)
    y, _, _ = _composite.batch_norm(input, weight, bias, eps, running_mean, running_var)
    return y


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, nonfinite=None):
    """Batch norm over (N, *spatial) per channel of an (N, C, *spatial) tensor.

    Training (or no running statistics): batch statistics, and the running ones updated in
    place. Otherwise the running statistics normalize. ``nonfinite`` ("skip", "propagate",
    "raise" or None for ``normlab.get_nonfinite_policy()``) decides what a training batch with
    non-finite statistics does to the running statistics (docs/reliability.md).
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       nonfinite=nonfinite)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, *,
                nonfinite=None, owner=None, num_batches_tracked=None, check_momentum=True):
    """batch_norm, plus what the modules need: ``owner`` (named in warnings, its
    ``nonfinite_policy`` consulted) and ``num_batches_tracked`` (incremented when the batch is
    folded into the running statistics; ``momentum=None`` then means the cumulative average)."""
    _check_input(input, "batch_norm")
    _checks.check_min_ndim(input, 2, "batch_norm", "(N, C, *spatial)")
    _checks.check_eps(eps)
    _check_tensors(input, "batch_norm", weight=weight, bias=bias, running_mean=running_mean,
                   running_var=running_var)
    if check_momentum and num_batches_tracked is None and momentum is not None:
        _checks.check_momentum(momentum)
    _checks.check_nonfinite_policy(nonfinite, allow_none=True)
    C = input.shape[1]
    _check_stat_vectors(C, input, "batch_norm", weight=weight, bias=bias, running_mean=running_mean,
                        running_var=running_var)
    use_batch_stats = training or running_mean is None or running_var is None
    if not use_batch_stats:
        return _normalize_given(input, running_mean, running_var, weight, bias, eps)
    count = input.numel() // C if C else 0
    if count == 0:  # an empty batch: empty output, running statistics left as they are
        return input.clone()
    _checks.check_values_per_channel(count, input.shape, "batch_norm")   # batch statistics
    be = _use_fused(input, weight, bias)
    if be:
        y, mean, var = _fused.batch_norm_train(input, weight, bias, eps, be)
    else:
        y, mean, var = _composite.batch_norm(input, weight, bias, eps)
    tracked = running_mean is not None or running_var is not None
    if training and tracked and (momentum is not None or num_batches_tracked is not None):
        _update_running(running_mean, running_var, mean.detach(), var.detach(), count, momentum,
                        num_batches_tracked=num_batches_tracked, owner=owner, nonfinite=nonfinite)
    return y


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, nonfinite=None):
    """Instance norm: each (sample, channel) over its spatial values.

    With ``use_input_stats`` the running statistics (if given) are updated with the batch
    average of the per-instance statistics; otherwise they normalize every instance.
    ``nonfinite``: as in :func:`batch_norm` (checked on the batch-averaged statistics).
    """
    return _instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                          momentum, eps, nonfinite=nonfinite)


def _instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum,
                   eps, *, nonfinite=None, owner=None):
    _check_input(input, "instance_norm")
    _checks.check_min_ndim(input, 3, "instance_norm", "(N, C, *spatial) with at least one spatial dim")
    _checks.check_eps(eps)
    _check_tensors(input, "instance_norm", weight=weight, bias=bias, running_mean=running_mean,
                   running_var=running_var)
    if momentum is not None:
        _checks.check_momentum(momentum)
    _checks.check_nonfinite_policy(nonfinite, allow_none=True)
    N, C = input.shape[:2]
    _check_stat_vectors(C, input, "instance_norm", weight=weight, bias=bias,
                        running_mean=running_mean, running_var=running_var)
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError(
                "instance_norm with use_input_stats=False needs running_mean and running_var "
                f"(got running_mean={'None' if running_mean is None else 'a tensor'}, running_var="
                f"{'None' if running_var is None else 'a tensor'}); pass both, or use_input_stats=True")
        return _normalize_given(input, running_mean, running_var, weight, bias, eps)
    spatial = math.prod(input.shape[2:])
    if spatial <= 1 and input.numel() > 0:
        raise ValueError(
            f"instance_norm needs more than 1 spatial element per channel, got an input of shape "
            f"{tuple(input.shape)}; InstanceNorm of a single value is always 0")
    if input.numel() == 0:  # torch would write NaN into the running statistics here; we do not
        return input.clone()
    be = _use_fused(input, weight, bias)
    if be:
        y, mean, var = _fused.instance_norm(input, weight, bias, eps, be)
    else:
        y, mean, var = _composite.instance_norm(input, weight, bias, eps)
    if momentum is not None and (running_mean is not None or running_var is not None):
        _update_running(running_mean, running_var, mean.detach().mean(0), var.detach().mean(0),
                        spatial, momentum, owner=owner, nonfinite=nonfinite)
    return y


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer norm over the trailing ``normalized_shape`` dims (per-element affine)."""
    _check_input(input, "layer_norm")
    shape = _checks.normalized_shape_tuple(normalized_shape)
    _checks.check_eps(eps)
    _check_tensors(input, "layer_norm", weight=weight, bias=bias)
    _checks.check_normalized_shape(input, shape, "layer_norm")
    _checks.check_param_shape(weight, shape, "weight")
    _checks.check_param_shape(bias, shape, "bias")
    if input.numel() == 0:
        return input.clone()
    be = _use_fused(input, weight, bias)
    if be:
        return _fused.layer_norm(input, shape, weight, bias, eps, be)
    return _composite.layer_norm(input, shape, weight, bias, eps)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """Group norm: each (sample, group of C/G channels) over its channels and spatial values."""
    _check_input(input, "group_norm")
    _checks.check_min_ndim(input, 2, "group_norm", "(N, C, *spatial)")
    _checks.check_eps(eps)
    _check_tensors(input, "group_norm", weight=weight, bias=bias)
    N, C = input.shape[:2]
    _checks.check_groups(num_groups, C)
    _check_stat_vectors(C, input, "group_norm", weight=weight, bias=bias)
    if input.numel() == 0:
        return input.clone()
    be = _use_fused(input, weight, bias)
    if be:
        return _fused.group_norm(input, num_groups, weight, bias, eps, be)
    return _composite.group_norm(input, num_groups, weight, bias, eps)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """RMS norm over the trailing ``normalized_shape`` dims; ``eps=None`` is finfo(dtype).eps (float32's for 16-bit input, as torch)."""
    _check_input(input, "rms_norm")
    shape = _checks.normalized_shape_tuple(normalized_shape)
    _check_tensors(input, "rms_norm", weight=weight)
    if eps is None:
        eps = torch.finfo(input.dtype if input.element_size() >= 4 else torch.float32).eps
    _checks.check_eps(eps)
    _checks.check_normalized_shape(input, shape, "rms_norm")
    _checks.check_param_shape(weight, shape, "weight")
    if input.numel() == 0:
        return input.clone()
    be = _use_fused(input, weight)
    if be:
        return _fused.rms_norm(input, shape, weight, eps, be)
    return _composite.rms_norm(input, shape, weight, eps)


@torch.compiler.assume_constant_result
def _registry_picks_triton(device_type: str, dtype_name: str, env: str) -> bool:
    """Whether the registry resolves to the triton backend (a trace-time constant under
    torch.compile, as ``_registry_picks_fused``)."""
    try:
        return get_backend(None, device=device_type, dtype=dtype_name).name == _fused_add.BACKEND
    except ValueError:
        if env.strip():
            raise
        return False


def _use_fused_add(input, residual, *params) -> bool:
    """The fused residual-add ops apply where the registry picks the triton backend."""
    if input.numel() == 0 or residual.dtype != input.dtype:
        return False
    dtype_name = str(input.dtype).replace("torch.", "")
    if not _registry_picks_triton(input.device.type, dtype_name, os.environ.get(ENV_VAR, "")):
        return False
    return all(p is None or (p.dtype == input.dtype and p.device == input.device) for p in params)


def _check_residual(input, residual, what):
    _check_input(residual, what)
    if tuple(residual.shape) != tuple(input.shape):
        raise ValueError(f"{what}: residual must have the input's shape {tuple(input.shape)}, got "
                         f"{tuple(residual.shape)}; pass the residual stream of the same tokens")


def add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``s = input + residual; (layer_norm(s), s)``: the pre-norm transformer residual step, fused
    into one kernel on the Triton backend (an add and ``layer_norm`` elsewhere)."""
    _check_input(input, "add_layer_norm")
    _check_residual(input, residual, "add_layer_norm")
    shape = _checks.normalized_shape_tuple(normalized_shape)
    _checks.check_eps(eps)
    _check_tensors(input, "add_layer_norm", weight=weight, bias=bias, residual=residual)
    _checks.check_normalized_shape(input, shape, "add_layer_norm")
    _checks.check_param_shape(weight, shape, "weight")
    _checks.check_param_shape(bias, shape, "bias")
    if _use_fused_add(input, residual, weight, bias):
        y, s, _, _ = _fused_add.add_norm(input, residual, weight, bias, list(shape), float(eps), True)
        return y, s
    s = input + residual
    return layer_norm(s, shape, weight, bias, eps), s


def add_rms_norm(input, residual, normalized_shape, weight=None, eps=None):
    """``s = input + residual; (rms_norm(s), s)``, fused on the Triton backend (see add_layer_norm)."""
    _check_input(input, "add_rms_norm")
    _check_residual(input, residual, "add_rms_norm")
    shape = _checks.normalized_shape_tuple(normalized_shape)
    _check_tensors(input, "add_rms_norm", weight=weight, residual=residual)
    if eps is None:
        eps = torch.finfo(input.dtype if input.element_size() >= 4 else torch.float32).eps
    _checks.check_eps(eps)
    _checks.check_normalized_shape(input, shape, "add_rms_norm")
    _checks.check_param_shape(weight, shape, "weight")
    if _use_fused_add(input, residual, weight):
        y, s, _, _ = _fused_add.add_norm(input, residual, weight, None, list(shape), float(eps), False)
        return y, s
    s = input + residual
    return rms_norm(s, shape, weight, eps), s
