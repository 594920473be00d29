r"""Fused numba kernels for one time step of the layer-normalized LSTM (Ba et al. 2016).

One step of ``normlab.nn.LayerNormLSTM`` (gate order ``i, f, g, o``)::

    a      = h_{t-1} @ W_hh^T                                  (a torch matmul, outside)
    z      = gi + LN(a; g_hh) + b_hh                           gi = LN(W_ih x_t; g_ih) + b_ih, given
    c_t    = sigmoid(z_f) * c_{t-1} + sigmoid(z_i) * tanh(z_g)
    h_t    = sigmoid(z_o) * tanh(LN(c_t; g_c, b_c))

:func:`lnlstm_forward_step` is everything after the matmul, for the ``n`` rows of one step;
:func:`lnlstm_backward_step` is its exact backward (the gradient of the step's inputs ``z``,
``a``, ``c_{t-1}`` and the four LN parameters), leaving the two matmuls of the backward
(``da @ W_hh`` and ``da^T @ h``) to torch as well. ``chunks`` is 1 (LN over all ``4H``
features of ``a``, the paper's form) or 4 (each gate's ``H`` features separately,
``norm_per_gate=True``).

Arrays are 2-D C-contiguous, one row per (step, sequence) in packed layout, of the input's
dtype (float32 or float64); the kernels are told the first row ``r0`` and the row count ``n``
of the step, so the same whole-sequence buffers are passed at every step (no slicing, no
allocation in the Python loop). Statistics are float64 arrays. Inside, every loop runs over a
slice from index 0 (no negative-index wraparound for numba to handle), which is what lets LLVM
vectorize them: the difference measured 2-3x on the backward.

Precision:

* LN statistics (mean, 1/std) of ``a`` and of ``c_t`` are float64, two-pass (mean, then
  squared deviations); the pre-activations ``z`` are formed in float64 and rounded once to the
  dtype. The LN of ``c_t`` is taken of ``c_t`` as stored (rounded to the dtype), as the torch
  path does.
* The nonlinearities are computed in float64 and rounded once: to float64 accuracy (a few
  units in the last place) for float64 input; for float32 with a shorter polynomial (exp to
  degree 8, relative error below 3e-10), which still rounds correctly to float32 but for
  0.01 ulp (tested). torch's float32 sigmoid/tanh measured up to 2 ulp / 0.5 ulp.
* ``c_t = f c_{t-1} + i g``, ``h_t`` and the backward's elementwise products are in the
  dtype's precision (as torch's); the backward recentres with the float64 mean split into a
  (hi, lo) pair in the dtype, ``(c - hi) - lo``. The LN sums of the backward
  (``sum dxhat``, ``sum dxhat xhat``) and the parameter gradients accumulate in float64 arrays,
  rows in a fixed order (one serial kernel per step, steps in reverse order): no races, and
  results do not depend on any thread count.

Nonlinearities are computed here rather than with libm: a scalar ``exp``/``tanh`` call per
element (numba has no vector math library without SVML) measured 6-18 ns per element, as much
as the whole step's matmul at hidden size 256. :func:`_exp_nonpos` is Cephes' range reduction
(``x = n ln2 + r`` with a two-part ``ln2``, ``2^n`` built from its bits) with a Taylor
polynomial in ``r`` (no division); :func:`_tanh` is Cephes' ``tanh`` (a (2,3) rational in
``x^2`` for ``|x| < 0.625``, ``(1 - e)/(1 + e)`` with ``e = exp(-2|x|)`` above, the two
branches sharing one division): branch-free arithmetic the loops vectorize. The one deviation:
``exp(x)`` for ``x < -708.39`` returns 0 (its true value is subnormal), so float64
``sigmoid(x)`` there is 0 instead of a subnormal number.

Fast-math flags as in ``_numba_kernels``: ``contract`` everywhere; ``reassoc`` only on the
row sums (:func:`_sum`, :func:`_dev2`, :func:`_dot`), which lets LLVM split a sum over vector
lanes (summation order may depend on the vector width, never on the thread count). NaN and inf
propagate (no ``nnan``/``ninf``).

All helpers live in this one file: numba's on-disk cache (``cache=True``) is invalidated by
the source file of the cached function only.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

SERIAL = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
REDUCE = dict(SERIAL, fastmath={"reassoc", "contract"})


# ----------------------------------------------------------------------------- bit casts

@intrinsic
def _f64_as_i64(typingctx, x):
    """The bits of a float64 as an int64 (an LLVM bitcast: free, vectorizable)."""
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def _i64_as_f64(typingctx, i):
    """The float64 whose bits are the int64 ``i``."""
    if i != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


# ----------------------------------------------------------------------------- nonlinearities

_LOG2E = 1.4426950408889634
_C1 = 6.93145751953125E-1            # ln 2 = C1 + C2, C1 with few mantissa bits: n*C1 is exact
_C2 = 1.42860682030941723212E-6
_MAGIC = 6755399441055744.0          # 1.5 * 2^52: t = v + MAGIC rounds v to an integer in t's low bits
_XMIN = -708.39                      # exp(_XMIN) ~ 2.2e-308, the smallest normal float64


@njit(**SERIAL)
def _exp_nonpos(x, full):
    """``exp(x)`` for ``x <= 0`` (float64); 0 below ``_XMIN``; NaN -> NaN.

    ``x = n ln2 + r`` (``n`` = round(x / ln 2), ``ln 2 = C1 + C2`` so ``n * C1`` is exact),
    ``exp(r)`` by its Taylor polynomial (``|r| <= ln(2)/2``; no division) times ``2^n`` built
    from its bits. ``full``: to degree 13 (truncation below 2e-17, float64 accuracy); else to
    degree 8 (below 3e-10: float32-grade, for results that are rounded to float32). ``full`` is
    a compile-time constant at every call site, so the unused branch folds away.
    """
    xc = _XMIN if x < _XMIN else x
    t = xc * _LOG2E + _MAGIC
    n = t - _MAGIC                                   # round(x / ln 2), as a float
    ni = _f64_as_i64(t) - _f64_as_i64(_MAGIC)        # the same integer, from t's low bits
    r = (xc - n * _C1) - n * _C2                     # |r| <= ln(2) / 2
    if full:
        p = 1.0 / 6227020800.0
        p = p * r + 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
    else:
        p = 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r * r + r                                # exp(r) - 1, kept apart from the 1
    e = (1.0 + p) * _i64_as_f64((ni + 1023) << 52)   # * 2^n, n in [-1022, 0]
    return 0.0 if x < _XMIN else e


@njit(**SERIAL)
def _sigmoid(x, full):
    """``1 / (1 + exp(-x))`` without overflow or cancellation (float64)."""
    e = _exp_nonpos(-abs(x), full)
    s = 1.0 / (1.0 + e)
    return s if x >= 0.0 else e * s


@njit(**SERIAL)
def _tanh(x, full):
    """``tanh(x)`` (float64), Cephes' algorithm, with one division.

    ``|x| < 0.625``: ``x + x s P(s) / Q(s)``, ``s = x^2`` (a (2, 3) rational);
    otherwise ``sign(x) (1 - e) / (1 + e)``, ``e = exp(-2|x|) <= 0.29`` (no cancellation).
    The numerator and denominator of the branch that applies are selected before dividing.
    """
    a = abs(x)
    s = x * x
    e = _exp_nonpos(-2.0 * a, full)
    num_s = x * s * ((-9.64399179425052238628E-1 * s - 9.92877231001918586564E1) * s
                     - 1.61468768441708447952E3)
    den_s = ((s + 1.12811678491632931402E2) * s + 2.23548839060100448583E3) * s + 4.84406305325125486048E3
    num_b = 1.0 - e
    den_b = 1.0 + e
    num = num_s if a < 0.625 else num_b
    den = den_s if a < 0.625 else den_b
    q = num / den
    res_b = math.copysign(q, x)
    res_s = x if x == 0.0 else x + q                 # tanh(-0.0) = -0.0
    return res_s if a < 0.625 else res_b


def _sigmoid_t(x):
    """sigmoid for the kernels: float64 in, float64 out; float32 in, float32 out (computed in
    float64 with the float32-grade exp, rounded once)."""


def _tanh_t(x):
    """tanh for the kernels, as :func:`_sigmoid_t`."""


def _like(v, ref):
    """``v`` converted to ``ref``'s float type."""


