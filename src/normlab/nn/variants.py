r"""Batch-norm variants for small, large and fixed batches, on normlab.nn.functional.

* :class:`BatchRenorm1d/2d/3d` — Batch Renormalization (Ioffe, 2017): batch statistics corrected
  towards the running ones, so that training and inference compute the same function.
* :class:`GhostBatchNorm1d/2d/3d` — Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017):
  batch norm inside virtual sub-batches of a large batch.
* :class:`FrozenBatchNorm` and ``1d/2d/3d`` — batch norm with fixed statistics and affine
  parameters, all buffers (as detectron2/torchvision's FrozenBatchNorm2d).

BatchRenorm and GhostBatchNorm subclass ``torch.nn.modules.batchnorm._BatchNorm``: they hold
exactly batch norm's state (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``), so a BatchNorm checkpoint loads into them and back, and in inference
they *are* batch norm with the running statistics. They are not subclasses of
``torch.nn.BatchNorm2d``: code that converts "every BatchNorm2d" (e.g.
``torch.nn.SyncBatchNorm.convert_sync_batchnorm``) does not silently drop their training rule.
Every forward runs :func:`normlab.nn.functional.batch_norm`, so they use its fused kernels.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _checks
from ..reference.ghost_batch_norm import virtual_batch_slices
from . import functional as F
from .modules import _batch_moments, _Checkpoint

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
           "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
           "FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]

_LAYOUTS = {1: ((2, 3), "(N, C) or (N, C, L)"), 2: ((4,), "(N, C, H, W)"), 3: ((5,), "(N, C, D, H, W)"),
            None: (None, "(N, C, *spatial)")}


def _check_input(module, input):
    allowed, layout = _LAYOUTS[module._dim]
    if allowed is None:
        _checks.check_min_ndim(input, 2, type(module).__name__, layout)
    else:
        _checks.check_ndim_in(input, allowed, type(module).__name__, layout)
    if input.shape[1] != module.num_features:
        raise ValueError(
            f"{type(module).__name__} was built for num_features={module.num_features} but the "
            f"input of shape {tuple(input.shape)} has {input.shape[1]} channels on axis 1")


def _check_steps(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 (a number of training steps), got {name}={value!r}")
    return value


def _check_limit(value, name, low, what):
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float, got {name}={value!r} of type {type(value).__name__}")
    if not (math.isfinite(float(value)) and float(value) >= low):
        raise ValueError(f"{name} must be a finite number >= {low:g} ({what}), got {name}={value!r}; "
                         f"r_max=1, d_max=0 is plain batch norm")
    return float(value)


# ----------------------------------------------------------------------------- Batch Renorm


class _BatchRenorm(_Checkpoint, _BatchNorm):
    r"""Batch Renormalization (Ioffe, 2017, "Batch Renormalization: Towards Reducing Minibatch
    Dependence in Batch-Normalized Models", NeurIPS).

    Training, per channel c, with the batch mean ``mean_B`` and biased variance ``var_B`` over
    the ``M = N * prod(spatial)`` values of the channel and the running statistics before this
    step's update::

        sigma_B = sqrt(var_B + eps),   sigma_R = sqrt(running_var_c + eps)
        r = clip(sigma_B / sigma_R, 1/r_max_t, r_max_t)                 no gradient
        d = clip((mean_B - running_mean_c) / sigma_R, -d_max_t, d_max_t) no gradient
        y = ((x - mean_B) / sigma_B * r + d) * weight_c + bias_c

    computed as batch norm with the effective affine ``weight_c * r`` and
    ``bias_c + weight_c * d`` (r, d detached), which gives exactly the paper's gradients:
    ``dx`` is batch norm's backward of ``dy * weight_c * r``, ``dweight_c = sum(dy * xhat)`` with
    ``xhat = xhat_B * r + d``, ``dbias_c = sum(dy)``. Then the running statistics are updated by
    torch.nn's rule (``momentum``, or the cumulative average for ``momentum=None``; unbiased
    running variance). Inference: ``y = (x - running_mean) / sigma_R * weight + bias``, batch
    norm with running statistics. Reference: ``normlab.reference.batch_renorm_forward``.

    The paper's schedule: r_max = 1, d_max = 0 (plain batch norm) while the running statistics
    are unreliable, then relaxed gradually. With ``t = num_batches_tracked`` (training steps
    already taken; saved in the state_dict, so a resumed run continues the schedule)::

        u_r = clip((t - warmup_steps) / ramp_r, 0, 1)      (1 if ramp_r == 0 and t >= warmup_steps)
        r_max_t = 1 + (r_max - 1) * u_r,   d_max_t = d_max * u_d   (u_d likewise with ramp_d)

    The paper (Sec. 4.1) used ``warmup_steps=5000, ramp_steps=(35000, 20000)``: r_max reaches 3
    at step 40k and d_max reaches 5 at step 25k. The defaults (0, 0) use r_max, d_max from
    the first step.

    Args:
        num_features: C.
        eps, momentum, affine, device, dtype: as ``torch.nn.BatchNorm2d`` (running statistics
            are always tracked: batch renorm needs them in training).
        r_max: >= 1, the final bound of the scale correction r.
        d_max: >= 0, the final bound of the shift correction d.
        warmup_steps: training steps with r_max = 1, d_max = 0.
        ramp_steps: steps of the linear relaxation after the warm-up, an int for both or a pair
            ``(r_ramp, d_ramp)``.
    """

    _dim = None
    nonfinite_policy = None     # see docs/reliability.md

    def __init__(self, num_features, eps=1e-5, momentum=0.1, r_max=3.0, d_max=5.0, warmup_steps=0,
                 affine=True, device=None, dtype=None, *, ramp_steps=0):
        _checks.check_positive_int(num_features, "num_features")
        _checks.check_eps(eps)
        _checks.check_momentum(momentum)
        self.r_max = _check_limit(r_max, "r_max", 1.0, "r is clipped to [1/r_max, r_max]")
        self.d_max = _check_limit(d_max, "d_max", 0.0, "d is clipped to [-d_max, d_max]")
        self.warmup_steps = _check_steps(warmup_steps, "warmup_steps")
        ramps = ramp_steps if isinstance(ramp_steps, (tuple, list)) else (ramp_steps, ramp_steps)
        if len(ramps) != 2:
            raise ValueError(f"ramp_steps must be an int or a pair (r_ramp, d_ramp), got ramp_steps={ramp_steps!r}")
        self.ramp_steps = (_check_steps(ramps[0], "ramp_steps"), _check_steps(ramps[1], "ramp_steps"))
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)

    def extra_repr(self):
        return (super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_steps={self.warmup_steps}, ramp_steps={self.ramp_steps}")

    def _check_input_dim(self, input):
        _check_input(self, input)

    def _progress(self, ramp):
        t = int(self.num_batches_tracked)
        if t < self.warmup_steps:
            return 0.0
        return 1.0 if ramp == 0 else min((t - self.warmup_steps) / ramp, 1.0)

    @property
    def current_r_max(self) -> float:
        """r_max for the next training step under the schedule."""
        return 1.0 + (self.r_max - 1.0) * self._progress(self.ramp_steps[0])

    @property
    def current_d_max(self) -> float:
        """d_max for the next training step under the schedule."""
        return self.d_max * self._progress(self.ramp_steps[1])

    def forward(self, input):
        self._check_input_dim(input)
        if not self.training:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        r_max, d_max = self.current_r_max, self.current_d_max
        C = self.num_features
        dims = [0] + list(range(2, input.ndim))
        _checks.check_values_per_channel(input.numel() // C, input.shape, type(self).__name__)
        with torch.no_grad():
            var_b, mean_b = _batch_moments(input, dims)                               # (C,)
            rv = self.running_var.to(var_b.dtype)
            rm = self.running_mean.to(var_b.dtype)
            sigma_r = torch.sqrt(rv + self.eps)
            r = torch.clamp(torch.sqrt(var_b + self.eps) / sigma_r, 1.0 / r_max, r_max)
            d = torch.clamp((mean_b - rm) / sigma_r, -d_max, d_max)
        pdtype = self.weight.dtype if self.weight is not None else torch.promote_types(input.dtype, torch.float32)
        r, d = r.to(pdtype), d.to(pdtype)
        weight = r if self.weight is None else self.weight * r
        bias = d if self.weight is None else self.weight * d
        if self.bias is not None:
            bias = bias + self.bias
        # num_batches_tracked (and so the r/d schedule) advances only when the batch is folded
        # into the running statistics (the non-finite policy may skip it)
        return F._batch_norm(input, self.running_mean, self.running_var, weight, bias, True,
                             self.momentum, self.eps, owner=self,
                             num_batches_tracked=self.num_batches_tracked)


class BatchRenorm1d(_BatchRenorm):
    __doc__ = _BatchRenorm.__doc__ + "\n    Input: (N, C) or (N, C, L).\n"
    _dim = 1


class BatchRenorm2d(_BatchRenorm):
    __doc__ = _BatchRenorm.__doc__ + "\n    Input: (N, C, H, W).\n"
    _dim = 2


class BatchRenorm3d(_BatchRenorm):
    __doc__ = _BatchRenorm.__doc__ + "\n    Input: (N, C, D, H, W).\n"
    _dim = 3


# ----------------------------------------------------------------------------- Ghost BN


class _GhostBatchNorm(_Checkpoint, _BatchNorm):
    r"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017, "Train longer, generalize
    better: closing the generalization gap in large batch training of neural networks",
    NeurIPS, Algorithm 1).

    Training: the batch is cut along the sample axis into virtual batches ``X^l`` of
    ``virtual_batch_size`` samples, and each is batch-normalized with its own statistics::

        y^l = weight_c * (X^l - mean_l) / sqrt(var_l + eps) + bias_c      (biased var_l)

    A remainder of ``N mod virtual_batch_size`` samples joins the last full virtual batch, so no
    virtual batch is smaller than ``virtual_batch_size`` (a lone sample would have zero
    variance); with ``N <= virtual_batch_size`` this is exactly batch norm.

    Running statistics: one update per step with the mean and unbiased variance of the whole
    batch (= the count-weighted merge of the virtual batches' statistics), by torch.nn's rule
    (``momentum``, or the cumulative average for ``momentum=None``). The paper's Algorithm 1
    instead applies the EMA once per virtual batch; merging keeps batch norm's time constant
    for ``momentum`` and estimates the population statistics used in inference, which is
    batch norm with the running statistics. ``track_running_stats=False`` normalizes with
    (virtual) batch statistics in inference too. Reference:
    ``normlab.reference.ghost_batch_norm_forward``.

    Args:
        num_features: C.
        virtual_batch_size: samples per virtual batch (> 0).
        eps, momentum, affine, track_running_stats, device, dtype: as ``torch.nn.BatchNorm2d``.
    """

    _dim = None
    nonfinite_policy = None     # see docs/reliability.md

    def __init__(self, num_features, virtual_batch_size=32, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        _checks.check_positive_int(num_features, "num_features")
        self.virtual_batch_size = _checks.check_positive_int(virtual_batch_size, "virtual_batch_size")
        _checks.check_eps(eps)
        _checks.check_momentum(momentum)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)

    def extra_repr(self):
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def _check_input_dim(self, input):
        _check_input(self, input)

    def forward(self, input):
        self._check_input_dim(input)
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        N, C = input.shape[:2]
        if N == 0:
            return input.clone()
        slices = virtual_batch_slices(N, self.virtual_batch_size)
        for s in slices:
            _checks.check_values_per_channel(input[s].numel() // C, input[s].shape,
                                             f"{type(self).__name__} (a virtual batch)")
        parts = [F.batch_norm(input[s], None, None, self.weight, self.bias, True, 0.0, self.eps)
                 for s in slices]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if self.training and self.track_running_stats:
            dims = [0] + list(range(2, input.ndim))
            with torch.no_grad():
                var_b, mean_b = _batch_moments(input, dims)
            F._update_running(self.running_mean, self.running_var, mean_b, var_b,
                              input.numel() // C, self.momentum, owner=self,
                              num_batches_tracked=self.num_batches_tracked)
        return y


