r"""Drop-in modules: torch.nn's normalization layers running on normlab.nn.functional.

Each class subclasses its torch.nn twin, so constructor signature, attributes, ``extra_repr``,
``reset_parameters``/``reset_running_stats``, state_dict keys and versioned checkpoint loading
(old checkpoints without ``num_batches_tracked``) are torch.nn's own, and ``isinstance(m,
torch.nn.BatchNorm2d)`` stays true for code that inspects models. Only ``forward`` differs: it
runs normlab's functional API (fused kernels where a backend applies).

Running statistics (BatchNorm, and InstanceNorm with ``track_running_stats=True``), with
``f = momentum``, or ``f = 1 / num_batches_tracked`` when ``momentum is None``::

    running_mean <- (1 - f) * running_mean + f * mean_B
    running_var  <- (1 - f) * running_var  + f * var_B * M / (M - 1)
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .. import _checks
from . import functional as F


def _checked_init(torch_cls, what_dims=None):
    """An ``__init__`` that validates torch_cls's constructor arguments, then runs it.

    torch.nn accepts eps <= 0, momentum outside [0, 1] and fails late (or not at all); these
    twins refuse them at construction with a message that names the value and the fix. The
    class keeps torch_cls's signature (``__signature__``) for ``inspect`` and IDEs.
    """
    sig = inspect.signature(torch_cls)

    def __init__(self, *args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self).__name__}{sig}: {e}") from None
        bound.apply_defaults()
        a = bound.arguments
        if "num_features" in a:
            _checks.check_positive_int(a["num_features"], "num_features")
        if "num_channels" in a:
            _checks.check_positive_int(a["num_channels"], "num_channels")
            _checks.check_groups(a["num_groups"], a["num_channels"])
        if "normalized_shape" in a:
            _checks.normalized_shape_tuple(a["normalized_shape"])
        if "eps" in a:
            _checks.check_eps(a["eps"], allow_none=torch_cls is nn.RMSNorm)
        if "momentum" in a:
            _checks.check_momentum(a["momentum"])
        torch_cls.__init__(self, *args, **kwargs)

    return __init__, sig


def _twin(torch_cls):
    """Class decorator: constructor checks and torch_cls's signature."""
    def decorate(cls):
        cls.__init__, cls.__signature__ = _checked_init(torch_cls)
        return cls
    return decorate


_DIMS = {"BatchNorm1d": ((2, 3), "(N, C) or (N, C, L)"), "BatchNorm2d": ((4,), "(N, C, H, W)"),
         "BatchNorm3d": ((5,), "(N, C, D, H, W)"), "InstanceNorm1d": ((2, 3), "(C, L) or (N, C, L)"),
         "InstanceNorm2d": ((3, 4), "(C, H, W) or (N, C, H, W)"),
         "InstanceNorm3d": ((4, 5), "(C, D, H, W) or (N, C, D, H, W)")}


def _check_dims(module, input):
    """Rank and channel count, with the layout expected and the fix (torch.nn's message is
    'expected 4D input (got 2D input)')."""
    name = type(module).__name__
    base = next(c.__name__ for c in type(module).__mro__ if c.__name__ in _DIMS)
    allowed, layout = _DIMS[base]
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(input).__name__}; convert it "
                        f"with torch.as_tensor(x)")
    _checks.check_ndim_in(input, allowed, name, layout)
    unbatched = base.startswith("Instance") and input.dim() == allowed[0]
    axis = 0 if unbatched else 1
    # torch.nn.InstanceNorm without affine or running statistics accepts any channel count
    strict = not base.startswith("Instance") or module.affine or module.track_running_stats
    if strict and input.shape[axis] != module.num_features:
        raise ValueError(
            f"{name} was built for num_features={module.num_features} but the input of shape "
            f"{tuple(input.shape)} has {input.shape[axis]} channels on axis {axis}; pass an input "
            f"with {module.num_features} channels, or build {name}({input.shape[axis]})")

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm"]


class _BatchNormForward:
    """forward() shared by BatchNorm1d/2d/3d: torch.nn's _BatchNorm policy, normlab's math.

    ``nonfinite_policy`` (class attribute None: the context's or process default; set it on an
    instance to "skip", "propagate" or "raise") decides what a training batch with non-finite
    statistics does to the running statistics (docs/reliability.md). With "skip" (the default)
    ``num_batches_tracked`` is incremented only for batches that were folded in.
    """

    nonfinite_policy = None

    def _check_input_dim(self, input):
        _check_dims(self, input)

    def forward(self, input):
        self._check_input_dim(input)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            # momentum None: cumulative average over the batches folded in so far
            return F._batch_norm(input, self.running_mean, self.running_var, self.weight,
                                 self.bias, True, self.momentum, self.eps, owner=self,
                                 num_batches_tracked=self.num_batches_tracked)
        factor = 0.0 if self.momentum is None else self.momentum
        return F._batch_norm(input, self.running_mean if track else None,
                             self.running_var if track else None, self.weight, self.bias,
                             use_batch_stats, factor, self.eps, owner=self)


@_twin(nn.BatchNorm1d)
class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    __doc__ = nn.BatchNorm1d.__doc__


@_twin(nn.BatchNorm2d)
class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    __doc__ = nn.BatchNorm2d.__doc__


@_twin(nn.BatchNorm3d)
class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    __doc__ = nn.BatchNorm3d.__doc__


class _InstanceNormForward:
    """forward() shared by InstanceNorm1d/2d/3d; ``nonfinite_policy`` as for BatchNorm."""

    nonfinite_policy = None

    def _check_input_dim(self, input):
        _check_dims(self, input)

    def forward(self, input):
        self._check_input_dim(input)
        unbatched = input.dim() == self._get_no_batch_dim()
        if unbatched:
            input = input.unsqueeze(0)
        use_input_stats = self.training or not self.track_running_stats
        y = F._instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                             use_input_stats, self.momentum if self.momentum is not None else 0.0,
                             self.eps, owner=self)
        return y.squeeze(0) if unbatched else y


@_twin(nn.InstanceNorm1d)
class InstanceNorm1d(_InstanceNormForward, nn.InstanceNorm1d):
    __doc__ = nn.InstanceNorm1d.__doc__


@_twin(nn.InstanceNorm2d)
class InstanceNorm2d(_InstanceNormForward, nn.InstanceNorm2d):
    __doc__ = nn.InstanceNorm2d.__doc__


@_twin(nn.InstanceNorm3d)
class InstanceNorm3d(_InstanceNormForward, nn.InstanceNorm3d):
    __doc__ = nn.InstanceNorm3d.__doc__


@_twin(nn.LayerNorm)
class LayerNorm(nn.LayerNorm):
    __doc__ = nn.LayerNorm.__doc__

    def forward(self, input):
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


@_twin(nn.GroupNorm)
class GroupNorm(nn.GroupNorm):
    __doc__ = nn.GroupNorm.__doc__

    def forward(self, input):
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


@_twin(nn.RMSNorm)
class RMSNorm(nn.RMSNorm):
    __doc__ = nn.RMSNorm.__doc__

    def forward(self, input):
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)
