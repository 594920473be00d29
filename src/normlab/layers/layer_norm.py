"""Layer Normalization and RMS Normalization as NumPy layers."""

from __future__ import annotations

import numpy as np

from .. import _checks
from ._base import NormLayer

__all__ = ["LayerNorm", "RMSNorm"]


class LayerNorm(NormLayer):
    r"""Layer Normalization (Ba, Kiros & Hinton, 2016) over the trailing ``normalized_shape`` dims.

    For each sample (every index of the leading dims), over its D = prod(normalized_shape)
    values::

        mean, var = mean and biased variance of x[i]
        y = (x - mean) / sqrt(var + eps) * weight + bias     (weight, bias: normalized_shape)

    Statistics are always per sample: ``training`` changes nothing.

    Shapes:
        x: ``(*, *normalized_shape)``; y, dx: like x, in x's dtype. weight, bias:
        ``normalized_shape``.

    Args:
        normalized_shape: int or tuple of ints, the trailing dims to normalize over.
        eps: added to the variance, > 0.
        elementwise_affine: learn ``weight`` (and ``bias``, see below); else both None.
        bias: with ``elementwise_affine``, also learn ``bias``.
        dtype: dtype of the parameters.

    Example:
        >>> import numpy as np
        >>> from normlab.layers import LayerNorm
        >>> ln = LayerNorm(8)
        >>> x = np.random.default_rng(0).normal(size=(4, 5, 8)).astype(np.float32)
        >>> y = ln.forward(x)
        >>> y.dtype, bool(np.allclose(y.mean(axis=-1), 0, atol=1e-6))
        (dtype('float32'), True)
    """

    _repr_fields = ("normalized_shape", "eps", "elementwise_affine")

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *,
                 dtype=np.float32, backend=None):
        self.normalized_shape = _checks.normalized_shape_tuple(normalized_shape)
        _checks.check_eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        super().__init__(param_shape=self.normalized_shape, weight=self.elementwise_affine,
                         bias=self.elementwise_affine and bool(bias), stats_shape=None, eps=eps,
                         momentum=None, dtype=dtype, backend=backend)

    def _check_input(self, x, batch_stats):
        _checks.check_normalized_shape(x, self.normalized_shape, type(self).__name__)

    def _op(self, training, batch_stats):
        return "layer_norm", dict(normalized_shape=self.normalized_shape, eps=self.eps)


class RMSNorm(NormLayer):
    r"""RMS Normalization (Zhang & Sennrich, 2019): LayerNorm without centering and without bias.

    For each sample, over its D = prod(normalized_shape) trailing values::

        y = x / sqrt(mean(x^2) + eps) * weight

    ``eps=None`` is torch.nn.RMSNorm's default: the machine epsilon of the dtype torch computes
    in (``np.finfo(x.dtype).eps`` for float32 and float64, float32's for float16), so it differs
    between float32 and float64 input.

    Shapes:
        x: ``(*, *normalized_shape)``; y, dx: like x, in x's dtype. weight:
        ``normalized_shape``. ``bias`` and ``dbias`` are always None.

    Args:
        normalized_shape: int or tuple of ints, the trailing dims to normalize over.
        eps: > 0, or None (see above).
        elementwise_affine: learn ``weight`` (else None).
        dtype: dtype of the parameters.

    Example:
        >>> import numpy as np
        >>> from normlab.layers import RMSNorm
        >>> norm = RMSNorm(4)
        >>> y = norm.forward(np.full((2, 4), 3.0, dtype=np.float32))
        >>> y.dtype, bool(np.allclose(y, 1.0))
        (dtype('float32'), True)
    """

    _repr_fields = ("normalized_shape", "eps", "elementwise_affine")

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, *, dtype=np.float32, backend=None):
        self.normalized_shape = _checks.normalized_shape_tuple(normalized_shape)
        _checks.check_eps(eps, allow_none=True)
        self.elementwise_affine = bool(elementwise_affine)
        super().__init__(param_shape=self.normalized_shape, weight=self.elementwise_affine,
                         bias=False, stats_shape=None, eps=eps, momentum=None, dtype=dtype, backend=backend)

    def _check_input(self, x, batch_stats):
        _checks.check_normalized_shape(x, self.normalized_shape, type(self).__name__)

    def _op(self, training, batch_stats):
        return "rms_norm", dict(normalized_shape=self.normalized_shape, eps=self.eps)
