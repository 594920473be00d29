r"""The adaptive, conditional and batch-independent variants, the specification (float64).

Every function takes channels-first data ``x`` of shape ``(N, C, *spatial)`` and returns
``(y, cache)``; the matching ``*_backward(dy, cache)`` returns the gradients named in its
docstring. ``sp`` below is the tuple of spatial axes ``(2, ..., ndim - 1)`` (empty for an
``(N, C)`` input: then a "per (n, c)" statistic is over one value, mean ``x`` and variance 0).

Switchable Normalization (Luo, Ren, Peng, Zhang & Li, 2018, "Differentiable Learning-to-
Normalize via Switchable Normalization", ICLR 2019). With the biased statistics of instance
norm (over sp, per (n, c)), layer norm (over C and sp, per n) and batch norm (over N and sp,
per c; the running statistics in inference) and softmax weights of two logit vectors::

    w  = softmax(mean_weight),  w' = softmax(var_weight)          (IN, LN, BN)
    mu = sum_k w_k mu_k,  sigma2 = sum_k w'_k sigma2_k               broadcast to (N, C, 1..)
    y  = weight_c * (x - mu) / sqrt(sigma2 + eps) + bias_c

On an ``(N, C)`` input there is no instance statistic (one value); as in the authors'
SwitchNorm1d only LN and BN are mixed, with the softmax over the last two logits.
Backward, ``g = dy * weight_c``, ``r = 1/sqrt(sigma2 + eps)``, ``xhat = (x - mu) * r``::

    dL/dmu     = -sum_sp(g) * r                        (N, C, 1..); mu and sigma2 are separate
    dL/dsigma2 = -1/2 * sum_sp(g * xhat) * r^2         functions of x, so no term vanishes
    dx = g * r + sum_k [ w_k  * S_k(dL/dmu) / M_k
                       + w'_k * S_k(dL/dsigma2) * 2 (x - mu_k) / M_k ]
    dmean_weight = softmax_backward(w,  [sum(dL/dmu * mu_k)]_k)
    dvar_weight  = softmax_backward(w', [sum(dL/dsigma2 * sigma2_k)]_k)

where ``S_k`` sums over the (n, c) positions that share statistic k (none for IN, C for LN,
N for BN), ``M_k`` is its count of values, ``softmax_backward(w, d) = w * (d - sum(w * d))``;
in inference the BN term of dx is absent (running statistics are constants).

AdaIN (Huang & Belongie, 2017, "Arbitrary Style Transfer in Real-time with Adaptive Instance
Normalization", ICCV), per (n, c), biased statistics over each tensor's own spatial axes::

    y = sigma(s) * (c - mu(c)) / sigma(c) + mu(s),   sigma(t) = sqrt(var(t) + eps)
    dc = instance-norm backward of g = dy * sigma(s)     (centered_backward over sp)
    ds = sum_sp(dy) / M_s + sum_sp(dy * chat) * (s - mu(s)) / (M_s * sigma(s))

Conditional batch norm (de Vries et al., 2017, "Modulating early visual processing by
language"; class-conditional form as in Miyato & Koyama, 2018, "cGANs with Projection
Discriminator"): batch norm without affine, then the affine row of the sample's class::

    y[n] = xhat[n] * gamma[label_n] + beta[label_n]
    dx = batch-norm backward of g = dy * gamma[label_n] (training; g * rstd with given stats)
    dgamma[k] = sum over {n: label_n = k}, sp of dy * xhat,  dbeta[k] likewise of dy

FiLM (Perez, Strub, de Vries, Dumoulin & Courville, 2018, "FiLM: Visual Reasoning with a
General Conditioning Layer", AAAI), per-(n, c) conditioning broadcast over sp::

    y = gamma[n, c] * x + beta[n, c];  dx = dy * gamma,  dgamma = sum_sp(dy * x),  dbeta = sum_sp(dy)

Filter Response Normalization with the Thresholded Linear Unit (Singh & Krishnan, 2019,
"Filter Response Normalization Layer: Eliminating Batch Dependence in the Training of Deep
Neural Networks", CVPR 2020), per (n, c)::

    nu2 = mean_sp(x^2),  r = 1/sqrt(nu2 + eps),  xhat = x * r
    z = weight_c * xhat + bias_c,  y = max(z, tau_c)
    dz = dy * [z > tau] (1/2 at a tie, as torch.maximum),  dtau_c = sum(dy - dz)
    dx = r * (g - xhat * mean_sp(g * xhat)),  g = dz * weight_c      (uncentered backward)
    deps = -1/2 * sum(g * xhat * r^2)                                  (one scalar)

EvoNorm-B0 and EvoNorm-S0 (Liu, Brock, Simonyan & Le, 2020, "Evolving Normalization-
Activation Layers", NeurIPS), with ``v`` a learned per-channel vector::

    B0:  y = x / max(sqrt(var_B + eps), v * x + sqrt(var_I + eps)) * weight + bias
         var_B: biased batch variance over (N, sp) per channel (running variance in
         inference), var_I: biased variance over sp per (n, c). Not centered: x, not x - mu.
    S0:  y = x * sigmoid(v * x) / sqrt(var_G + eps) * weight + bias
         var_G: biased variance of x over the C/G channels of a group and sp, per (n, group).

Backward of B0 with ``D = max(L, R)``, ``q = -g * x / D^2`` split into ``q_L``, ``q_R`` by which
side is the max (half each at a tie)::

    dx = g / D + v * q_R + (x - mu_I) / (M_I * s_I) * sum_sp(q_R)
                         + (x - mu_B) / (M_B * L) * sum_{N, sp}(q_L)   (training only)
    dv = sum_{N, sp}(q_R * x)

Backward of S0 with ``a = x * sigmoid(v x)``, ``h = a * r_G``, ``xhat = (x - mu_G) * r_G``::

    dx = r_G * (g * (sig + v x sig (1 - sig)) - xhat * mean_G(g * h))
    dv = sum_{N, sp}(g * r_G * x^2 * sig * (1 - sig))

Weight Standardization (Qiao, Wang, Liu, Shen & Yuille, 2019, "Micro-Batch Training with
Batch-Channel Normalization and Weight Standardization"), per output channel o of a conv
weight ``W`` of shape ``(O, I/groups, *kernel)``::

    What = (W - mean_o(W)) / sqrt(var_o(W) + eps)       (biased variance over I/groups x kernel)
    dW   = r * (dWhat - mean(dWhat) - What * mean(dWhat * What))   (layer norm's backward)
"""

