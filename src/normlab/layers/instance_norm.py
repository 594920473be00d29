"""Instance Normalization as a NumPy layer."""

from __future__ import annotations

import numpy as np

from .. import _checks
from . import _validate
from ._base import NormLayer

__all__ = ["InstanceNorm"]


class InstanceNorm(NormLayer):
    r"""Instance Normalization (Ulyanov, Vedaldi & Lempitsky, 2016): per sample and channel.

    For each sample n and channel c, over the S = prod(spatial) values of ``x[n, c]``::

        mean_nc, var_nc = mean and biased variance of x[n, c]   (training, or no running stats)
        y = (x - mean_nc) / sqrt(var_nc + eps) * weight_c + bias_c

    With ``track_running_stats=True`` and ``training=False`` the running statistics replace
    them: ``y = (x - running_mean_c) / sqrt(running_var_c + eps) * weight_c + bias_c``.

    Running statistics (``training=True`` with ``track_running_stats=True``) follow
    torch.nn.InstanceNorm, which averages the N per-instance updates of the batch::

        f = momentum                      (momentum=None gives f = 0: torch.nn.InstanceNorm then
                                           never updates the running statistics)
        running_mean <- (1 - f) * running_mean + f * mean_n(mean_nc)
        running_var  <- (1 - f) * running_var  + f * mean_n(var_nc) * S / (S - 1)

    and, like torch.nn.InstanceNorm, ``num_batches_tracked`` is kept (for checkpoints) but
    never incremented.

    Shapes:
        x: ``(N, C, *spatial)`` with at least one spatial dim, or ``(N, *spatial, C)`` with
        ``channels_last=True``; y, dx: like x, in x's dtype. weight, bias, running
        statistics: ``(C,)``.

    Args:
        num_features: C. Unlike torch.nn, a channel count that differs from it is an error
            even without ``affine``.
        eps, momentum, channels_last, dtype: as :class:`BatchNorm`.
        affine: learn ``weight`` and ``bias`` (default False, as in torch.nn).
        track_running_stats: keep running statistics and use them when ``training=False``
            (default False, as in torch.nn).

    Example:
        >>> import numpy as np
        >>> from normlab.layers import InstanceNorm
        >>> norm = InstanceNorm(3)
        >>> x = np.random.default_rng(0).normal(size=(2, 3, 7)).astype(np.float32)
        >>> y = norm.forward(x)
        >>> y.dtype, bool(np.allclose(y.mean(axis=2), 0, atol=1e-6))
        (dtype('float32'), True)
    """

    _repr_fields = ("num_features", "eps", "momentum", "affine", "track_running_stats",
                    "channels_last")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, *, channels_last=False, dtype=np.float32, backend=None):
        self.num_features = _checks.check_positive_int(num_features, "num_features")
        _checks.check_eps(eps)
        _checks.check_momentum(momentum)
        self.affine = bool(affine)
        self.channels_last = bool(channels_last)
        C = self.num_features
        super().__init__(param_shape=(C,), weight=self.affine, bias=self.affine,
                         stats_shape=(C,) if track_running_stats else None,
                         eps=eps, momentum=momentum, dtype=dtype, backend=backend)

    def _check_input(self, x, batch_stats):
        self._check_channel_input(x, 3, self.num_features)
        if batch_stats:
            _validate.check_spatial_size(x, self.channels_last, type(self).__name__)

    def _op(self, training, batch_stats):
        options = dict(eps=self.eps, channels_last=self.channels_last)
        if not batch_stats:
            options.update(mean=self.running_mean, var=self.running_var)
        return "instance_norm", options

    def _update_running_stats(self, stats):
        # The update is affine in (mean, var), so the mean of the N per-instance updates is one
        # update with the statistics averaged over the batch.
        momentum = 0.0 if self.momentum is None else self.momentum
        self._fold_into_running(stats.mean.mean(axis=0), stats.var.mean(axis=0), stats.count,
                                momentum)
