"""Group Normalization as a NumPy layer."""

from __future__ import annotations

import numpy as np

from .. import _checks
from ._base import NormLayer

__all__ = ["GroupNorm"]


class GroupNorm(NormLayer):
    r"""Group Normalization (Wu & He, 2018): per sample, over groups of consecutive channels.

    The C channels are split into G = ``num_groups`` groups of C/G consecutive channels; for
    each sample n and group g, over its (C/G) * prod(spatial) values::

        mean_ng, var_ng = mean and biased variance of x[n, channels of g]
        y = (x - mean_ng) / sqrt(var_ng + eps) * weight_c + bias_c        (per-channel affine)

    Statistics are always per sample: ``training`` changes nothing. G = 1 is LayerNorm over
    (C, *spatial) with a per-channel affine; G = C is InstanceNorm.

    Shapes:
        x: ``(N, C, *spatial)`` (spatial may be empty), or ``(N, *spatial, C)`` with
        ``channels_last=True``; y, dx: like x, in x's dtype. weight, bias: ``(C,)``.

    Args:
        num_groups: G, must divide ``num_channels``.
        num_channels: C.
        eps: added to the variance, > 0.
        affine: learn ``weight`` and ``bias`` (else both None).
        bias: with ``affine``, also learn ``bias`` (torch.nn.GroupNorm's keyword).
        channels_last: the channel axis is the last one.
        dtype: dtype of the parameters.

    Example:
        >>> import numpy as np
        >>> from normlab.layers import GroupNorm
        >>> gn = GroupNorm(2, 6)
        >>> x = np.random.default_rng(0).normal(size=(3, 6, 5)).astype(np.float32)
        >>> y = gn.forward(x)
        >>> y.dtype, bool(np.allclose(y.reshape(3, 2, -1).mean(axis=2), 0, atol=1e-6))
        (dtype('float32'), True)
    """

    _repr_fields = ("num_groups", "num_channels", "eps", "affine", "channels_last")

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, bias=True,
                 channels_last=False, dtype=np.float32, backend=None):
        self.num_channels = _checks.check_positive_int(num_channels, "num_channels")
        _checks.check_groups(num_groups, self.num_channels)
        self.num_groups = int(num_groups)
        _checks.check_eps(eps)
        self.affine = bool(affine)
        self.channels_last = bool(channels_last)
        super().__init__(param_shape=(self.num_channels,), weight=self.affine,
                         bias=self.affine and bool(bias), stats_shape=None, eps=eps,
                         momentum=None, dtype=dtype, backend=backend)

    def _check_input(self, x, batch_stats):
        self._check_channel_input(x, 2, self.num_channels)

    def _op(self, training, batch_stats):
        return "group_norm", dict(num_groups=self.num_groups, eps=self.eps,
                                  channels_last=self.channels_last)