from __future__ import annotations

import numpy as np

from .. import _checks
from ._core import (affine, as_f64, centered_backward, centered_forward, channel_view,
                    uncentered_backward, uncentered_forward)
from .moments import moments

__all__ = ["switchable_norm_forward", "switchable_norm_backward",
           "adain_forward", "adain_backward",
           "conditional_batch_norm_forward", "conditional_batch_norm_backward",
           "film_forward", "film_backward",
           "filter_response_norm_forward", "filter_response_norm_backward",
           "evonorm_b0_forward", "evonorm_b0_backward",
           "evonorm_s0_forward", "evonorm_s0_backward",
           "weight_standardization_forward", "weight_standardization_backward"]


def _sp(ndim):
    return tuple(range(2, ndim))


def _x(x, what):
    x = as_f64(x)
    _checks.check_min_ndim(x, 2, what, "(N, C, *spatial)")
    return x


def _check_params(C, **vectors):
    for name, v in vectors.items():
        _checks.check_vector(v, C, name)


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _softmax_backward(w, d):
    return w * (d - np.sum(w * d))


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))     # = 1 / (1 + exp(-z)), without overflow


def _reduce_to(t, shape):
    """Sum ``t`` over the axes where ``shape`` has 1 and ``t`` does not (broadcast backward)."""
    axes = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1)
    return t.sum(axis=axes, keepdims=True) if axes else t