class GhostBatchNorm1d(_GhostBatchNorm):
    __doc__ = _GhostBatchNorm.__doc__ + "\n    Input: (N, C) or (N, C, L).\n"
    _dim = 1


class GhostBatchNorm2d(_GhostBatchNorm):
    __doc__ = _GhostBatchNorm.__doc__ + "\n    Input: (N, C, H, W).\n"
    _dim = 2


class GhostBatchNorm3d(_GhostBatchNorm):
    __doc__ = _GhostBatchNorm.__doc__ + "\n    Input: (N, C, D, H, W).\n"
    _dim = 3


# ----------------------------------------------------------------------------- Frozen BN


class FrozenBatchNorm(_Checkpoint, nn.Module):
    r"""Batch norm with fixed statistics and affine parameters, for any ``(N, C, *spatial)``.

    ``weight``, ``bias``, ``running_mean``, ``running_var`` are buffers, not parameters: an
    optimizer never sees them and ``train()``/``eval()`` change nothing. Always::

        y = (x - running_mean_c) / sqrt(running_var_c + eps) * weight_c + bias_c

    which is a per-channel affine map ``y = x * scale_c + shift_c`` (the gradient flows to x
    only: ``dx = dy * scale_c``). It loads a BatchNorm state_dict (``num_batches_tracked`` is
    ignored) and behaves exactly like that BatchNorm in eval mode. Used to fine-tune
    detection/segmentation backbones whose batches are too small for batch statistics
    (detectron2, torchvision). :class:`FrozenBatchNorm1d/2d/3d` also check the input's rank.
    """

    _dim = None

    def __init__(self, num_features, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.num_features = _checks.check_positive_int(num_features, "num_features")
        _checks.check_eps(eps)
        self.eps = float(eps)
        kw = dict(device=device, dtype=dtype)
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input):
        _check_input(self, input)
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> "FrozenBatchNorm":
        """A frozen copy of a batch-norm module's inference behaviour (same device and dtype)."""
        if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            raise ValueError(
                f"cannot freeze {type(bn).__name__}: it has no running statistics "
                f"(track_running_stats=False), so its inference output depends on the batch; "
                f"build it with track_running_stats=True and train or recalibrate it first")
        rm = bn.running_mean
        out = cls(bn.num_features, bn.eps, device=rm.device, dtype=rm.dtype)
        with torch.no_grad():
            out.running_mean.copy_(rm)
            out.running_var.copy_(bn.running_var)
            if getattr(bn, "weight", None) is not None:
                out.weight.copy_(bn.weight)
            if getattr(bn, "bias", None) is not None:
                out.bias.copy_(bn.bias)
        return out


class FrozenBatchNorm1d(FrozenBatchNorm):
    __doc__ = FrozenBatchNorm.__doc__ + "\n    Input: (N, C) or (N, C, L).\n"
    _dim = 1


class FrozenBatchNorm2d(FrozenBatchNorm):
    __doc__ = FrozenBatchNorm.__doc__ + "\n    Input: (N, C, H, W).\n"
    _dim = 2


class FrozenBatchNorm3d(FrozenBatchNorm):
    __doc__ = FrozenBatchNorm.__doc__ + "\n    Input: (N, C, D, H, W).\n"
    _dim = 3
