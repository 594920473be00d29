r"""Adaptive, conditional and batch-independent normalization layers.

* :class:`SwitchableNorm1d/2d/3d` — Switchable Normalization (Luo et al., 2018): a learned
  softmax mix of instance-, layer- and batch-norm statistics.
* :class:`AdaIN` — adaptive instance normalization (Huang & Belongie, 2017): the content's
  per-channel statistics replaced by the style's.
* :class:`ConditionalBatchNorm2d` — batch norm whose affine is looked up by class label
  (de Vries et al., 2017; Miyato & Koyama, 2018).
* :class:`FiLM` and :class:`LinearFiLM` — feature-wise linear modulation (Perez et al., 2018).
* :class:`FilterResponseNorm` / :class:`FilterResponseNorm2d` and :class:`TLU` — filter response
  normalization with the thresholded linear unit (Singh & Krishnan, 2019).
* :class:`EvoNormB0` / :class:`EvoNormB0_2d`, :class:`EvoNormS0` / :class:`EvoNormS0_2d` — the
  evolved normalization-activation layers (Liu, Brock, Simonyan & Le, 2020).
* :class:`WSConv2d` — Conv2d with weight standardization (Qiao et al., 2019), for GroupNorm
  at micro-batch sizes.

The specification is ``normlab.reference.adaptive`` (float64 NumPy, forward and hand-derived
backward for every method, derivations in its docstring). These modules are plain torch
compositions (autograd gives the backward; the tests check it against the hand-derived
reference backward), except ConditionalBatchNorm2d, which runs
:func:`normlab.nn.functional.batch_norm` (and so its fused kernels) underneath. Statistics
are computed in at least float32 and the output has the input's dtype.

None of these modules subclasses ``torch.nn.modules.batchnorm._BatchNorm``, even those with
running statistics: model tools that act on "every batch norm" (fold, recalibrate, freeze,
convert) must not mistake them for plain BN (folding a ConditionalBatchNorm2d would drop its
class-conditional affine).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _checks
from . import functional as F

__all__ = ["SwitchableNorm1d", "SwitchableNorm2d", "SwitchableNorm3d",
           "AdaIN", "adain", "ConditionalBatchNorm2d", "FiLM", "LinearFiLM", "film",
           "TLU", "FilterResponseNorm", "FilterResponseNorm2d",
           "EvoNormB0", "EvoNormB0_2d", "EvoNormS0", "EvoNormS0_2d",
           "WSConv2d", "standardize_weight"]

_LAYOUTS = {1: ((2, 3), "(N, C) or (N, C, L)"), 2: ((4,), "(N, C, H, W)"), 3: ((5,), "(N, C, D, H, W)"),
            None: (None, "(N, C, *spatial)")}


def _check_input(module, input):
    name = type(module).__name__
    F._check_input(input, name)
    allowed, layout = _LAYOUTS[module._dim]
    if allowed is None:
        _checks.check_min_ndim(input, 2, name, layout)
    else:
        _checks.check_ndim_in(input, allowed, name, layout)
    if input.shape[1] != module.num_features:
        raise ValueError(
            f"{name} was built for num_features={module.num_features} but the input of shape "
            f"{tuple(input.shape)} has {input.shape[1]} channels on axis 1; pass an input with "
            f"{module.num_features} channels or build the layer with num_features={input.shape[1]}")


def _compute_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)


def _cview(v, ndim, dtype):
    """A (C,) vector as (1, C, 1, ...) in ``dtype``."""
    return v.to(dtype).reshape((1, -1) + (1,) * (ndim - 2))


def _mean_var(x, dims):
    """Biased (mean, var) over ``dims`` with kept dims; over no dims: (x, 0) (one value each)."""
    if len(dims) == 0:
        return x, torch.zeros_like(x)
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    return mean, var


def _check_bool(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {name}={value!r} of type {type(value).__name__}")
    return value


def _affine_params(module, C, affine, kw):
    _check_bool(affine, "affine")
    module.affine = affine
    if affine:
        module.weight = nn.Parameter(torch.ones(C, **kw))
        module.bias = nn.Parameter(torch.zeros(C, **kw))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


def _apply_affine(y, module):
    if module.weight is not None:
        y = y * _cview(module.weight, y.ndim, y.dtype)
    if module.bias is not None:
        y = y + _cview(module.bias, y.ndim, y.dtype)
    return y


# ----------------------------------------------------------------------------- Switchable Norm


class _SwitchableNorm(nn.Module):
    r"""Switchable Normalization (Luo, Ren, Peng, Zhang & Li, 2018, "Differentiable Learning-to-
    Normalize via Switchable Normalization", ICLR 2019).

    Per sample n and channel c, with the biased statistics of instance norm (over the spatial
    values of (n, c)), layer norm (over all ``(C, *spatial)`` values of n) and batch norm (over
    ``(N, *spatial)`` per c), and two learned logit vectors of length 3 (order IN, LN, BN)::

        w  = softmax(mean_weight),   w' = softmax(var_weight)
        mu = w_IN mu_IN + w_LN mu_LN + w_BN mu_BN
        sigma2 = w'_IN sigma2_IN + w'_LN sigma2_LN + w'_BN sigma2_BN
        y  = (x - mu) / sqrt(sigma2 + eps) * weight_c + bias_c

    The logits start at 0 (equal weights 1/3). On an ``(N, C)`` input (no spatial axes) the
    instance statistics would be those of one value (mean x, variance 0); as in the authors'
    SwitchNorm1d only LN and BN are mixed there (softmax over the last two logits; the IN logit
    gets no gradient).

    Batch statistics and running statistics, as batch norm (``torch.nn.BatchNorm2d``'s rule):
    in training the BN term uses the batch's mean and biased variance and folds them into
    ``running_mean``/``running_var`` (``running = (1 - momentum) * running + momentum * batch``,
    unbiased variance; ``momentum=None``: cumulative average; the non-finite policy of
    docs/reliability.md applies); in eval the BN term uses the running statistics (IN and LN
    always use the input's own). The running statistics are always tracked (the paper uses
    them in inference). The backward is torch autograd of this forward; it is tested against
    the hand-derived ``normlab.reference.switchable_norm_backward``.

    Args:
        num_features: C.
        eps: added to the mixed variance (> 0).
        momentum: the running statistics' update weight in [0, 1], or None.
        affine: learn the per-channel ``weight`` (init 1) and ``bias`` (init 0).
        device, dtype: of the parameters and buffers.

    State: ``weight``, ``bias``, ``mean_weight`` (3,), ``var_weight`` (3,), ``running_mean``,
    ``running_var``, ``num_batches_tracked``. Reference: ``normlab.reference.switchable_norm_forward``.

    Example:
        >>> import torch, normlab.nn as nl
        >>> m = nl.SwitchableNorm2d(4)
        >>> m(torch.randn(2, 4, 5, 5)).shape
        torch.Size([2, 4, 5, 5])
    """

    _dim = None
    nonfinite_policy = None     # see docs/reliability.md

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, device=None, dtype=None):
        super().__init__()
        self.num_features = _checks.check_positive_int(num_features, "num_features")
        _checks.check_eps(eps)
        _checks.check_momentum(momentum)
        self.eps, self.momentum = float(eps), momentum
        kw = dict(device=device, dtype=dtype)
        _affine_params(self, self.num_features, affine, kw)
        self.mean_weight = nn.Parameter(torch.zeros(3, **kw))
        self.var_weight = nn.Parameter(torch.zeros(3, **kw))
        self.register_buffer("running_mean", torch.zeros(self.num_features, **kw))
        self.register_buffer("running_var", torch.ones(self.num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def reset_running_stats(self):
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"

    def forward(self, input):
        _check_input(self, input)
        x = input.to(_compute_dtype(input))
        N, C = x.shape[:2]
        sp = tuple(range(2, x.ndim))
        if self.training:
            count = x.numel() // C
            if N == 0:
                return input.clone()
            _checks.check_values_per_channel(count, x.shape, type(self).__name__)
            mu_bn, var_bn = _mean_var(x, (0,) + sp)                            # (1, C, 1..)
            F._update_running(self.running_mean, self.running_var, mu_bn.detach().reshape(C),
                              var_bn.detach().reshape(C), count, self.momentum, owner=self,
                              num_batches_tracked=self.num_batches_tracked)
        else:
            mu_bn = _cview(self.running_mean, x.ndim, x.dtype)
            var_bn = _cview(self.running_var, x.ndim, x.dtype)
        mu_ln, var_ln = _mean_var(x, (1,) + sp)                                # (N, 1, 1..)
        if sp:
            mu_in, var_in = _mean_var(x, sp)                                   # (N, C, 1..)
            means, vars_ = (mu_in, mu_ln, mu_bn), (var_in, var_ln, var_bn)
            wm = torch.softmax(self.mean_weight.to(x.dtype), 0)
            wv = torch.softmax(self.var_weight.to(x.dtype), 0)
        else:       # (N, C): no instance statistics, mix LN and BN only
            means, vars_ = (mu_ln, mu_bn), (var_ln, var_bn)
            wm = torch.softmax(self.mean_weight[1:].to(x.dtype), 0)
            wv = torch.softmax(self.var_weight[1:].to(x.dtype), 0)
        mu = sum(w * m for w, m in zip(wm, means))
        var = sum(w * v for w, v in zip(wv, vars_))
        y = (x - mu) * torch.rsqrt(var + self.eps)
        return _apply_affine(y, self).to(input.dtype)


class SwitchableNorm1d(_SwitchableNorm):
    __doc__ = _SwitchableNorm.__doc__ + "\n    Input: (N, C) or (N, C, L).\n"
    _dim = 1


class SwitchableNorm2d(_SwitchableNorm):
    __doc__ = _SwitchableNorm.__doc__ + "\n    Input: (N, C, H, W).\n"
    _dim = 2


class SwitchableNorm3d(_SwitchableNorm):
    __doc__ = _SwitchableNorm.__doc__ + "\n    Input: (N, C, D, H, W).\n"
    _dim = 3


# ----------------------------------------------------------------------------- AdaIN


def adain(content, style, eps=1e-5):
    r"""Adaptive instance normalization (Huang & Belongie, 2017, "Arbitrary Style Transfer in
    Real-time with Adaptive Instance Normalization", ICCV, Eq. 8)::

        y = sigma(style) * (content - mu(content)) / sigma(content) + mu(style)

    per sample n and channel c, with ``mu``, ``sigma = sqrt(var + eps)`` (biased variance) over
    each tensor's own spatial axes, so content ``(N, C, *S)`` and style ``(N, C, *S')`` may have
    different spatial sizes. Gradients flow to both. Reference:
    ``normlab.reference.adain_forward/adain_backward``.
    """
    F._check_input(content, "adain")
    F._check_input(style, "adain")
    _checks.check_eps(eps)
    if content.ndim < 3 or style.ndim < 3:
        raise ValueError(
            f"adain normalizes over spatial axes, so content and style must be (N, C, *spatial) "
            f"with at least one spatial axis, got shapes {tuple(content.shape)} and "
            f"{tuple(style.shape)}; add a spatial axis, e.g. x.unsqueeze(-1)")
    if content.shape[:2] != style.shape[:2]:
        raise ValueError(
            f"adain needs content and style with the same batch size and channels (N, C), got "
            f"content {tuple(content.shape)} and style {tuple(style.shape)}; for one style image "
            f"and many contents pass style.expand({content.shape[0]}, *style.shape[1:])")
    if content.dtype != style.dtype or content.device != style.device:
        raise ValueError(
            f"adain needs content and style of one dtype and device, got {content.dtype} on "
            f"{content.device} and {style.dtype} on {style.device}; convert one with .to(other)")
    cdt = _compute_dtype(content)
    c, s = content.to(cdt), style.to(cdt)
    mu_c, var_c = _mean_var(c, tuple(range(2, c.ndim)))
    mu_s, var_s = _mean_var(s, tuple(range(2, s.ndim)))
    shape = c.shape[:2] + (1,) * (c.ndim - 2)
    sigma_s = torch.sqrt(var_s + eps).reshape(shape)
    y = (c - mu_c) * torch.rsqrt(var_c + eps) * sigma_s + mu_s.reshape(shape)
    return y.to(content.dtype)


class AdaIN(nn.Module):
    __doc__ = (adain.__doc__.split("Reference:")[0] + """Reference: ``normlab.reference.adain_forward``.

    No parameters. ``forward(content, style)``.

    Example:
        >>> import torch, normlab.nn as nl
        >>> y = nl.AdaIN()(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4) * 5 + 2)
        >>> bool(abs(float(y.mean()) - 2) < 1.5)
        True
    """)

    def __init__(self, eps=1e-5):
        super().__init__()
        _checks.check_eps(eps)
        self.eps = float(eps)

    def extra_repr(self):
        return f"eps={self.eps}"

    def forward(self, content, style):
        return adain(content, style, self.eps)


# ----------------------------------------------------------------------------- Conditional BN


class ConditionalBatchNorm2d(nn.Module):
    r"""Class-conditional batch norm (de Vries, Strub, Mary, Larochelle, Pietquin & Courville,
    2017, "Modulating early visual processing by language", NeurIPS; the class-conditional
    form of Miyato & Koyama, 2018, "cGANs with Projection Discriminator", ICLR, used in
    conditional GAN generators)::

        xhat = batch_norm(x) without affine
        y[n] = xhat[n] * gamma[label_n] + beta[label_n]      gamma, beta: nn.Embedding(K, C)

    ``gamma`` starts at 1 and ``beta`` at 0 for every class (plain batch norm). ``forward(x,
    labels)`` with ``x`` (N, C, H, W) and ``labels`` (N,) integer class indices in [0, K).
    Statistics exactly as ``torch.nn.BatchNorm2d(C, eps, momentum, affine=False,
    track_running_stats)``; the normalization runs :func:`normlab.nn.functional.batch_norm`
    (fused kernels). A ``BatchNorm2d(C, affine=False)`` state_dict loads into it
    (``strict=False``: the embeddings are extra). Reference:
    ``normlab.reference.conditional_batch_norm_forward/backward``.

    Args:
        num_features: C.
        num_classes: K.
        eps, momentum, track_running_stats, device, dtype: as ``torch.nn.BatchNorm2d``.

    Example:
        >>> import torch, normlab.nn as nl
        >>> m = nl.ConditionalBatchNorm2d(4, num_classes=10)
        >>> m(torch.randn(3, 4, 5, 5), torch.tensor([0, 7, 7])).shape
        torch.Size([3, 4, 5, 5])
    """

    nonfinite_policy = None     # see docs/reliability.md
    _dim = 2

    def __init__(self, num_features, num_classes, eps=1e-5, momentum=0.1, track_running_stats=True,
                 device=None, dtype=None):
        super().__init__()
        self.num_features = _checks.check_positive_int(num_features, "num_features")
        self.num_classes = _checks.check_positive_int(num_classes, "num_classes")
        _checks.check_eps(eps)
        _checks.check_momentum(momentum)
        self.eps, self.momentum = float(eps), momentum
        self.track_running_stats = _check_bool(track_running_stats, "track_running_stats")
        kw = dict(device=device, dtype=dtype)
        self.gamma = nn.Embedding(num_classes, num_features, **kw)
        self.beta = nn.Embedding(num_classes, num_features, **kw)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **kw))
            self.register_buffer("running_var", torch.ones(num_features, **kw))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self):
        self.reset_running_stats()
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def extra_repr(self):
        return (f"{self.num_features}, num_classes={self.num_classes}, eps={self.eps}, "
                f"momentum={self.momentum}, track_running_stats={self.track_running_stats}")

    def _check_labels(self, input, labels):
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool \
                or labels.is_complex():
            what = f"a {labels.dtype} tensor" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise TypeError(f"ConditionalBatchNorm2d expects labels as an integer tensor of class indices, "
                            f"got {what}; pass e.g. torch.as_tensor(labels, dtype=torch.long)")
        if tuple(labels.shape) != (input.shape[0],):
            raise ValueError(f"ConditionalBatchNorm2d expects one label per sample, shape ({input.shape[0]},), "
                             f"got labels of shape {tuple(labels.shape)}; flatten them or match the batch")
        if labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(f"ConditionalBatchNorm2d was built for num_classes={self.num_classes} "
                                 f"(labels in [0, {self.num_classes})), got label {bad}; remap the labels "
                                 f"or build it with num_classes={max(hi + 1, self.num_classes)}")

    def forward(self, input, labels):
        _check_input(self, input)
        self._check_labels(input, labels)
        if self.training and self.track_running_stats:
            xhat = F._batch_norm(input, self.running_mean, self.running_var, None, None, True,
                                 self.momentum, self.eps, owner=self,
                                 num_batches_tracked=self.num_batches_tracked)
        else:
            use_batch = self.training or not self.track_running_stats
            xhat = F._batch_norm(input, None if use_batch else self.running_mean,
                                 None if use_batch else self.running_var, None, None, use_batch,
                                 0.0, self.eps, owner=self)
        labels = labels.to(input.device)
        gam = self.gamma(labels).to(xhat.dtype)[:, :, None, None]               # (N, C, 1, 1)
        bet = self.beta(labels).to(xhat.dtype)[:, :, None, None]
        return xhat * gam + bet


# ----------------------------------------------------------------------------- FiLM


def film(input, gamma, beta):
    r"""Feature-wise linear modulation (Perez, Strub, de Vries, Dumoulin & Courville, 2018,
    "FiLM: Visual Reasoning with a General Conditioning Layer", AAAI)::

        y[n, c, ...] = gamma[n, c] * x[n, c, ...] + beta[n, c]

    ``gamma``, ``beta``: (N, C), one pair per sample and channel, broadcast over the spatial
    axes of ``input`` (N, C, *spatial). Reference: ``normlab.reference.film_forward/backward``.
    """
    F._check_input(input, "film")
    _checks.check_min_ndim(input, 2, "film", "(N, C, *spatial)")
    N, C = input.shape[:2]
    for name, t in (("gamma", gamma), ("beta", beta)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (N, C):
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"film needs {name} of shape (N, C) = ({N}, {C}) for an input of shape "
                             f"{tuple(input.shape)}, got {got}; predict one value per sample and channel "
                             f"(for a shared per-channel affine use {name}.expand({N}, {C}))")
    shape = (N, C) + (1,) * (input.ndim - 2)
    return input * gamma.to(input.dtype).reshape(shape) + beta.to(input.dtype).reshape(shape)


class FiLM(nn.Module):
    __doc__ = film.__doc__ + """
    No parameters: ``forward(x, gamma, beta)`` with ``gamma``, ``beta`` produced elsewhere (e.g.
    by a conditioning network). :class:`LinearFiLM` predicts them from a vector.
    """

    def forward(self, input, gamma, beta):
        return film(input, gamma, beta)


class LinearFiLM(nn.Module):
    r"""FiLM whose ``gamma``, ``beta`` are predicted from a conditioning vector by one Linear::

        [dgamma, beta] = Linear(cond_features, 2 * C)(cond)        (N, 2C) split in two
        gamma = 1 + dgamma
        y = gamma[n, c] * x[n, c, ...] + beta[n, c]

    The ``1 +`` is our choice, not the paper's (Perez et al. predict gamma directly): with the
    Linear's weight and bias at 0 the layer is the identity, and ``zero_init=True`` starts it
    there. ``forward(x, cond)`` with ``x`` (N, C, *spatial), ``cond`` (N, cond_features).
    """

    def __init__(self, cond_features, num_features, zero_init=False, device=None, dtype=None):
        super().__init__()
        self.cond_features = _checks.check_positive_int(cond_features, "cond_features")
        self.num_features = _checks.check_positive_int(num_features, "num_features")
        self.proj = nn.Linear(cond_features, 2 * num_features, device=device, dtype=dtype)
        if _check_bool(zero_init, "zero_init"):
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def extra_repr(self):
        return f"cond_features={self.cond_features}, num_features={self.num_features}"

    def forward(self, input, cond):
        F._check_input(input, "LinearFiLM")
        if input.ndim < 2 or input.shape[1] != self.num_features:
            raise ValueError(f"LinearFiLM was built for num_features={self.num_features}, got an input of "
                             f"shape {tuple(input.shape)}; pass (N, {self.num_features}, *spatial)")
        if not isinstance(cond, torch.Tensor) or cond.ndim != 2 or cond.shape != (input.shape[0], self.cond_features):
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"LinearFiLM expects cond of shape (N, cond_features) = ({input.shape[0]}, "
                             f"{self.cond_features}), got {got}")
        dgamma, beta = self.proj(cond).chunk(2, dim=1)
        return film(input, 1.0 + dgamma, beta)


# ----------------------------------------------------------------------------- FRN + TLU


class TLU(nn.Module):
    r"""Thresholded linear unit (Singh & Krishnan, 2019): ``y = max(x, tau_c)`` with a learned
    per-channel threshold ``tau`` (init 0, so a fresh TLU is ReLU). At a tie the gradient is
    split in half between x and tau (torch.maximum)."""

    def __init__(self, num_features, device=None, dtype=None):
        super().__init__()
        self.num_features = _checks.check_positive_int(num_features, "num_features")
        self.tau = nn.Parameter(torch.zeros(self.num_features, device=device, dtype=dtype))

    def extra_repr(self):
        return f"{self.num_features}"

    def forward(self, input):
        F._check_input(input, "TLU")
        if input.ndim < 2 or input.shape[1] != self.num_features:
            raise ValueError(f"TLU was built for num_features={self.num_features}, got an input of shape "
                             f"{tuple(input.shape)}; pass (N, {self.num_features}, *spatial)")
        return torch.maximum(input, _cview(self.tau, input.ndim, input.dtype))


class FilterResponseNorm(nn.Module):
    r"""Filter Response Normalization with the Thresholded Linear Unit (Singh & Krishnan, 2019,
    "Filter Response Normalization Layer: Eliminating Batch Dependence in the Training of Deep
    Neural Networks", CVPR 2020, Eq. 1-3). Per sample n and channel c, over the spatial values::

        nu2  = mean(x^2)                      (no centering, no batch statistics)
        xhat = x / sqrt(nu2 + eps_eff)
        y    = max(weight_c * xhat + bias_c, tau_c)      (TLU; without it: the affine only)

    ``eps_eff = eps`` by default. With ``learnable_eps=True`` (the paper's remedy for small or
    1x1 activation maps, where nu2 is the square of a single value and ``xhat ~ sign(x)``) a
    scalar parameter ``eps_learned`` (init ``learnable_eps_init``) is learned and
    ``eps_eff = eps + |eps_learned|``: we keep ``eps`` as a fixed positive floor so that the
    learned part can never take the effective epsilon to 0 (our choice). Same for training and
    eval (no state but the parameters). The backward is torch autograd of this forward; it is
    tested against the hand-derived ``normlab.reference.filter_response_norm_backward``.

    The paper's defaults: ``eps=1e-6``; ``weight`` 1, ``bias`` 0, ``tau`` 0 at init.

    Args:
        num_features: C.
        eps: > 0.
        learnable_eps: learn an extra ``eps_learned``.
        learnable_eps_init: its initial value (>= 0).
        tlu: apply the TLU (parameter ``tau``); False: FRN and the affine only.
        affine: learn ``weight`` and ``bias``.
        device, dtype: of the parameters.

    :class:`FilterResponseNorm` takes any ``(N, C, *spatial)``; :class:`FilterResponseNorm2d`
    checks for ``(N, C, H, W)``.

    Example:
        >>> import torch, normlab.nn as nl
        >>> y = nl.FilterResponseNorm2d(3)(torch.randn(2, 3, 4, 4))
        >>> bool((y >= 0).all())          # a fresh TLU (tau = 0) is a ReLU
        True
    """

    _dim = None

    def __init__(self, num_features, eps=1e-6, learnable_eps=False, learnable_eps_init=1e-4, tlu=True,
                 affine=True, device=None, dtype=None):
        super().__init__()
        C = self.num_features = _checks.check_positive_int(num_features, "num_features")
        _checks.check_eps(eps)
        self.eps = float(eps)
        kw = dict(device=device, dtype=dtype)
        _affine_params(self, C, affine, kw)
        self.learnable_eps = _check_bool(learnable_eps, "learnable_eps")
        if learnable_eps:
            init = _checks.check_real(learnable_eps_init, "learnable_eps_init")
            if not (math.isfinite(init) and init >= 0):
                raise ValueError(f"learnable_eps_init must be a finite number >= 0 (the initial learned "
                                 f"part of eps), got learnable_eps_init={learnable_eps_init!r}; the paper "
                                 f"starts it at 1e-4")
            self.eps_learned = nn.Parameter(torch.full((1,), init, **kw))
        else:
            self.register_parameter("eps_learned", None)
        self.tlu = _check_bool(tlu, "tlu")
        if tlu:
            self.tau = nn.Parameter(torch.zeros(C, **kw))
        else:
            self.register_parameter("tau", None)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, learnable_eps={self.learnable_eps}, "
                f"tlu={self.tlu}, affine={self.affine}")

    def effective_eps(self):
        """``eps`` or ``eps + |eps_learned|`` (a tensor when learned)."""
        if self.eps_learned is None:
            return self.eps
        return self.eps + self.eps_learned.abs()

    def forward(self, input):
        _check_input(self, input)
        x = input.to(_compute_dtype(input))
        sp = tuple(range(2, x.ndim))
        nu2 = (x * x).mean(dim=sp, keepdim=True) if sp else x * x               # (N, C, 1..)
        eps = self.effective_eps()
        if isinstance(eps, torch.Tensor):
            eps = eps.to(x.dtype)
        y = _apply_affine(x * torch.rsqrt(nu2 + eps), self)
        if self.tau is not None:
            y = torch.maximum(y, _cview(self.tau, y.ndim, y.dtype))
        return y.to(input.dtype)


class FilterResponseNorm2d(FilterResponseNorm):
    __doc__ = FilterResponseNorm.__doc__ + "\n    Input: (N, C, H, W).\n"
    _dim = 2


# ----------------------------------------------------------------------------- EvoNorm


def _default_groups(C):
    return math.gcd(32, C)


class EvoNormB0(nn.Module):
    r"""EvoNorm-B0 (Liu, Brock, Simonyan & Le, 2020, "Evolving Normalization-Activation
    Layers", NeurIPS, Table 1), a batch-dependent normalization-activation layer::

        y = x / max(sqrt(var_B + eps), v_c * x + sqrt(var_I + eps)) * weight_c + bias_c

    ``var_B``: the biased batch variance of channel c over ``(N, *spatial)`` in training, the
    running variance in eval; ``var_I``: the biased variance of (n, c) over its spatial values;
    ``v`` a learned per-channel vector (init 1). The numerator is ``x``, not ``x - mean``.

    Running variance, as batch norm's: ``running_var = (1 - momentum) * running_var + momentum
    * var_B * M / (M - 1)`` (unbiased, M = N * prod(spatial)), ``momentum=None`` the cumulative
    average, the non-finite policy of docs/reliability.md. (The paper's decay 0.9 is
    ``momentum=0.1``.) There is no running mean: B0 never centers. On an ``(N, C)`` input
    ``var_I`` is the variance of one value, 0. The backward is torch autograd of this forward,
    tested against the hand-derived ``normlab.reference.evonorm_b0_backward``.

    Args:
        num_features: C.
        eps: > 0, inside both square roots.
        momentum: in [0, 1] or None.
        affine: learn ``weight`` (init 1) and ``bias`` (init 0).
        device, dtype: of the parameters and buffers.

    :class:`EvoNormB0` takes any ``(N, C, *spatial)``; :class:`EvoNormB0_2d` checks for
    ``(N, C, H, W)``.
    """

    _dim = None
    nonfinite_policy = None     # see docs/reliability.md

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, device=None, dtype=None):
        super().__init__()
        C = self.num_features = _checks.check_positive_int(num_features, "num_features")
        _checks.check_eps(eps)
        _checks.check_momentum(momentum)
        self.eps, self.momentum = float(eps), momentum
        kw = dict(device=device, dtype=dtype)
        _affine_params(self, C, affine, kw)
        self.v = nn.Parameter(torch.ones(C, **kw))
        self.register_buffer("running_var", torch.ones(C, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def reset_running_stats(self):
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"

    def forward(self, input):
        _check_input(self, input)
        x = input.to(_compute_dtype(input))
        N, C = x.shape[:2]
        sp = tuple(range(2, x.ndim))
        if self.training:
            if N == 0:
                return input.clone()
            count = x.numel() // C
            _checks.check_values_per_channel(count, x.shape, type(self).__name__)
            mu_b, var_b = _mean_var(x, (0,) + sp)                               # (1, C, 1..)
            F._update_running(None, self.running_var, mu_b.detach().reshape(C), var_b.detach().reshape(C),
                              count, self.momentum, owner=self, num_batches_tracked=self.num_batches_tracked)
        else:
            var_b = _cview(self.running_var, x.ndim, x.dtype)
        _, var_i = _mean_var(x, sp)                                             # (N, C, 1..)
        right = _cview(self.v, x.ndim, x.dtype) * x + torch.sqrt(var_i + self.eps)
        y = x / torch.maximum(torch.sqrt(var_b + self.eps), right)
        return _apply_affine(y, self).to(input.dtype)


class EvoNormB0_2d(EvoNormB0):
    __doc__ = EvoNormB0.__doc__ + "\n    Input: (N, C, H, W).\n"
    _dim = 2


class EvoNormS0(nn.Module):
    r"""EvoNorm-S0 (Liu, Brock, Simonyan & Le, 2020, "Evolving Normalization-Activation
    Layers", NeurIPS, Table 1), a batch-independent normalization-activation layer::

        y = x * sigmoid(v_c * x) / sqrt(var_G + eps) * weight_c + bias_c

    ``var_G``: the biased variance of ``x`` (before the sigmoid gate) over the ``C / groups``
    channels of c's group and the spatial values, per sample (group norm's statistic); ``v`` a
    learned per-channel vector (init 1). Same in training and eval (no running statistics).
    The backward is torch autograd of this forward, tested against the hand-derived
    ``normlab.reference.evonorm_s0_backward``.

    Args:
        num_features: C.
        groups: channel groups, must divide C; default ``gcd(32, C)`` (the paper's 32 groups,
            or the largest power of two dividing C when 32 does not).
        eps: > 0.
        affine: learn ``weight`` (init 1) and ``bias`` (init 0).
        device, dtype: of the parameters.

    :class:`EvoNormS0` takes any ``(N, C, *spatial)``; :class:`EvoNormS0_2d` checks for
    ``(N, C, H, W)``.

    Example:
        >>> import torch, normlab.nn as nl
        >>> nl.EvoNormS0_2d(64).groups, nl.EvoNormS0_2d(24).groups
        (32, 8)
    """

    _dim = None

    def __init__(self, num_features, groups=None, eps=1e-5, affine=True, device=None, dtype=None):
        super().__init__()
        C = self.num_features = _checks.check_positive_int(num_features, "num_features")
        G = _default_groups(C) if groups is None else groups
        _checks.check_groups(G, C)
        self.groups = int(G)
        _checks.check_eps(eps)
        self.eps = float(eps)
        kw = dict(device=device, dtype=dtype)
        _affine_params(self, C, affine, kw)
        self.v = nn.Parameter(torch.ones(C, **kw))

    def extra_repr(self):
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}, affine={self.affine}"

    def forward(self, input):
        _check_input(self, input)
        x = input.to(_compute_dtype(input))
        N, C = x.shape[:2]
        xg = x.reshape((N, self.groups, C // self.groups) + tuple(x.shape[2:]))
        _, var = _mean_var(xg, tuple(range(2, xg.ndim)))                        # (N, G, 1, 1..)
        rstd = torch.rsqrt(var + self.eps).expand(xg.shape).reshape(x.shape)    # (N, C, *S)
        y = x * torch.sigmoid(_cview(self.v, x.ndim, x.dtype) * x) * rstd
        return _apply_affine(y, self).to(input.dtype)


class EvoNormS0_2d(EvoNormS0):
    __doc__ = EvoNormS0.__doc__ + "\n    Input: (N, C, H, W).\n"
    _dim = 2


# ----------------------------------------------------------------------------- WS conv


def standardize_weight(weight, eps=1e-5):
    r"""Weight standardization (Qiao, Wang, Liu, Shen & Yuille, 2019, "Micro-Batch Training with
    Batch-Channel Normalization and Weight Standardization", Eq. 5), per output channel o::

        What[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)     (biased var over all but axis 0)

    Computed in at least float32, returned in the weight's dtype; differentiable. Reference:
    ``normlab.reference.weight_standardization_forward/backward``.
    """
    w = weight.to(_compute_dtype(weight))
    var, mean = torch.var_mean(w, dim=tuple(range(1, w.ndim)), correction=0, keepdim=True)
    return ((w - mean) * torch.rsqrt(var + eps)).to(weight.dtype)


class WSConv2d(nn.Conv2d):
    r"""``torch.nn.Conv2d`` whose weight is standardized per output channel at every forward
    (Qiao et al., 2019, weight standardization)::

        y = conv2d(x, standardize_weight(weight, eps), bias)

    Same constructor as ``nn.Conv2d`` plus ``eps`` (> 0, inside the square root), same
    parameters and state_dict keys: an ``nn.Conv2d`` checkpoint loads into it and back (the
    stored ``weight`` is the raw one). Meant for use with GroupNorm at micro-batch sizes
    (the paper's GN + WS), where batch norm's statistics fail.

    Example:
        >>> import torch, normlab.nn as nl
        >>> conv = nl.WSConv2d(3, 8, 3, padding=1)
        >>> conv(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 8, 8, 8])
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, eps=1e-5):
        _checks.check_eps(eps)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device, dtype)
        self.eps = float(eps)

    def extra_repr(self):
        return super().extra_repr() + f", eps={self.eps}"

    def standardized_weight(self):
        return standardize_weight(self.weight, self.eps)

    def forward(self, input):
        return self._conv_forward(input, self.standardized_weight(), self.bias)
