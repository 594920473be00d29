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

import torch
from torch import nn

from . import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm"]


class _BatchNormForward:
    """forward() shared by BatchNorm1d/2d/3d: torch.nn's _BatchNorm policy, normlab's math."""

    def forward(self, input):
        self._check_input_dim(input)
        if self.momentum is None:
            factor = 0.0
        else:
            factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if track else None,
                            self.running_var if track else None, self.weight, self.bias,
                            use_batch_stats, factor, self.eps)


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    __doc__ = nn.BatchNorm1d.__doc__


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    __doc__ = nn.BatchNorm2d.__doc__


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    __doc__ = nn.BatchNorm3d.__doc__


class _InstanceNormForward:
    def forward(self, input):
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features and self.affine:
            raise ValueError(
                f"{type(self).__name__} was built for num_features={self.num_features} but the "
                f"input of shape {tuple(input.shape)} has {input.size(feature_dim)} channels")
        unbatched = input.dim() == self._get_no_batch_dim()
        if unbatched:
            input = input.unsqueeze(0)
        use_input_stats = self.training or not self.track_running_stats
        y = F.instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                            use_input_stats, self.momentum if self.momentum is not None else 0.0,
                            self.eps)
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNormForward, nn.InstanceNorm1d):
    __doc__ = nn.InstanceNorm1d.__doc__


class InstanceNorm2d(_InstanceNormForward, nn.InstanceNorm2d):
    __doc__ = nn.InstanceNorm2d.__doc__


class InstanceNorm3d(_InstanceNormForward, nn.InstanceNorm3d):
    __doc__ = nn.InstanceNorm3d.__doc__


class LayerNorm(nn.LayerNorm):
    __doc__ = nn.LayerNorm.__doc__

    def forward(self, input):
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(nn.GroupNorm):
    __doc__ = nn.GroupNorm.__doc__

    def forward(self, input):
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    __doc__ = nn.RMSNorm.__doc__

    def forward(self, input):
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)
