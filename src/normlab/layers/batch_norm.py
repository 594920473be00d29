"""Batch Normalization and Batch Renormalization as NumPy layers."""

from __future__ import annotations

import numpy as np

from .. import _checks
from . import _validate
from ._base import NormLayer

__all__ = ["BatchNorm", "BatchRenorm"]


class BatchNorm(NormLayer):
    r"""Batch Normalization (Ioffe & Szegedy, 2015) over the channel axis.

    For each channel c, over the M = N * prod(spatial) values of that channel::

        mean_c, var_c = batch mean and biased batch variance    (training, or no running stats)
                      = running_mean_c, running_var_c            (training=False with running stats)
        y = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c

    Running statistics (``training=True`` with ``track_running_stats=True``), torch.nn's rule::

        t = num_batches_tracked <- num_batches_tracked + 1
        f = momentum                      (exponential average; momentum weights the NEW batch)
        f = 1 / t                         (momentum=None: cumulative average of all t batches)
        running_mean <- (1 - f) * running_mean + f * mean_c
        running_var  <- (1 - f) * running_var  + f * var_c * M / (M - 1)     (unbiased)

    The update is computed in float64 and stored in ``dtype``.

    Shapes:
        x: ``(N, C, *spatial)`` with any number of spatial dims (``(N, C)``, ``(N, C, L)``,
        ``(N, C, H, W)``, ...), or ``(N, *spatial, C)`` with ``channels_last=True``.
        y, dx: like x, in x's dtype. weight, bias, running_mean, running_var: ``(C,)``.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance, > 0.
        momentum: weight of the new batch in the running statistics, in [0, 1], or None for a
            cumulative average.
        affine: learn ``weight`` and ``bias`` (else both None).
        track_running_stats: keep running statistics and use them when ``training=False``
            (else the buffers are None and batch statistics are used in both modes).
        channels_last: the channel axis is the last one.
        dtype: dtype of the parameters and running statistics.

    Example:
        >>> import numpy as np
        >>> from normlab.layers import BatchNorm
        >>> bn = BatchNorm(3)
        >>> x = np.random.default_rng(0).normal(2.0, 3.0, size=(8, 3, 5)).astype(np.float32)
        >>> y = bn.forward(x)                       # training: batch statistics
        >>> y.dtype, y.shape, bool(abs(y.mean()) < 1e-5)
        (dtype('float32'), (8, 3, 5), True)
        >>> dx = bn.backward(np.ones_like(y))
        >>> bn.dweight.shape, int(bn.num_batches_tracked)
        ((3,), 1)
        >>> y_eval = bn.forward(x, training=False)  # running statistics
    """

    _repr_fields = ("num_features", "eps", "momentum", "affine", "track_running_stats",
                    "channels_last")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, channels_last=False, dtype=np.float32, backend=None):
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
        self._check_channel_input(x, 2, self.num_features)
        if batch_stats:
            _checks.check_values_per_channel(x.size // self.num_features, x.shape, type(self).__name__)

    def _op(self, training, batch_stats):
        options = dict(eps=self.eps, channels_last=self.channels_last)
        if not batch_stats:
            options.update(mean=self.running_mean, var=self.running_var)
        return "batch_norm", options


class BatchRenorm(NormLayer):
    r"""Batch Renormalization (Ioffe, 2017): batch norm corrected towards the running statistics.

    Training, per channel c, with the batch mean ``mean_B`` and biased variance ``var_B`` over
    the M = N * prod(spatial) values of the channel, and the running statistics before this
    batch's update::

        sigma_B = sqrt(var_B + eps),  sigma_R = sqrt(running_var_c + eps)
        r = clip(sigma_B / sigma_R, 1/r_max, r_max)                 (constant in backward)
        d = clip((mean_B - running_mean_c) / sigma_R, -d_max, d_max) (constant in backward)
        y = ((x - mean_B) / sigma_B * r + d) * weight_c + bias_c

    then the running statistics are updated exactly as in :class:`BatchNorm` (momentum or
    cumulative average, unbiased running variance, ``num_batches_tracked`` += 1). With
    ``training=False``: ``y = (x - running_mean_c) / sigma_R * weight_c + bias_c``.
    ``r_max = 1, d_max = 0`` is batch norm. The paper relaxes r_max and d_max during training:
    they are plain attributes, change them between steps.

    Shapes: as :class:`BatchNorm`.

    Args:
        num_features, eps, momentum, affine, channels_last, dtype: as :class:`BatchNorm`
            (running statistics are always tracked).
        r_max: >= 1, the bound of the scale correction r.
        d_max: >= 0, the bound of the shift correction d.

    Example:
        >>> import numpy as np
        >>> from normlab.layers import BatchRenorm
        >>> brn = BatchRenorm(4, r_max=1.5, d_max=0.5)
        >>> x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
        >>> y = brn.forward(x)
        >>> dx = brn.backward(np.ones_like(y))
        >>> y.dtype, dx.shape, int(brn.num_batches_tracked)
        (dtype('float32'), (16, 4), 1)
    """

    _repr_fields = ("num_features", "eps", "momentum", "affine", "r_max", "d_max", "channels_last")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, *, r_max=3.0,
                 d_max=5.0, channels_last=False, dtype=np.float32, backend=None):
        self.num_features = _checks.check_positive_int(num_features, "num_features")
        _checks.check_eps(eps)
        _checks.check_momentum(momentum)
        _validate.check_renorm_limits(r_max, d_max)
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.affine = bool(affine)
        self.channels_last = bool(channels_last)
        C = self.num_features
        super().__init__(param_shape=(C,), weight=self.affine, bias=self.affine, stats_shape=(C,),
                         eps=eps, momentum=momentum, dtype=dtype, backend=backend)

    def _uses_batch_stats(self, training):
        return training

    def _check_input(self, x, batch_stats):
        self._check_channel_input(x, 2, self.num_features)
        if batch_stats:
            _checks.check_values_per_channel(x.size // self.num_features, x.shape, type(self).__name__)

    def _op(self, training, batch_stats):
        if not training:
            return "batch_norm", dict(mean=self.running_mean, var=self.running_var, eps=self.eps,
                                      channels_last=self.channels_last)
        _validate.check_renorm_limits(self.r_max, self.d_max)   # they may have been rescheduled
        return "batch_renorm", dict(running_mean=self.running_mean, running_var=self.running_var,
                                    r_max=self.r_max, d_max=self.d_max, eps=self.eps,
                                    channels_last=self.channels_last)
