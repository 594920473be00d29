r"""normlab.nn.functional: torch.nn.functional's normalization functions, same signatures.

Each function is one choice of reduced axes plus a statistics policy over the shared normalize
primitive (see ARCHITECTURE.md). Running statistics are updated in place when training, with
torch.nn's rule (``f`` = ``momentum``; the caller passes ``1 / num_batches_tracked`` for a
cumulative average, as torch.nn's modules do)::

    running_mean <- (1 - f) * running_mean + f * mean_B
    running_var  <- (1 - f) * running_var  + f * var_B * M / (M - 1)     # unbiased

Channels-last (``torch.channels_last`` / ``channels_last_3d``) inputs give channels-last outputs.
"""

from __future__ import annotations

import math

import torch

from .. import _checks
from . import _composite

__all__ = ["batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"]


def _channel_view(v, ndim):
    if v is None:
        return None
    return v.view((1, -1) + (1,) * (ndim - 2))


def _check_stat_vectors(C, **vectors):
    for name, v in vectors.items():
        if v is not None and tuple(v.shape) != (C,):
            raise ValueError(f"{name} must have shape ({C},) (one value per channel), got shape {tuple(v.shape)}")


@torch.no_grad()
def _update_running(running_mean, running_var, mean, var, count, momentum):
    """In-place EMA of the running statistics (see module docstring)."""
    f = float(momentum)
    unbiased = var * (count / max(count - 1, 1))
    if running_mean is not None:
        running_mean.mul_(1.0 - f).add_(mean.to(running_mean.dtype), alpha=f)
    if running_var is not None:
        running_var.mul_(1.0 - f).add_(unbiased.to(running_var.dtype), alpha=f)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Batch norm over (N, *spatial) per channel of an (N, C, *spatial) tensor.

    Training (or no running statistics): batch statistics, and the running ones updated in
    place. Otherwise the running statistics normalize.
    """
    _checks.check_min_ndim(input, 2, "batch_norm", "(N, C, *spatial)")
    _checks.check_eps(eps)
    C = input.shape[1]
    _check_stat_vectors(C, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    dims = [0] + list(range(2, input.ndim))
    w, b = _channel_view(weight, input.ndim), _channel_view(bias, input.ndim)
    use_batch_stats = training or running_mean is None or running_var is None
    if not use_batch_stats:
        y, _, _ = _composite.normalize(input, dims, eps, mean=_channel_view(running_mean, input.ndim),
                                       var=_channel_view(running_var, input.ndim), weight=w, bias=b)
        return y
    count = input.numel() // C if C else 0
    if count == 0:  # an empty batch: empty output, running statistics left as they are
        return input.clone()
    if training:
        _checks.check_values_per_channel(count, input.shape, "batch_norm")
    y, mean, var = _composite.normalize(input, dims, eps, weight=w, bias=b)
    if training and momentum is not None and (running_mean is not None or running_var is not None):
        _update_running(running_mean, running_var, mean.detach().reshape(C), var.detach().reshape(C),
                        count, momentum)
    return y


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """Instance norm: each (sample, channel) over its spatial values.

    With ``use_input_stats`` the running statistics (if given) are updated with the batch
    average of the per-instance statistics; otherwise they normalize every instance.
    """
    _checks.check_min_ndim(input, 3, "instance_norm", "(N, C, *spatial) with at least one spatial dim")
    _checks.check_eps(eps)
    N, C = input.shape[:2]
    _check_stat_vectors(C, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    w, b = _channel_view(weight, input.ndim), _channel_view(bias, input.ndim)
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("instance_norm with use_input_stats=False needs running_mean and running_var")
        y, _, _ = _composite.normalize(input, list(range(2, input.ndim)), eps,
                                       mean=_channel_view(running_mean, input.ndim),
                                       var=_channel_view(running_var, input.ndim), weight=w, bias=b)
        return y
    spatial = math.prod(input.shape[2:])
    if spatial <= 1 and input.numel() > 0:
        raise ValueError(
            f"instance_norm needs more than 1 spatial element per channel, got an input of shape "
            f"{tuple(input.shape)}; InstanceNorm of a single value is always 0")
    if input.numel() == 0:  # torch would write NaN into the running statistics here; we do not
        return input.clone()
    y, mean, var = _composite.normalize(input, list(range(2, input.ndim)), eps, weight=w, bias=b)
    if momentum is not None and (running_mean is not None or running_var is not None):
        _update_running(running_mean, running_var, mean.detach().reshape(N, C).mean(0),
                        var.detach().reshape(N, C).mean(0), spatial, momentum)
    return y


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer norm over the trailing ``normalized_shape`` dims (per-element affine)."""
    shape = _checks.normalized_shape_tuple(normalized_shape)
    _checks.check_eps(eps)
    _checks.check_normalized_shape(input, shape, "layer_norm")
    _checks.check_param_shape(weight, shape, "weight")
    _checks.check_param_shape(bias, shape, "bias")
    if input.numel() == 0:
        return input.clone()
    dims = list(range(input.ndim - len(shape), input.ndim))
    y, _, _ = _composite.normalize(input, dims, eps, weight=weight, bias=bias)
    return y


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """Group norm: each (sample, group of C/G channels) over its channels and spatial values."""
    _checks.check_min_ndim(input, 2, "group_norm", "(N, C, *spatial)")
    _checks.check_eps(eps)
    N, C = input.shape[:2]
    _checks.check_groups(num_groups, C)
    _check_stat_vectors(C, weight=weight, bias=bias)
    if input.numel() == 0:
        return input.clone()
    xg = input.reshape(N, num_groups, -1)
    yg, _, _ = _composite.normalize(xg, [2], eps)
    y = yg.reshape(input.shape)
    if weight is not None or bias is not None:
        yf = y.to(_composite.compute_dtype(y.dtype))
        if weight is not None:
            yf = yf * _channel_view(weight, input.ndim)
        if bias is not None:
            yf = yf + _channel_view(bias, input.ndim)
        y = yf.to(input.dtype)
    if input.is_contiguous(memory_format=torch.channels_last) and input.ndim == 4:
        y = y.contiguous(memory_format=torch.channels_last)
    return y


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """RMS norm over the trailing ``normalized_shape`` dims; ``eps=None`` is finfo(dtype).eps (float32's for 16-bit input, as torch)."""
    shape = _checks.normalized_shape_tuple(normalized_shape)
    if eps is None:
        eps = torch.finfo(input.dtype if input.element_size() >= 4 else torch.float32).eps
    _checks.check_eps(eps)
    _checks.check_normalized_shape(input, shape, "rms_norm")
    _checks.check_param_shape(weight, shape, "weight")
    if input.numel() == 0:
        return input.clone()
    dims = list(range(input.ndim - len(shape), input.ndim))
    y, _ = _composite.rms_normalize(input, dims, eps, weight=weight)
    return y