@overload(_sigmoid_t)
def _ov_sigmoid(x):
    if x == types.float32:
        return lambda x: np.float32(_sigmoid(np.float64(x), False))
    return lambda x: _sigmoid(x, True)


@overload(_tanh_t)
def _ov_tanh(x):
    if x == types.float32:
        return lambda x: np.float32(_tanh(np.float64(x), False))
    return lambda x: _tanh(x, True)


@overload(_like)
def _ov_like(v, ref):
    return (lambda v, ref: np.float32(v)) if ref == types.float32 else (lambda v, ref: np.float64(v))


@njit(**SERIAL)
def sigmoid_tanh(x, sig, th):
    """Elementwise ``sig = sigmoid(x)``, ``th = tanh(x)`` on 1-D float32 or float64 arrays, in
    their own precision, as the kernels compute them (for tests)."""
    for k in range(x.shape[0]):
        sig[k] = _sigmoid_t(x[k])
        th[k] = _tanh_t(x[k])


# ----------------------------------------------------------------------------- row sums

@njit(**REDUCE)
def _sum(x, n):
    s = 0.0
    for k in range(n):
        s += np.float64(x[k])
    return s


@njit(**REDUCE)
def _dev2(x, n, m):
    s = 0.0
    for k in range(n):
        d = np.float64(x[k]) - m
        s += d * d
    return s