# ----------------------------------------------------------------------------- Switchable Norm


def switchable_norm_forward(x, mean_weight, var_weight, weight=None, bias=None, *,
                            running_mean=None, running_var=None, eps: float = 1e-5):
    """Switchable norm forward. Training (batch statistics for the BN term) unless
    ``running_mean``/``running_var`` are given. ``cache["bn_mean"]``, ``cache["bn_var"]`` (C,),
    ``cache["count"]`` are the batch statistics for the running update."""
    x = _x(x, "switchable_norm")
    _checks.check_eps(eps)
    _checks.check_stats_pair(running_mean, running_var, "switchable_norm")
    N, C = x.shape[:2]
    _check_params(C, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    for name, v in (("mean_weight", mean_weight), ("var_weight", var_weight)):
        _checks.check_param_shape(v, (3,), name)
    sp = _sp(x.ndim)
    training = running_mean is None
    count = x.size // C if C else 0
    if training:
        _checks.check_values_per_channel(count, x.shape, "switchable_norm")
    mu_in, var_in = moments(x, sp)                                  # (N, C, 1..)
    mu_ln, var_ln = moments(x, (1,) + sp)                           # (N, 1, 1..)
    if training:
        mu_bn, var_bn = moments(x, (0,) + sp)                       # (1, C, 1..)
    else:
        mu_bn = channel_view(running_mean, x.ndim)
        var_bn = channel_view(running_var, x.ndim)
    comps = [("in", mu_in, var_in, sp), ("ln", mu_ln, var_ln, (1,) + sp), ("bn", mu_bn, var_bn, (0,) + sp)]
    idx = [0, 1, 2] if sp else [1, 2]                               # no IN term on (N, C) input
    comps = [comps[i] for i in idx]
    wm = _softmax(as_f64(mean_weight)[idx])                         # (K,)
    wv = _softmax(as_f64(var_weight)[idx])                          # (K,)
    mu = sum(w * c[1] for w, c in zip(wm, comps))                   # (N, C, 1..)
    var = sum(w * c[2] for w, c in zip(wv, comps))                  # (N, C, 1..)
    rstd = 1.0 / np.sqrt(var + eps)                                 # (N, C, 1..)
    xhat = (x - mu) * rstd                                          # (N, C, *S)
    y = affine(xhat, weight, bias, x.ndim)
    cache = dict(x=x, xhat=xhat, rstd=rstd, comps=comps, idx=idx, wm=wm, wv=wv, training=training,
                 weight=None if weight is None else as_f64(weight), has_bias=bias is not None,
                 bn_mean=mu_bn.reshape(C), bn_var=var_bn.reshape(C), count=count)
    return y, cache


def switchable_norm_backward(dy, cache):
    """``(dx, dmean_weight, dvar_weight, dweight, dbias)``; dmean_weight/dvar_weight are (3,)."""
    dy = as_f64(dy)
    x, xhat, rstd, w = cache["x"], cache["xhat"], cache["rstd"], cache["weight"]
    sp = _sp(x.ndim)
    g = dy if w is None else dy * channel_view(w, dy.ndim)
    dmu = -(g.sum(axis=sp, keepdims=True)) * rstd                          # (N, C, 1..)
    dvar = -0.5 * (g * xhat).sum(axis=sp, keepdims=True) * rstd ** 2       # (N, C, 1..)
    dx = g * rstd
    dwm = np.zeros(len(cache["idx"]))
    dwv = np.zeros(len(cache["idx"]))
    for k, (name, mu_k, var_k, axes_k) in enumerate(cache["comps"]):
        dwm[k] = np.sum(dmu * mu_k)
        dwv[k] = np.sum(dvar * var_k)
        if name == "bn" and not cache["training"]:
            continue                                                       # constants in inference
        M_k = int(np.prod([x.shape[a] for a in axes_k]))
        dx = dx + cache["wm"][k] * _reduce_to(dmu, mu_k.shape) / M_k
        dx = dx + cache["wv"][k] * _reduce_to(dvar, var_k.shape) * 2.0 * (x - mu_k) / M_k
    dmean_weight = np.zeros(3)
    dvar_weight = np.zeros(3)
    dmean_weight[cache["idx"]] = _softmax_backward(cache["wm"], dwm)
    dvar_weight[cache["idx"]] = _softmax_backward(cache["wv"], dwv)
    axes = (0,) + sp
    dweight = None if w is None else (dy * xhat).sum(axis=axes)
    dbias = dy.sum(axis=axes) if cache["has_bias"] else None
    return dx, dmean_weight, dvar_weight, dweight, dbias


# ----------------------------------------------------------------------------- AdaIN


def adain_forward(content, style, *, eps: float = 1e-5):
    """AdaIN forward: ``content`` (N, C, *S), ``style`` (N, C, *S') with the same N and C."""
    c = _x(content, "adain")
    s = _x(style, "adain")
    _checks.check_eps(eps)
    if c.ndim < 3 or s.ndim < 3 or c.shape[:2] != s.shape[:2]:
        raise ValueError(f"adain needs content (N, C, *spatial) and style (N, C, *spatial') with the same "
                         f"N and C, got shapes {c.shape} and {s.shape}")
    chat, mu_c, var_c, rstd_c = centered_forward(c, _sp(c.ndim), eps)   # (N, C, *S), (N, C, 1..) x3
    mu_s, var_s = moments(s, _sp(s.ndim))                              # (N, C, 1..)
    sigma_s = np.sqrt(var_s + eps)                                     # (N, C, 1..)
    shape = c.shape[:2] + (1,) * (c.ndim - 2)
    y = chat * sigma_s.reshape(shape) + mu_s.reshape(shape)            # (N, C, *S)
    cache = dict(chat=chat, rstd_c=rstd_c, s=s, mu_s=mu_s, sigma_s=sigma_s, shape=shape)
    return y, cache


def adain_backward(dy, cache):
    """``(dcontent, dstyle)``."""
    dy = as_f64(dy)
    chat, sh = cache["chat"], cache["shape"]
    s, mu_s, sigma_s = cache["s"], cache["mu_s"], cache["sigma_s"]
    sp_c, sp_s = _sp(dy.ndim), _sp(s.ndim)
    dcontent = centered_backward(dy * sigma_s.reshape(sh), chat, cache["rstd_c"], sp_c)
    M_s = int(np.prod([s.shape[a] for a in sp_s]))
    dmu_s = dy.sum(axis=sp_c).reshape(mu_s.shape)                      # (N, C, 1..) of style
    dsigma_s = (dy * chat).sum(axis=sp_c).reshape(mu_s.shape)
    dstyle = dmu_s / M_s + dsigma_s * (s - mu_s) / (M_s * sigma_s)
    return dcontent, dstyle


# ----------------------------------------------------------------------------- conditional BN


def conditional_batch_norm_forward(x, labels, gamma, beta, *, mean=None, var=None, eps: float = 1e-5):
    """Class-conditional batch norm: ``gamma``, ``beta`` of shape (num_classes, C), ``labels``
    (N,) integers. Batch statistics unless ``mean``/``var`` (C,) are given."""
    x = _x(x, "conditional_batch_norm")
    _checks.check_eps(eps)
    _checks.check_stats_pair(mean, var, "conditional_batch_norm")
    N, C = x.shape[:2]
    labels = np.asarray(labels)
    gamma, beta = as_f64(gamma), as_f64(beta)
    if gamma.ndim != 2 or gamma.shape[1] != C or beta.shape != gamma.shape:
        raise ValueError(f"gamma and beta must have shape (num_classes, {C}), got {gamma.shape} and {beta.shape}")
    if labels.shape != (N,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {N} integers, got shape {labels.shape} of dtype {labels.dtype}")
    if N and (labels.min() < 0 or labels.max() >= gamma.shape[0]):
        raise ValueError(f"labels must be in [0, {gamma.shape[0]}), got values in [{labels.min()}, {labels.max()}]")
    sp = _sp(x.ndim)
    axes = (0,) + sp
    if mean is None:
        _checks.check_values_per_channel(x.size // C, x.shape, "conditional_batch_norm")
        xhat, mu, v, rstd = centered_forward(x, axes, eps)             # (N, C, *S), (1, C, 1..) x3
    else:
        rstd = 1.0 / np.sqrt(channel_view(var, x.ndim) + eps)          # (1, C, 1..)
        xhat = (x - channel_view(mean, x.ndim)) * rstd
    shape = (N, C) + (1,) * len(sp)
    gam = gamma[labels].reshape(shape)                                 # (N, C, 1..)
    bet = beta[labels].reshape(shape)
    y = xhat * gam + bet
    cache = dict(xhat=xhat, rstd=rstd, gam=gam, labels=labels, K=gamma.shape[0], axes=axes,
                 training=mean is None)
    return y, cache


def conditional_batch_norm_backward(dy, cache):
    """``(dx, dgamma, dbeta)``; dgamma/dbeta have the table's shape (num_classes, C)."""
    dy = as_f64(dy)
    xhat, rstd, axes = cache["xhat"], cache["rstd"], cache["axes"]
    g = dy * cache["gam"]
    dx = centered_backward(g, xhat, rstd, axes) if cache["training"] else g * rstd
    sp = _sp(dy.ndim)
    C = dy.shape[1]
    dgamma = np.zeros((cache["K"], C))
    dbeta = np.zeros((cache["K"], C))
    np.add.at(dgamma, cache["labels"], (dy * xhat).sum(axis=sp).reshape(-1, C))
    np.add.at(dbeta, cache["labels"], dy.sum(axis=sp).reshape(-1, C))
    return dx, dgamma, dbeta


# ----------------------------------------------------------------------------- FiLM


def film_forward(x, gamma, beta):
    """FiLM: ``gamma``, ``beta`` (N, C) broadcast over the spatial axes of ``x`` (N, C, *S)."""
    x = _x(x, "film")
    gamma, beta = as_f64(gamma), as_f64(beta)
    if gamma.shape != x.shape[:2] or beta.shape != x.shape[:2]:
        raise ValueError(f"film needs gamma and beta of shape {x.shape[:2]} (N, C), got {gamma.shape} and {beta.shape}")
    shape = x.shape[:2] + (1,) * (x.ndim - 2)
    y = x * gamma.reshape(shape) + beta.reshape(shape)
    return y, dict(x=x, gamma=gamma.reshape(shape))


def film_backward(dy, cache):
    """``(dx, dgamma, dbeta)``, dgamma/dbeta (N, C)."""
    dy = as_f64(dy)
    sp = _sp(dy.ndim)
    N, C = dy.shape[:2]
    return (dy * cache["gamma"], (dy * cache["x"]).sum(axis=sp).reshape(N, C),
            dy.sum(axis=sp).reshape(N, C))


# ----------------------------------------------------------------------------- FRN + TLU


def filter_response_norm_forward(x, weight=None, bias=None, tau=None, *, eps: float = 1e-6):
    """FRN (+ TLU when ``tau`` is given). ``eps`` is the effective epsilon (for a learned one,
    the value the module computes from its parameter)."""
    x = _x(x, "filter_response_norm")
    _checks.check_eps(eps)
    C = x.shape[1]
    _check_params(C, weight=weight, bias=bias, tau=tau)
    sp = _sp(x.ndim)
    xhat, nu2, rstd = uncentered_forward(x, sp, eps)                   # (N, C, *S), (N, C, 1..) x2
    z = affine(xhat, weight, bias, x.ndim)                             # (N, C, *S)
    if tau is None:
        y, mask = z, None
    else:
        t = channel_view(tau, x.ndim)
        y = np.maximum(z, t)
        mask = np.where(z > t, 1.0, np.where(z == t, 0.5, 0.0))        # dy/dz
    cache = dict(xhat=xhat, rstd=rstd, mask=mask, weight=None if weight is None else as_f64(weight),
                 has_bias=bias is not None)
    return y, cache


def filter_response_norm_backward(dy, cache):
    """``(dx, dweight, dbias, dtau, deps)``; deps is the scalar gradient of the effective eps."""
    dy = as_f64(dy)
    sp = _sp(dy.ndim)
    axes = (0,) + sp
    xhat, rstd, w, mask = cache["xhat"], cache["rstd"], cache["weight"], cache["mask"]
    dz = dy if mask is None else dy * mask
    dtau = None if mask is None else (dy - dz).sum(axis=axes)
    g = dz if w is None else dz * channel_view(w, dy.ndim)
    dx = uncentered_backward(g, xhat, rstd, sp)
    deps = float(-0.5 * np.sum(g * xhat * rstd ** 2))
    dweight = None if w is None else (dz * xhat).sum(axis=axes)
    dbias = dz.sum(axis=axes) if cache["has_bias"] else None
    return dx, dweight, dbias, dtau, deps


# ----------------------------------------------------------------------------- EvoNorm


def evonorm_b0_forward(x, v, weight=None, bias=None, *, running_var=None, eps: float = 1e-5):
    """EvoNorm-B0. Training (batch variance) unless ``running_var`` (C,) is given;
    ``cache["var"]`` (C,) and ``cache["count"]`` feed the running update."""
    x = _x(x, "evonorm_b0")
    _checks.check_eps(eps)
    C = x.shape[1]
    _check_params(C, v=v, weight=weight, bias=bias, running_var=running_var)
    sp = _sp(x.ndim)
    bax = (0,) + sp
    training = running_var is None
    count = x.size // C if C else 0
    if training:
        _checks.check_values_per_channel(count, x.shape, "evonorm_b0")
        mu_b, var_b = moments(x, bax)                                  # (1, C, 1..)
    else:
        mu_b, var_b = None, channel_view(running_var, x.ndim)
    L = np.sqrt(var_b + eps)                                           # (1, C, 1..)
    mu_i, var_i = moments(x, sp)                                       # (N, C, 1..)
    s_i = np.sqrt(var_i + eps)                                         # (N, C, 1..)
    vv = channel_view(v, x.ndim)
    R = vv * x + s_i                                                   # (N, C, *S)
    D = np.maximum(L, R)                                               # (N, C, *S)
    z = x / D
    y = affine(z, weight, bias, x.ndim)
    cache = dict(x=x, z=z, D=D, L=L, R=R, v=vv, mu_b=mu_b, mu_i=mu_i, s_i=s_i, training=training,
                 weight=None if weight is None else as_f64(weight), has_bias=bias is not None,
                 mean=None if mu_b is None else mu_b.reshape(C), var=var_b.reshape(C), count=count)
    return y, cache


def evonorm_b0_backward(dy, cache):
    """``(dx, dv, dweight, dbias)``."""
    dy = as_f64(dy)
    x, D, L, R, w = cache["x"], cache["D"], cache["L"], cache["R"], cache["weight"]
    sp = _sp(x.ndim)
    bax = (0,) + sp
    g = dy if w is None else dy * channel_view(w, dy.ndim)
    q = -g * x / D ** 2                                                # dL/dD
    mL = np.where(L > R, 1.0, np.where(L == R, 0.5, 0.0))
    qL, qR = q * mL, q * (1.0 - mL)
    M_i = int(np.prod([x.shape[a] for a in sp]))
    dx = g / D + cache["v"] * qR + (x - cache["mu_i"]) / (M_i * cache["s_i"]) * qR.sum(axis=sp, keepdims=True)
    if cache["training"]:
        M_b = cache["count"]
        dx = dx + (x - cache["mu_b"]) / (M_b * L) * qL.sum(axis=bax, keepdims=True)
    dv = (qR * x).sum(axis=bax)
    dweight = None if w is None else (dy * cache["z"]).sum(axis=bax)
    dbias = dy.sum(axis=bax) if cache["has_bias"] else None
    return dx, dv, dweight, dbias


def evonorm_s0_forward(x, v, weight=None, bias=None, *, groups: int, eps: float = 1e-5):
    """EvoNorm-S0 with ``groups`` channel groups (must divide C)."""
    x = _x(x, "evonorm_s0")
    _checks.check_eps(eps)
    N, C = x.shape[:2]
    _checks.check_groups(groups, C)
    _check_params(C, v=v, weight=weight, bias=bias)
    xg = x.reshape((N, groups, C // groups) + x.shape[2:])             # (N, G, C/G, *S)
    gax = tuple(range(2, xg.ndim))
    mu, var = moments(xg, gax)                                         # (N, G, 1, 1..)
    rstd = 1.0 / np.sqrt(var + eps)                                    # (N, G, 1, 1..)
    xhat = ((xg - mu) * rstd).reshape(x.shape)                         # (N, C, *S)
    r = np.broadcast_to(rstd, xg.shape).reshape(x.shape)               # (N, C, *S)
    vv = channel_view(v, x.ndim)
    sig = _sigmoid(vv * x)
    h = x * sig * r                                                    # (N, C, *S)
    y = affine(h, weight, bias, x.ndim)
    cache = dict(x=x, h=h, r=r, xhat=xhat, sig=sig, v=vv, groups=groups,
                 weight=None if weight is None else as_f64(weight), has_bias=bias is not None)
    return y, cache


def evonorm_s0_backward(dy, cache):
    """``(dx, dv, dweight, dbias)``."""
    dy = as_f64(dy)
    x, h, r, xhat, sig, vv, w = (cache[k] for k in ("x", "h", "r", "xhat", "sig", "v", "weight"))
    N, C = x.shape[:2]
    G = cache["groups"]
    sp = _sp(x.ndim)
    bax = (0,) + sp
    g = dy if w is None else dy * channel_view(w, dy.ndim)
    gh = (g * h).reshape((N, G, C // G) + x.shape[2:])
    mean_gh = gh.mean(axis=tuple(range(2, gh.ndim)), keepdims=True)
    mean_gh = np.broadcast_to(mean_gh, gh.shape).reshape(x.shape)      # (N, C, *S)
    dsig = sig + vv * x * sig * (1.0 - sig)                            # d(x * sig(v x)) / dx
    dx = r * (g * dsig - xhat * mean_gh)
    dv = (g * r * x * x * sig * (1.0 - sig)).sum(axis=bax)
    dweight = None if w is None else (dy * h).sum(axis=bax)
    dbias = dy.sum(axis=bax) if cache["has_bias"] else None
    return dx, dv, dweight, dbias


# ----------------------------------------------------------------------------- Weight Standardization


def weight_standardization_forward(w, *, eps: float = 1e-5):
    """Standardize a conv/linear weight (O, ...) per output channel: ``(What, cache)``."""
    w = as_f64(w)
    if w.ndim < 2:
        raise ValueError(f"weight_standardization needs a weight of shape (out_channels, ...), got shape {w.shape}")
    _checks.check_eps(eps)
    axes = tuple(range(1, w.ndim))
    what, mean, var, rstd = centered_forward(w, axes, eps)             # (O, ...), (O, 1..) x3
    return what, dict(what=what, rstd=rstd, axes=axes, mean=mean.reshape(-1), var=var.reshape(-1))


def weight_standardization_backward(dwhat, cache):
    """``dW`` from the gradient of the standardized weight."""
    return centered_backward(as_f64(dwhat), cache["what"], cache["rstd"], cache["axes"])