@njit(**REDUCE)
def _dot(u, v, n):
    s = 0.0
    for k in range(n):
        s += np.float64(u[k]) * np.float64(v[k])
    return s


# ----------------------------------------------------------------------------- the step

@njit(**SERIAL)
def lnlstm_forward_step(A, GI, r0, n, CP, cp0, w_hh, b_hh, w_c, b_c, chunks, eps,
                        STATS, ACT, C, CSTATS, TC, HOUT):
    """Forward of one step, rows ``r0 .. r0+n-1`` (everything after ``a = h_{t-1} @ W_hh^T``).

    In: ``A`` (N, 4H) with ``a`` at the step's rows; ``GI`` (N, 4H) the input term;
    ``CP[cp0 + b]`` the previous cell state of row ``b`` of the step; ``w_hh``, ``b_hh`` (4H,)
    (zeros for no bias); ``w_c``, ``b_c`` (H,); ``chunks`` 1 or 4; ``eps``.
    Out, at the step's rows: ``STATS`` (N, chunks, 2) float64 mean and 1/std of ``a``'s LN;
    ``ACT`` (N, 4H) the activations ``sigmoid(z_i), sigmoid(z_f), tanh(z_g), sigmoid(z_o)``;
    ``C`` (N, H) ``c_t``; ``CSTATS`` (N, 2) float64 mean and 1/std of ``c_t``'s LN; ``TC`` (N, H)
    ``tanh(LN(c_t))``; ``HOUT`` (N, H) ``h_t``.
    """
    G = A.shape[1]
    H = G // 4
    S = G // chunks
    z = np.empty(G, A.dtype)
    for b in range(n):
        r = r0 + b
        for q in range(chunks):
            # slices, so every loop index runs from 0: no negative-index wraparound to handle,
            # which is what lets LLVM vectorize the loops
            a = A[r, q * S:(q + 1) * S]
            gi = GI[r, q * S:(q + 1) * S]
            w = w_hh[q * S:(q + 1) * S]
            bh = b_hh[q * S:(q + 1) * S]
            zq = z[q * S:(q + 1) * S]
            m = _sum(a, S) / S
            rs = 1.0 / math.sqrt(_dev2(a, S, m) / S + eps)
            STATS[r, q, 0] = m
            STATS[r, q, 1] = rs
            for k in range(S):
                zq[k] = np.float64(gi[k]) + ((np.float64(a[k]) - m) * rs * np.float64(w[k]) + np.float64(bh[k]))
        act = ACT[r]
        a_i, a_f, a_g, a_o = act[:H], act[H:2 * H], act[2 * H:3 * H], act[3 * H:]
        z_i, z_f, z_g, z_o = z[:H], z[H:2 * H], z[2 * H:3 * H], z[3 * H:]
        c = C[r]
        cp = CP[cp0 + b]
        for k in range(H):                     # in the dtype's precision from here
            ig = _sigmoid_t(z_i[k])
            fg = _sigmoid_t(z_f[k])
            gg = _tanh_t(z_g[k])
            a_i[k] = ig
            a_f[k] = fg
            a_g[k] = gg
            a_o[k] = _sigmoid_t(z_o[k])
            c[k] = fg * cp[k] + ig * gg
        mc = _sum(c, H) / H
        rsc = 1.0 / math.sqrt(_dev2(c, H, mc) / H + eps)
        CSTATS[r, 0] = mc
        CSTATS[r, 1] = rsc
        tc = TC[r]
        hout = HOUT[r]
        for k in range(H):
            t = _tanh_t(_like((np.float64(c[k]) - mc) * rsc * np.float64(w_c[k]) + np.float64(b_c[k]), z[0]))
            tc[k] = t
            hout[k] = a_o[k] * t


@njit(**SERIAL)
def lnlstm_backward_step(r0, n, DOUT, DH, DC, A, STATS, ACT, CP, cp0, C, CSTATS, TC, w_hh, w_c,
                         chunks, DZ, DA, dw_hh, db_hh, dw_c, db_c):
    """Backward of :func:`lnlstm_forward_step` for rows ``r0 .. r0+n-1``.

    In: ``DOUT[r]`` (N, H) the gradient of ``h_t`` from the layer output; ``DH[b]``, ``DC[b]``
    (B, H) the gradients of ``h_t``, ``c_t`` from later steps (or of the final states); the
    forward's saved arrays. Out: ``DZ`` (N, 4H) the gradient of ``z`` (= of ``gi`` and of
    ``LN(a) + b_hh``) at the step's rows; ``DA[b]`` (B, 4H) the gradient of ``a`` (one step's
    rows: a small buffer that stays in cache); ``DC[b]`` overwritten with the gradient of
    ``c_{t-1}`` (the matmuls are left to the caller: ``DH[:n] = DA[:n] @ W_hh`` and
    ``dW_hh += DA[:n]^T h_{t-1}``).
    ``dw_hh``, ``db_hh`` (4H,), ``dw_c``, ``db_c`` (H,) float64: the step's parameter gradients
    are added to them.
    """
    G = A.shape[1]
    H = G // 4
    S = G // chunks
    dz = np.empty(G, A.dtype)
    u = np.empty(G, A.dtype)
    v = np.empty(G, A.dtype)
    one = _like(1.0, A[0, 0])
    for b in range(n):
        r = r0 + b
        act = ACT[r]
        a_i, a_f, a_g, a_o = act[:H], act[H:2 * H], act[2 * H:3 * H], act[3 * H:]
        d_i, d_f, d_g, d_o = dz[:H], dz[H:2 * H], dz[2 * H:3 * H], dz[3 * H:]
        c = C[r]
        tc = TC[r]
        dout = DOUT[r]
        dh = DH[b]
        dc = DC[b]
        cp = CP[cp0 + b]
        mc = _like(CSTATS[r, 0], one)                 # the mean as a (hi, lo) pair in the dtype:
        mc_lo = _like(CSTATS[r, 0] - mc, one)         # (c - hi) - lo keeps c - mean accurate
        rsc = _like(CSTATS[r, 1], one)
        # h_t = o * tanh(LN(c_t)): gradients of z_o and of LN(c_t)'s normalized value
        for k in range(H):
            g_h = dout[k] + dh[k]
            t = tc[k]
            o = a_o[k]
            chat = ((c[k] - mc) - mc_lo) * rsc
            dcn = g_h * o * (one - t * t)
            dw_c[k] += dcn * chat
            db_c[k] += dcn
            u[k] = dcn * w_c[k]
            v[k] = chat
            d_o[k] = g_h * t * o * (one - o)
        s1 = _like(_sum(u, H) / H, one)
        s2 = _like(_dot(u, v, H) / H, one)
        # c_t = f * c_{t-1} + i * g
        for k in range(H):
            dct = dc[k] + rsc * (u[k] - s1 - v[k] * s2)
            ig = a_i[k]
            fg = a_f[k]
            gg = a_g[k]
            dc[k] = dct * fg
            d_i[k] = dct * gg * ig * (one - ig)
            d_f[k] = dct * cp[k] * fg * (one - fg)
            d_g[k] = dct * ig * (one - gg * gg)
        # z = gi + LN(a; w_hh) + b_hh
        for q in range(chunks):
            lo, hi = q * S, (q + 1) * S
            a, dzq, w = A[r, lo:hi], dz[lo:hi], w_hh[lo:hi]
            dzr, dar = DZ[r, lo:hi], DA[b, lo:hi]
            dwq, dbq, uq, vq = dw_hh[lo:hi], db_hh[lo:hi], u[lo:hi], v[lo:hi]
            m = _like(STATS[r, q, 0], one)
            m_lo = _like(STATS[r, q, 0] - m, one)
            rs = _like(STATS[r, q, 1], one)
            for k in range(S):
                ahat = ((a[k] - m) - m_lo) * rs
                d = dzq[k]
                dzr[k] = d
                dbq[k] += d
                dwq[k] += d * ahat
                uq[k] = d * w[k]
                vq[k] = ahat
            s1 = _like(_sum(uq, S) / S, one)
            s2 = _like(_dot(uq, vq, S) / S, one)
            for k in range(S):
                dar[k] = rs * (uq[k] - s1 - vq[k] * s2)
