r"""The numba kernels: two memory patterns, each with forward-train, forward-from-statistics and
backward, centered and uncentered.

* **row** (``row_elem_*``, ``row_seg_*``): the values of one statistic are contiguous. A row is
  read from memory once, its statistics computed and the row normalized while it is in cache.
  LayerNorm/RMSNorm (per-element affine), GroupNorm/InstanceNorm on (N, C, *S) and BatchNorm's
  (n, c) planes (per-segment affine).
* **column** (``col_*``): the channel stays, the reduced values are strided. BatchNorm on
  (N, *S, C) and (N, C) (and (N, C, inner) with small inner), GroupNorm/InstanceNorm on
  (N, *S, C). Vectorized across channels.

The arrays are flat 1-D views with the shape passed as integers, the per-channel parameters
float64 or x's dtype as documented per kernel, so each kernel compiles exactly once per input
dtype (float32, float64). The work partition (tasks) is fixed by the shape, never by the
thread count, so results do not depend on the number of threads.

Statistics accumulate in float64 whatever the input dtype (float32 values and their products
convert exactly). Moments are taken per cache-sized block and blocks merge with Chan's formula::

    n = n_a + n_b,  delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n,  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n

Within a block, one sweep sums ``d = x - s`` and ``d^2`` about a *shift* ``s``, the mean of the
block's first few values (per column for the column kernels, which sweep chunks wider than
``SWEEP_LANES_MAX`` lanes in strips of that many; rows shorter than ``SWEEP_ROW_MIN`` values
are always two-pass, see there): ``mean = s + sum(d) / n``,
``M2 = sum(d^2) - sum(d)^2 / n``. The subtraction loses ``log2(sum(d^2) / M2)`` bits, a fraction
of one when ``s`` is near the block's mean, however large the common offset (mean 1e4, std 1
loses nothing). A block (a column of a chunk) whose shift lies far out (``M2 < sum(d^2) / 16``,
more than 4 bits), or whose sums are not finite, is redone two-pass: mean first, then the
squared deviations from it, re-read from L1/L2 (the reference's algorithm). Both branches depend
on the data only, never on the thread count.

Normalization subtracts the mean as a (hi, lo) pair in x's dtype, ``(x - mh) - ml``: x - mh is
exact near the mean, so an offset of 1e4 costs float32 no digits of xhat. Where the affine is
per segment or channel (BatchNorm, GroupNorm, InstanceNorm forward) the low part is folded into
the shift instead, ``y = (x - mh) * a + (b - ml * a)`` (``seg_affine``): one subtraction less
per element, same accuracy (tested against the float64 reference at offset 1e4).

Two kinds of reduction loop, and the fast-math flags each may use:

* **column blocks** (``acc_*``): ``nr`` rows of ``w`` contiguous values, ``ld`` apart; one
  float64 accumulator per column, ``acc[k] += f(x[start + r*ld + k])``. Each column is its own
  sum, so the loop vectorizes across columns with no reassociation: the summation order is
  fixed by the code (identical on every machine).
* **row sums** (``row_*``): one contiguous run summed to a scalar. These loops alone are
  compiled with ``reassoc``, which lets LLVM split the sum over vector lanes. What that may
  change is the order in which the float64 terms are added, i.e. rounding; the terms
  themselves cannot change: ``x - m`` feeds a multiplication (an opaque operand for the
  reassociation of the sum), and where it is summed directly (``row_bwd_sums``) a regrouping
  ``(s + x) - m`` rounds at the scale of ``|x|``, keeping ``sum(x - m) / n`` within about one
  unit in the last place of the mean. Their order may depend on the vector width of the
  machine, never on the thread count.

Everywhere else the only flag is ``contract`` (a*b + c may become one fused multiply-add: at
most one rounding of difference, never a lower precision). No ``nnan``/``ninf``: NaN and inf
propagate as in the reference.

All kernels live in this one file on purpose: numba's on-disk cache is invalidated by the
source file of the cached function only, so a helper changed in another file would leave stale
machine code behind in the kernels that inline it.
"""

from __future__ import annotations

import types

import numpy as np
from numba import njit, prange

#: elements per block of the blockwise row moments (16-32 KiB: stays in L1)
BLOCK = 4096
#: a block's one-sweep moments are kept when ``M2 >= SHIFT_KEEP * sum(d^2)`` (at most 4 bits lost
#: to the subtraction); otherwise, or when not finite, the block is redone two-pass
SHIFT_KEEP = 1.0 / 16.0
#: the shift is the mean of a block's first SHIFT_FROM values (of a column's first rows): half a
#: standard deviation from the mean on average, so the two-pass redo is rare (Gaussian data: a
#: shift 3.9 standard deviations out, about 1e-14)
SHIFT_FROM = 4
#: column kernels: the one sweep runs over at most this many lanes at a time; wider chunks sweep
#: in strips (pass 1 alone, float32, 2 threads, against two passes: 1.1-1.5x as fast at 64-512
#: lanes, 0.6-0.7x over whole chunks of 1024 and 2048 lanes, 1.15-1.2x in strips of 512)
SWEEP_LANES_MAX = 512
#: row kernels: rows shorter than this take the two-pass moments (sum, then squared deviations,
#: the second pass from L1), which measured faster than the one sweep there and slower above
#: (moments alone, float32, one thread, rows x values: 2048x64 20 against 66 us, 8192x49 191
#: against 306, 512x196 18 against 27, 16384x512 1845 against 2468; 8192x1024 2582 against
#: 1937, 2048x4096 2138 against 1281)
SWEEP_ROW_MIN = 1024

SERIAL = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
PARALLEL = dict(SERIAL, parallel=True)
REDUCE = dict(SERIAL, fastmath={"reassoc", "contract"})
#: small helpers (the row kernels' per-segment ones, ``rows4``), inlined into their caller at
#: numba's IR level: as calls they cost 10-20 ns each (array slices and their reference
#: counts), as much as the work on a segment of 16 values. GroupNorm training forward, one
#: thread, called and inlined: 8x64x4x4 G=32 (512 segments of 16) 17.9 against 13.2 us,
#: 32x64x3x3 G=32 (2048 of 9) 71 against 49 us; bit-identical (the callers have these helpers'
#: flags). Reductions (``REDUCE``) stay calls: inlined they would take the caller's flags and
#: lose ``reassoc``
INLINE = dict(SERIAL, inline="always")


# Where the rows of a chunk are not contiguous (a tile narrower than x's rows, ``ld > w``), the
# column accumulators take four rows per pass over ``acc``: ``acc[k] = (((acc[k] + t0) + t1) +
# t2) + t3`` adds the same terms in the same order as four passes of ``acc[k] += t`` (results
# are bit-identical to one row at a time) with a quarter of the loads and stores of ``acc``,
# which bound these loops there: 1.3-1.5x faster on tiles of 64 x 1024 float32 values of
# 2048-wide rows streamed from memory. A contiguous chunk (``ld == w``) is read one row at a
# time: four interleaved rows 1 KiB apart measured 0.6-0.75x as fast from memory (the
# prefetchers follow one stream better than four).

@njit(**INLINE)
def rows4(x, o, ld, w):
    """The four rows of ``w`` values at ``x[o]``, ``ld`` apart (views)."""
    return (x[o:o + w], x[o + ld:o + ld + w], x[o + 2 * ld:o + 2 * ld + w],
            x[o + 3 * ld:o + 3 * ld + w])


@njit(**SERIAL)
def acc_sum(x, start, nr, ld, w, acc):
    """``acc[k] += sum_r x[start + r*ld + k]`` in float64."""
    r = 0
    while r + 4 <= nr and ld > w:
        o = start + r * ld
        s0, s1, s2, s3 = rows4(x, o, ld, w)
        for k in range(w):
            acc[k] = (((acc[k] + s0[k]) + s1[k]) + s2[k]) + s3[k]
        r += 4
    for r in range(r, nr):
        o = start + r * ld
        seg = x[o:o + w]
        for k in range(w):
            acc[k] += seg[k]


@njit(**SERIAL)
def acc_shifted(x, start, nr, ld, w, sh, a1, a2):
    """``a1[k] += sum_r d``, ``a2[k] += sum_r d^2`` with ``d = x[start + r*ld + k] - sh[k]``, in
    float64."""
    r = 0
    while r + 4 <= nr and ld > w:
        o = start + r * ld
        s0, s1, s2, s3 = rows4(x, o, ld, w)
        for k in range(w):
            m = sh[k]
            d0 = np.float64(s0[k]) - m
            d1 = np.float64(s1[k]) - m
            d2 = np.float64(s2[k]) - m
            d3 = np.float64(s3[k]) - m
            a1[k] = (((a1[k] + d0) + d1) + d2) + d3
            a2[k] = (((a2[k] + d0 * d0) + d1 * d1) + d2 * d2) + d3 * d3
        r += 4
    for r in range(r, nr):
        o = start + r * ld
        seg = x[o:o + w]
        for k in range(w):
            d = np.float64(seg[k]) - sh[k]
            a1[k] += d
            a2[k] += d * d


@njit(**SERIAL)
def acc_bwd(dy, x, start, nr, ld, w, m, a_dy, a_dyxm, a_xm):
    """Backward sums per column: ``sum dy``, ``sum dy * (x - m[k])``, ``sum (x - m[k])``."""
    r = 0
    while r + 4 <= nr and ld > w:
        o = start + r * ld
        x0, x1, x2, x3 = rows4(x, o, ld, w)
        g0, g1, g2, g3 = rows4(dy, o, ld, w)
        for k in range(w):
            mk = m[k]
            e0 = np.float64(g0[k])
            e1 = np.float64(g1[k])
            e2 = np.float64(g2[k])
            e3 = np.float64(g3[k])
            d0 = np.float64(x0[k]) - mk
            d1 = np.float64(x1[k]) - mk
            d2 = np.float64(x2[k]) - mk
            d3 = np.float64(x3[k]) - mk
            a_dy[k] = (((a_dy[k] + e0) + e1) + e2) + e3
            a_dyxm[k] = (((a_dyxm[k] + e0 * d0) + e1 * d1) + e2 * d2) + e3 * d3
            a_xm[k] = (((a_xm[k] + d0) + d1) + d2) + d3
        r += 4
    for r in range(r, nr):
        o = start + r * ld
        xs = x[o:o + w]
        gs = dy[o:o + w]
        for k in range(w):
            g = np.float64(gs[k])
            xm = np.float64(xs[k]) - m[k]
            a_dy[k] += g
            a_dyxm[k] += g * xm
            a_xm[k] += xm


# --- one row (n contiguous elements at x[start]) -------------------------------------------

@njit(**REDUCE)
def row_sum(x, start, n):
    """float64 ``sum x[start:start+n]``."""
    xs = x[start:start + n]        # a slice, so indices run from 0: no wraparound checks
    s = 0.0
    for i in range(n):
        s += np.float64(xs[i])
    return s


@njit(**REDUCE)
def row_dev2(x, start, n, mean):
    """float64 ``sum (x - mean)^2`` over ``x[start:start+n]``."""
    xs = x[start:start + n]
    s = 0.0
    for i in range(n):
        d = np.float64(xs[i]) - mean
        s += d * d
    return s


@njit(**REDUCE)
def row_sumsq(x, start, n):
    """float64 ``sum x^2`` over ``x[start:start+n]``."""
    xs = x[start:start + n]
    s = 0.0
    for i in range(n):
        v = np.float64(xs[i])
        s += v * v
    return s


@njit(**REDUCE)
def row_shifted(x, start, n, sh):
    """float64 ``(sum d, sum d^2)`` with ``d = x - sh`` over ``x[start:start+n]``.

    Reassociation may regroup ``s + (x - sh)`` as ``(s + x) - sh`` (as in ``row_bwd_sums``):
    rounding at the scale of ``|x|``, which moves the mean by about one unit in its last place
    and ``sum(d)^2 / n`` by far less than the rounding of ``M2``.
    """
    xs = x[start:start + n]
    s1 = 0.0
    s2 = 0.0
    for i in range(n):
        d = np.float64(xs[i]) - sh
        s1 += d
        s2 += d * d
    return s1, s2


@njit(**INLINE)
def chan_mean(mean, mb, d, f):
    """Chan's merged mean ``mean + d * f``, with ``d = mb - mean`` and ``f = n_b / n``. Where d is
    not finite (an infinite mean on either side, or an overflow) it is ``mean * (1 - f) + mb * f``
    instead: the reference's ``sum / n`` is inf for an infinite value among finite ones, where
    ``inf + (finite - inf) * f`` would give NaN. Finite data never takes that branch."""
    if np.isfinite(d):
        return mean + d * f
    return mean * (1.0 - f) + mb * f


@njit(**SERIAL)
def block_moments(x, start, n):
    """``(mean, M2)`` of ``x[start:start+n]`` (n >= 1): one sweep about the mean of its first
    ``SHIFT_FROM`` values, or two-pass when that loses more than 4 bits or is not finite (see
    the module docstring)."""
    ns = min(n, SHIFT_FROM)
    sh = 0.0
    for i in range(ns):
        sh += np.float64(x[start + i])
    sh /= ns
    s1, s2 = row_shifted(x, start, n, sh)
    d = s1 / n
    m2 = s2 - s1 * d
    if m2 >= s2 * SHIFT_KEEP:                  # False for NaN: non-finite data goes two-pass
        return sh + d, m2
    mean = row_sum(x, start, n) / n
    return mean, row_dev2(x, start, n, mean)


@njit(**SERIAL)
def row_moments(x, start, n):
    """``(mean, M2)`` of ``x[start:start+n]``: ``block_moments`` per BLOCK, merged with Chan.

    Callers take the two-pass moments (``row_sum``, then ``row_dev2``) instead for rows shorter
    than ``SWEEP_ROW_MIN``, written out at the call site: the test there is loop-invariant and
    the row loop compiles once per branch. The same test inside this function, or the two-pass
    as a function returning ``(mean, M2)``, measured 1.4-2x slower on short rows (2048 rows of
    64 values: 60 and 45 us against 35 us).
    """
    mean = 0.0
    m2 = 0.0
    cnt = 0
    for b0 in range(0, n, BLOCK):
        nb = min(BLOCK, n - b0)
        mb, m2b = block_moments(x, start + b0, nb)
        if cnt == 0:
            mean = mb
            m2 = m2b
        else:
            tot = cnt + nb
            delta = mb - mean
            mean = chan_mean(mean, mb, delta, nb / tot)
            m2 += m2b + delta * delta * (cnt * (nb / tot))
        cnt += nb
    return mean, m2


@njit(**REDUCE)
def row_bwd_sums(dy, x, start, n, m):
    """``(sum dy, sum dy (x - m), sum (x - m))`` over one row, float64.

    Reassociation here may also regroup ``s + (x - m)`` as ``(s + x) - m``; each such step
    rounds at the scale of ``|x|``, so ``sum(x - m) / n`` (the mean refinement) stays within
    about one unit in the last place of the mean: the precision the mean has anyway.
    """
    xs = x[start:start + n]
    gs = dy[start:start + n]
    s_dy = 0.0
    s_dyxm = 0.0
    s_xm = 0.0
    for i in range(n):
        g = np.float64(gs[i])
        xm = np.float64(xs[i]) - m
        s_dy += g
        s_dyxm += g * xm
        s_xm += xm
    return s_dy, s_dyxm, s_xm


@njit(**REDUCE)
def row_bwd_sums_w(dy, x, w, start, n, m):
    """``(sum g, sum g (x - m), sum (x - m))`` over one row with ``g = dy * w[j]``, float64."""
    xs = x[start:start + n]
    gs = dy[start:start + n]
    s_g = 0.0
    s_gxm = 0.0
    s_xm = 0.0
    for j in range(n):
        g = np.float64(gs[j]) * np.float64(w[j])
        xm = np.float64(xs[j]) - m
        s_g += g
        s_gxm += g * xm
        s_xm += xm
    return s_g, s_gxm, s_xm


# --- elementwise passes in the input's dtype ------------------------------------------------

@njit(**INLINE)
def apply_seg(x, y, start, n, mh, a, c):
    """``y = (x - mh) * a + c`` on ``n`` elements, where the mean = mh + ml is split in x's
    dtype and the caller folded the low part into ``c`` (``c = bias - ml * a``, see
    ``seg_affine``).

    Subtracting the high part of the mean first keeps float32 exact where it matters: x - mh
    is exact when x is near the mean (Sterbenz), so an offset of 1e4 costs no digits of xhat.
    """
    xs = x[start:start + n]
    ys = y[start:start + n]
    for j in range(n):
        ys[j] = (xs[j] - mh) * a + c


@njit(**INLINE)
def seg_affine(x, mean, rstd, w, b):
    """``(mh, a, c)`` of ``apply_seg`` in x's dtype for a float64 mean, rstd, weight, bias:
    mh the mean rounded to x's dtype, ``a = rstd * w``, ``c = b - (mean - mh) * a``."""
    mh = x.dtype.type(mean)
    a = rstd * w
    return mh, x.dtype.type(a), x.dtype.type(b - (mean - mh) * a)


@njit(**INLINE)
def dx_seg(dy, x, dx, start, n, mh, ml, ws, mg, q, rs):
    """``dx = ((ws * dy - mg) - ((x - mh) - ml) * q) * rs`` on ``n`` elements.

    This is ``rstd * (g - mean(g) - xhat * mean(g * xhat))`` with ``g = ws * dy`` and
    ``q = rstd * mean(g * xhat)``: the mean of g is subtracted before scaling, as in the
    reference, so a constant g (e.g. one value per group) gives exactly 0.
    """
    xs = x[start:start + n]
    gs = dy[start:start + n]
    ds = dx[start:start + n]
    for j in range(n):
        ds[j] = ((ws * gs[j] - mg) - ((xs[j] - mh) - ml) * q) * rs


# ==============================================================================================
# Row kernels: the reduced elements of one statistic are contiguous.
#
# A row is ``L`` contiguous elements that share one ``(mean, rstd)``; it is read from memory
# once: its statistics are computed (``row_moments``, see the module docstring) and it is
# normalized while it is still in L1/L2. Rows run in parallel in ``T`` tasks of ``per``
# consecutive rows (the launcher fixes ``T`` from the shape alone, so results never depend on
# the thread count).
#
# Two affine index maps cover every row method:
#
# * **element** (LayerNorm, RMSNorm): ``x`` is ``(R, L)``, the affine is per element of the row:
#   ``y[r, j] = xhat[r, j] * w[j] + b[j]``; ``dweight`` reduces over rows (per-task partials).
# * **segment** (GroupNorm, InstanceNorm on ``(N, C, *spatial)``; BatchNorm's ``(n, c)`` planes):
#   a row is ``S`` segments of ``Ls`` elements, segment ``s`` of row ``r`` is channel
#   ``(r % P) * S + s``: GroupNorm rows are ``(n, g)`` with ``P = G``, ``S = C/G``; InstanceNorm
#   and BatchNorm rows are ``(n, c)`` with ``P = C``, ``S = 1``.
#
# Math (names as in ``normlab.reference``), per row of ``L`` elements, ``g = dy * w``::
#
#     mean = sum(x) / L,  var = sum((x - mean)^2) / L,  rstd = 1 / sqrt(var + eps)
#     y    = (x - mean) * rstd * w + b
#     dx   = rstd * (g - mean(g) - xhat * mean(g * xhat))
#          = ((g - mean(g)) - (x - mean) * q) * rstd,    q = rstd * mean(g * xhat)
#
# Backward mean refinement: the saved ``mean`` arrives rounded to x's dtype. Pass 1 also sums
# ``x - mean``, which gives the exact batch mean ``mu = mean + sum(x - mean) / L`` at no extra
# pass, and ``sum(g (x - mu)) = sum(g (x - mean)) - (mu - mean) sum(g)``; pass 2 centres at ``mu``.
# ==============================================================================================
# modes: row_seg_forward and col_forward_* take TRAIN, STATS (statistics only) or APPLY;
# row_seg_backward takes FUSED, SUMS or APPLY
TRAIN, STATS, APPLY = 0, 1, 2
FUSED, SUMS = 0, 1


@njit(**PARALLEL)
def row_elem_forward(x, R, L, T, per, w, b, eps, centered, y, mean_out, rstd_out):
    """LayerNorm (centered) / RMSNorm (not) forward, statistics from x.

    x, y: (R * L,) flat, row-major (R, L).  w, b: (L,) in x's dtype (ones / zeros for no affine).
    mean_out, rstd_out: (R,) float64 (mean_out is 0 for RMSNorm).
    """
    for it in prange(T):
        t = np.int64(it)
        for r in range(t * per, min(R, (t + 1) * per)):
            s = r * L
            if centered:
                if L < SWEEP_ROW_MIN:
                    mean = row_sum(x, s, L) / L
                    m2 = row_dev2(x, s, L, mean)
                else:
                    mean, m2 = row_moments(x, s, L)
            else:
                mean = 0.0
                m2 = row_sumsq(x, s, L)
            rstd = 1.0 / np.sqrt(m2 / L + eps)
            mean_out[r] = mean
            rstd_out[r] = rstd
            mh = x.dtype.type(mean)
            ml = x.dtype.type(mean - mh)
            rs = x.dtype.type(rstd)
            xs = x[s:s + L]
            ys = y[s:s + L]
            for j in range(L):
                ys[j] = ((xs[j] - mh) - ml) * rs * w[j] + b[j]


@njit(**PARALLEL)
def row_elem_backward(dy, x, R, L, T, per, w, mean, rstd, centered, param_grads, dx, dwp, dbp):
    """LayerNorm / RMSNorm backward, one read of (x, dy) per row, dx written once.

    w: (L,) x's dtype.  mean, rstd: (R,) float64.  dwp, dbp: (T * L,) float64 work arrays:
    per-task partial sums of dy * xhat and dy when ``param_grads``, then summed over the tasks
    in task order into the first slice (``dwp[:L]``, ``dbp[:L]``). A task's first row writes
    its slice (``0.0 + term``: the value, and the sign of zero, that adding the term to a
    zeroed slice gives), the others add to it: no zeroing pass over the T * L partials, which
    outweigh the data on few long rows (8 x 4096: 512 KiB of partials for 128 KiB of x).
    """
    for it in prange(T):
        t = np.int64(it)
        dwt = dwp[t * L:(t + 1) * L]
        dbt = dbp[t * L:(t + 1) * L]
        r0 = t * per
        if param_grads and r0 >= R:              # a task without rows: a zero partial
            for j in range(L):
                dwt[j] = 0.0
                dbt[j] = 0.0
        for r in range(r0, min(R, (t + 1) * per)):
            s = r * L
            xs = x[s:s + L]
            gs = dy[s:s + L]
            ds = dx[s:s + L]
            m = mean[r] if centered else 0.0
            rs64 = rstd[r]
            # pass 1: sum g, sum g (x - m), sum (x - m), with g = dy * w per element
            sg, sgxm, sxm = row_bwd_sums_w(dy, x, w, s, L, m)
            if centered:
                delta = sxm / L                          # mu - mean: exact batch mean
                mu = m + delta
                mg = sg / L
                mgx = rs64 * (sgxm - delta * sg) / L
            else:
                mu = 0.0
                mg = 0.0
                mgx = rs64 * sgxm / L
            mh = x.dtype.type(mu)
            ml = x.dtype.type(mu - mh)
            rs = x.dtype.type(rs64)
            cg = x.dtype.type(mg)
            q = x.dtype.type(rs64 * mgx)
            # pass 2: dx (and the parameter-gradient partials) while the row is in cache
            if param_grads and r == r0:
                for j in range(L):
                    xm = (xs[j] - mh) - ml
                    ds[j] = ((gs[j] * w[j] - cg) - xm * q) * rs
                    gj = np.float64(gs[j])
                    dwt[j] = 0.0 + gj * (np.float64(xm) * rs64)
                    dbt[j] = 0.0 + gj
            elif param_grads:
                for j in range(L):
                    xm = (xs[j] - mh) - ml
                    ds[j] = ((gs[j] * w[j] - cg) - xm * q) * rs
                    gj = np.float64(gs[j])
                    dwt[j] += gj * (np.float64(xm) * rs64)
                    dbt[j] += gj
            else:
                for j in range(L):
                    ds[j] = ((gs[j] * w[j] - cg) - ((xs[j] - mh) - ml) * q) * rs
    if param_grads:
        for t in range(1, T):
            for j in range(L):
                dwp[j] += dwp[t * L + j]
                dbp[j] += dbp[t * L + j]


@njit(**PARALLEL)
def row_seg_forward(x, R, S, Ls, P, T, per, w, b, eps, mode, t_mean, t_rstd, y, mean_out, m2_out):
    """GroupNorm / InstanceNorm (channels-first) and BatchNorm-plane forward.

    x, y: (R * S * Ls,) flat.  w, b: (P * S,) float64.  mode TRAIN: statistics of each row,
    then normalize it; STATS: statistics only (mean_out, m2_out: (R,) float64, M2 = sum of
    squared deviations); APPLY: normalize with the given t_mean, t_rstd (P,) float64 of row
    ``r % P``.
    """
    L = S * Ls
    nc = P * S if mode == APPLY else 0
    c_mh = np.empty(nc, x.dtype)               # APPLY: the seg_affine of each channel, once
    c_a = np.empty(nc, x.dtype)
    c_c = np.empty(nc, x.dtype)
    for c in range(nc):
        c_mh[c], c_a[c], c_c[c] = seg_affine(x, t_mean[c // S], t_rstd[c // S], w[c], b[c])
    for it in prange(T):
        t = np.int64(it)
        r0 = t * per
        p = r0 % P                              # r % P, kept up to date without a division
        for r in range(r0, min(R, r0 + per)):
            s0 = r * L
            if mode == APPLY:
                for s in range(S):
                    c = p * S + s
                    apply_seg(x, y, s0 + s * Ls, Ls, c_mh[c], c_a[c], c_c[c])
            else:
                if L < SWEEP_ROW_MIN:
                    mean = row_sum(x, s0, L) / L
                    m2 = row_dev2(x, s0, L, mean)
                else:
                    mean, m2 = row_moments(x, s0, L)
                mean_out[r] = mean
                m2_out[r] = m2
                if mode == TRAIN:
                    rstd = 1.0 / np.sqrt(m2 / L + eps)
                    for s in range(S):
                        c = p * S + s
                        mh, a, cc = seg_affine(x, mean, rstd, w[c], b[c])
                        apply_seg(x, y, s0 + s * Ls, Ls, mh, a, cc)
            p += 1
            if p == P:
                p = 0


@njit(**PARALLEL)
def row_seg_backward(dy, x, R, S, Ls, P, T, per, w, mean, rstd, mode, t_mg, t_mgx, dx,
                     o_sdy, o_sdyx, o_sxm):
    """Backward of ``row_seg_forward``.

    mode FUSED (GroupNorm / InstanceNorm): ``mean``, ``rstd`` are (R,) per row; writes dx and,
    per segment, ``o_sdy[r*S+s] = sum dy`` and ``o_sdyx[r*S+s] = sum dy * xhat`` (for dweight).
    mode SUMS (BatchNorm planes, pass 1): ``mean`` is (P,) per ``r % P``; writes per segment
    ``o_sdy = sum dy``, ``o_sdyx = sum dy (x - mean)`` and per row ``o_sxm = sum (x - mean)``.
    mode APPLY (BatchNorm planes, pass 2): ``mean`` (the refined batch mean), ``rstd``,
    ``t_mg = mean(g)``, ``t_mgx = mean(g * xhat)`` are (P,); writes dx only (zeros in t_mg and
    t_mgx give the inference gradient ``dx = rstd * w * dy``).
    w: (P * S,) float64.
    """
    L = S * Ls
    for it in prange(T):
        t = np.int64(it)
        r0 = t * per
        p = (r0 + P - 1) % P                    # r % P - 1: advanced first, without a division
        for r in range(r0, min(R, r0 + per)):
            p += 1
            if p == P:
                p = 0
            s0 = r * L
            if mode == FUSED:
                m = mean[r]
                rs64 = rstd[r]
            else:
                m = mean[p]
                rs64 = rstd[p]
            if mode == APPLY:
                mu = m
                mg = t_mg[p]
                mgx = t_mgx[p]
            else:
                sg = 0.0
                sgxm = 0.0
                sxm = 0.0
                for s in range(S):
                    sdy, sdyxm, sx = row_bwd_sums(dy, x, s0 + s * Ls, Ls, m)
                    o_sdy[r * S + s] = sdy
                    o_sdyx[r * S + s] = sdyxm
                    sg += w[p * S + s] * sdy
                    sgxm += w[p * S + s] * sdyxm
                    sxm += sx
                if mode == SUMS:
                    o_sxm[r] = sxm
                    continue
                delta = sxm / L
                mu = m + delta
                mg = sg / L
                mgx = rs64 * (sgxm - delta * sg) / L
                for s in range(S):
                    o_sdyx[r * S + s] = rs64 * (o_sdyx[r * S + s] - delta * o_sdy[r * S + s])
            mh = x.dtype.type(mu)
            ml = x.dtype.type(mu - mh)
            cg = x.dtype.type(mg)
            q = x.dtype.type(rs64 * mgx)
            rs = x.dtype.type(rs64)
            for s in range(S):
                dx_seg(dy, x, dx, s0 + s * Ls, Ls, mh, ml, x.dtype.type(w[p * S + s]), cg, q, rs)


# ==============================================================================================
# Column kernels: the channel stays, the reduced elements are strided.
#
# The input is ``B`` slabs of ``(R, K)`` row-major data (flat). Column ``k`` of slab ``b`` is
# reduced over the slab's ``R`` rows; groups of ``gs`` consecutive columns share one statistic
# and column ``k`` takes the affine parameters of channel ``k // wd`` (``wd`` divides ``gs``, so a
# channel's columns lie in one group; loops over a group's columns run per channel, with no
# integer division per column):
#
# =====================================  =========  ==========  ========  ====  =====
# method / layout                        B          R           K         gs    wd
# =====================================  =========  ==========  ========  ====  =====
# BatchNorm channels-last / (N, C)       1          N * S       C         1     1
# BatchNorm (N, C, inner), small inner   1          N           C*inner   inner inner
# InstanceNorm channels-last             N          S           C         1     1
# GroupNorm channels-last                N          S           C         C/G   1
# =====================================  =========  ==========  ========  ====  =====
#
# A slab is cut into tasks (chunk of ``rc`` rows) x (tile of ``kt`` columns, whole groups),
# fixed by the shape alone, so results never depend on the thread count:
#
# 1. ``chunk_moments``: per-column ``(mean, M2)`` of one chunk in float64: one sweep about the
#    mean of the chunk's first rows, in strips of up to ``SWEEP_LANES_MAX`` lanes (a column
#    where that is ill-conditioned is redone two-pass, re-reading the chunk, at most 256 KiB,
#    from L2); narrow slabs read ``m`` rows as one wide row;
# 2. ``merge_tile``: chunks merge with Chan's formula in chunk order; columns fold into groups
#    (``mean_g = mean of the column means``, ``M2_g = sum M2_k + R * sum (mean_k - mean_g)^2``);
#    per-column coefficients are written in x's dtype;
# 3. ``apply_rows``: ``y = (x - mh) * a + c`` row by row (the mean split hi + lo, the low part
#    folded into c: ``seg_affine``).
#
# Scheduling (one parallel region per pass; each region is a barrier, so fewer is better):
#
# * ``col_*_slabs`` (many slabs: InstanceNorm / GroupNorm with a batch of samples): one task
#   per slab runs 1-2-3 serially, so a sample is re-read from L2/L3 by pass 3: one parallel
#   region.
# * ``col_*_chunks`` (BatchNorm: one slab; few big slabs): pass 1 over all chunks in parallel,
#   pass 2 serially (it touches only the (chunks, K) partials), pass 3 over all chunks in
#   parallel.
#   BatchNorm's statistics need all of x before any output, so x is read twice from memory.
#
# Backward (per group, ``M = R * gs`` values, ``g = dy * w``)::
#
#     pass 1: sum dy, sum dy (x - mean), sum (x - mean)        per column, float64
#     mu      = mean + sum(x - mean) / M                        (exact batch mean; training)
#     mean_g  = sum(w dy) / M,  mean_gx = rstd * (sum(w dy (x - mean)) - (mu - mean) sum(w dy)) / M
#     pass 2: dx = ((w dy - mean_g) - (x - mu) * rstd * mean_gx) * rstd
#     dweight_k = rstd * (sum dy (x - mean) - (mu - mean) sum dy),  dbias_k = sum dy
# ==============================================================================================


# --- forward passes ---------------------------------------------------------------------------

@njit(**INLINE)
def tile_into(dst, src, c0, K, W):
    """``dst[i] = src[c0 + i % K]`` for ``i < W`` (W a multiple of K): a tile's K per-column
    values repeated across the m rows of a wide row, without a division per element."""
    for i0 in range(0, W, K):
        for k in range(K):
            dst[i0 + k] = src[c0 + k]


@njit(**SERIAL)
def fold_lanes(acc, m, kw, out):
    """``out[k] = sum_i acc[i*kw + k]`` (the m lanes of each column, in order)."""
    for k in range(kw):
        out[k] = acc[k]
    for i in range(1, m):
        for k in range(kw):
            out[k] += acc[i * kw + k]


@njit(**SERIAL)
def chunk_moments(x, b, t, j, R, K, rc, kt, m, pm, pm2, p0):
    """Pass 1 for chunk t, tile j of slab b: column means into pm[p0:], M2 into pm2[p0:].

    ``m > 1`` (narrow slabs, then one tile): m consecutive rows are read as one wide row of
    m*K lanes, so that the vector loop runs over m*K values rather than K; the m lanes of a
    column are added up afterwards. Rows left over (fewer than m) are read one at a time.
    """
    r0 = t * rc
    nr = min(rc, R - r0)
    k0 = j * kt
    kw = min(kt, K - k0)
    start = (b * R + r0) * K + k0
    nw = nr // m
    W = m * kw
    tail = start + nw * m * K
    mch = pm[p0:p0 + kw]
    m2ch = pm2[p0:p0 + kw]
    if W <= SWEEP_LANES_MAX:
        shifted_chunk(x, start, tail, nr, nw, K, kw, m, W, mch, m2ch)
        return
    # Wider tiles sweep in strips of SWEEP_LANES_MAX columns, each over all the chunk's rows
    # (m == 1 here: m > 1 only where m * K <= COL_WIDE lanes). A sweep over a whole tile of 1024
    # lanes measured slower than two passes over it (its float64 accumulators and shifts no
    # longer fit in L1 beside the streamed rows); strips of 512 measured faster than both. Pass
    # 1 of channels-last BatchNorm, 2 threads, old (two passes) and new kernels interleaved in
    # one process: (32, 2048, 7, 7) float32 689-698 -> 577-581 us, (32, 1024, 14, 14) 1402-1434
    # -> 1212-1215 us, float64 1227-1242 -> 1010 and 2596-2616 -> 2091-2134 us.
    for s0 in range(0, kw, SWEEP_LANES_MAX):
        n = min(SWEEP_LANES_MAX, kw - s0)
        shifted_chunk(x, start + s0, tail + s0, nr, nr, K, n, 1, n, mch[s0:s0 + n],
                      m2ch[s0:s0 + n])


@njit(**SERIAL)
def shifted_chunk(x, start, tail, nr, nw, K, kw, m, W, mch, m2ch):
    """``chunk_moments`` in one sweep about each column's mean over the chunk's first SHIFT_FROM
    rows; a column where that loses more than 4 bits (or is not finite) is redone two-pass."""
    ns = min(nr, SHIFT_FROM)
    sh = np.zeros(kw)
    acc_sum(x, start, ns, K, kw, sh)
    for k in range(kw):
        sh[k] = sh[k] / ns
    rep = np.empty(W)
    tile_into(rep, sh, 0, kw, W)
    acc = np.zeros(W)
    acc2 = np.zeros(W)
    acc_shifted(x, start, nw, m * K, W, rep, acc, acc2)
    acc_shifted(x, tail, nr - nw * m, K, kw, rep, acc, acc2)
    fold_lanes(acc, m, kw, mch)
    fold_lanes(acc2, m, kw, m2ch)
    redo = 0
    for k in range(kw):                            # branch-free, so that it vectorizes
        s1 = mch[k]
        s2 = m2ch[k]
        d = s1 / nr
        m2 = s2 - s1 * d
        mch[k] = rep[k] + d
        m2ch[k] = m2
        keep = m2 >= s2 * SHIFT_KEEP               # False for NaN: non-finite data goes two-pass
        acc[k] = 0.0 if keep else 1.0
        redo += 0 if keep else 1
    if redo:
        for k in range(kw):
            if acc[k] != 0.0:                      # two-pass for this column, re-read from L2
                c = start + k
                s = 0.0
                for r in range(nr):
                    s += x[c + r * K]
                mean = s / nr
                s = 0.0
                for r in range(nr):
                    e = np.float64(x[c + r * K]) - mean
                    s += e * e
                mch[k] = mean
                m2ch[k] = s


@njit(**SERIAL)
def merge_tile(x, b, j, R, K, gs, wd, Tr, rc, kt, w, bias, eps, mode, pm, pm2, q0,
               t_mean, t_rstd, mean_out, m2_out, th, ta, tc, c0):
    """Pass 2 for tile j of slab b; chunk partials at pm[q0 + t*K + k], tables at th[c0 + k]
    (``seg_affine`` per channel)."""
    G = K // gs
    k0 = j * kt
    kw = min(kt, K - k0)
    mean = pm[q0 + k0:q0 + k0 + kw]
    m2 = pm2[q0 + k0:q0 + k0 + kw]
    if mode != APPLY:
        cnt = min(rc, R)
        for t in range(1, Tr):
            nt = min(rc, R - t * rc)
            tot = cnt + nt
            f = nt / tot
            h = cnt * f
            pt = q0 + t * K + k0
            mt = pm[pt:pt + kw]
            m2t = pm2[pt:pt + kw]
            for k in range(kw):
                d = mt[k] - mean[k]
                mean[k] = chan_mean(mean[k], mt[k], d, f)
                m2[k] += m2t[k] + d * d * h
            cnt = tot
    for g in range(k0 // gs, (k0 + kw) // gs):
        q = b * G + g
        if mode != APPLY:
            gm = 0.0
            for k in range(g * gs - k0, (g + 1) * gs - k0):
                gm += mean[k]
            gm /= gs
            gm2 = 0.0
            dev = 0.0
            for k in range(g * gs - k0, (g + 1) * gs - k0):
                gm2 += m2[k]
                d = mean[k] - gm
                dev += d * d
            gm2 += R * dev
            mean_out[q] = gm
            m2_out[q] = gm2
            rstd = 1.0 / np.sqrt(gm2 / (R * gs) + eps)
        else:
            gm = t_mean[q]
            rstd = t_rstd[q]
        for ci in range(g * gs // wd, (g + 1) * gs // wd):
            mh, a, c = seg_affine(x, gm, rstd, w[ci], bias[ci])
            for k in range(ci * wd, (ci + 1) * wd):
                th[c0 + k] = mh
                ta[c0 + k] = a
                tc[c0 + k] = c


@njit(**SERIAL)
def apply_rows(x, y, b, t, R, K, rc, m, th, ta, tc, c0):
    """Pass 3 for chunk t of slab b: y = (x - th) * ta + tc (as ``apply_seg``), m rows at a
    time."""
    r0 = t * rc
    nr = min(rc, R - r0)
    W = m * K
    hb = np.empty(W, dtype=x.dtype)
    ab = np.empty(W, dtype=x.dtype)
    cb = np.empty(W, dtype=x.dtype)
    for i0 in range(0, W, K):                   # tile_into, the three tables in one loop
        for k in range(K):
            hb[i0 + k] = th[c0 + k]
            ab[i0 + k] = ta[c0 + k]
            cb[i0 + k] = tc[c0 + k]
    o = (b * R + r0) * K
    end = o + nr * K
    while o < end:
        n = min(W, end - o)
        xs = x[o:o + n]
        ys = y[o:o + n]
        for k in range(n):
            ys[k] = (xs[k] - hb[k]) * ab[k] + cb[k]
        o += n


@njit(**PARALLEL)
def col_forward_slabs(x, B, R, K, gs, wd, w, b, eps, mode, t_mean, t_rstd, y, mean_out,
                      m2_out, rc, kt, m):
    """Column forward. w, b: (K // wd,) float64.

    mode TRAIN: statistics from x; mean_out, m2_out: (B * G,) float64 (M2 = sum of squared
    deviations over R * gs values). mode STATS: those statistics only (y is not written).
    mode APPLY: statistics given as t_mean, t_rstd (B * G,).

    One task per slab (``per_slab`` scheduling); no work buffer.
    """
    Tr = (R + rc - 1) // rc
    Tk = (K + kt - 1) // kt
    zero = Tr - Tr          # an int64 0 (a literal 0 would compile another specialization)
    for ib in prange(B):
        bb = np.int64(ib)
        pm = np.empty(Tr * K if mode != APPLY else 0)
        pm2 = np.empty(Tr * K if mode != APPLY else 0)
        th = np.empty(K, dtype=x.dtype)
        ta = np.empty(K, dtype=x.dtype)
        tc = np.empty(K, dtype=x.dtype)
        if mode != APPLY:
            for t in range(Tr):
                for j in range(Tk):
                    chunk_moments(x, bb, t, j, R, K, rc, kt, m, pm, pm2, t * K + j * kt)
        for j in range(Tk):
            merge_tile(x, bb, j, R, K, gs, wd, Tr, rc, kt, w, b, eps, mode, pm, pm2, zero,
                       t_mean, t_rstd, mean_out, m2_out, th, ta, tc, zero)
        if mode != STATS:
            for t in range(Tr):
                apply_rows(x, y, bb, t, R, K, rc, m, th, ta, tc, zero)


@njit(**PARALLEL)
def col_forward_chunks(x, B, R, K, gs, wd, w, b, eps, mode, t_mean, t_rstd, y, mean_out,
                       m2_out, rc, kt, m, work):
    """Column forward. w, b: (K // wd,) float64.

    mode TRAIN: statistics from x; mean_out, m2_out: (B * G,) float64 (M2 = sum of squared
    deviations over R * gs values). mode STATS: those statistics only (y is not written).
    mode APPLY: statistics given as t_mean, t_rstd (B * G,).

    Chunked scheduling; ``work``: float64 buffer of 2 * B * Tr * K values (TRAIN, STATS).
    """
    Tr = (R + rc - 1) // rc
    Tk = (K + kt - 1) // kt
    npart = B * Tr * K if mode != APPLY else 0
    pm = work[:npart]                 # chunk partials: caller's reusable buffer (2 * npart)
    pm2 = work[npart:2 * npart]
    th = np.empty(B * K, dtype=x.dtype)
    ta = np.empty(B * K, dtype=x.dtype)
    tc = np.empty(B * K, dtype=x.dtype)
    if mode != APPLY:
        for itask in prange(B * Tr * Tk):
            task = np.int64(itask)
            bb = task // (Tr * Tk)
            t = (task // Tk) % Tr
            j = task % Tk
            chunk_moments(x, bb, t, j, R, K, rc, kt, m, pm, pm2, (bb * Tr + t) * K + j * kt)
    for bb in range(B):
        for j in range(Tk):
            merge_tile(x, bb, j, R, K, gs, wd, Tr, rc, kt, w, b, eps, mode, pm, pm2, bb * Tr * K,
                       t_mean, t_rstd, mean_out, m2_out, th, ta, tc, bb * K)
    napply = B * Tr if mode != STATS else 0   # not inside prange(): that ran 1.5x slower
    for itask in prange(napply):
        task = np.int64(itask)
        bb = task // Tr
        t = task % Tr
        apply_rows(x, y, bb, t, R, K, rc, m, th, ta, tc, bb * K)



# --- backward passes --------------------------------------------------------------------------

@njit(**SERIAL)
def chunk_sums(dy, x, b, t, j, R, K, gs, rc, kt, m, mean, ps, psx, psm, p0):
    """Pass 1 for chunk t, tile j of slab b: sum dy, sum dy (x - mean), sum (x - mean) per column
    (wide rows of m rows as in ``chunk_moments``)."""
    G = K // gs
    r0 = t * rc
    nr = min(rc, R - r0)
    k0 = j * kt
    kw = min(kt, K - k0)
    start = (b * R + r0) * K + k0
    nw = nr // m
    W = m * kw
    tail = start + nw * m * K
    mloc = np.empty(W)
    for g in range(k0 // gs, (k0 + kw) // gs):          # tiles are whole groups
        for k in range(g * gs - k0, (g + 1) * gs - k0):
            mloc[k] = mean[b * G + g]
    tile_into(mloc, mloc, 0, kw, W)                 # the first kw onto the rest (and themselves)
    if W > SWEEP_LANES_MAX:
        # m == 1: strips of columns, as chunk_moments: the same sums in the same order (rows4
        # adds a column's rows in order), with a third of the float64 accumulators in L1. Whole
        # BatchNorm backward, channels-last, 2 threads, old and new interleaved: (32, 2048, 7, 7)
        # float32 2459-2513 -> 2188-2255 us, (32, 1024, 14, 14) 4756-4903 -> 4436-4580 us
        # (the partials themselves are the accumulators, as the strips' outputs in chunk_moments)
        ps[p0:p0 + kw] = 0.0
        psx[p0:p0 + kw] = 0.0
        psm[p0:p0 + kw] = 0.0
        for s0 in range(0, kw, SWEEP_LANES_MAX):
            n = min(SWEEP_LANES_MAX, kw - s0)
            q = p0 + s0
            acc_bwd(dy, x, start + s0, nr, K, n, mloc[s0:s0 + n], ps[q:q + n], psx[q:q + n],
                    psm[q:q + n])
        return
    a_dy = np.zeros(W)
    a_dyxm = np.zeros(W)
    a_xm = np.zeros(W)
    acc_bwd(dy, x, start, nw, m * K, W, mloc, a_dy, a_dyxm, a_xm)
    acc_bwd(dy, x, tail, nr - nw * m, K, kw, mloc, a_dy, a_dyxm, a_xm)
    fold_lanes(a_dy, m, kw, ps[p0:p0 + kw])
    fold_lanes(a_dyxm, m, kw, psx[p0:p0 + kw])
    fold_lanes(a_xm, m, kw, psm[p0:p0 + kw])


@njit(**SERIAL)
def reduce_tile(x, b, j, R, K, gs, wd, Tr, kt, w, mean, rstd, training, need_sums, ps, psx, psm,
                q0, dwk, dbk, th, tl, t1, t2, t3, t4, c0):
    """Pass 2 for tile j of slab b: chunk sums, group coefficients, dweight/dbias per channel."""
    G = K // gs
    nch = K // wd                    # channels of w
    k0 = j * kt
    kw = min(kt, K - k0)
    sdy = ps[q0 + k0:q0 + k0 + kw]
    sdyxm = psx[q0 + k0:q0 + k0 + kw]
    sxm = psm[q0 + k0:q0 + k0 + kw]
    if need_sums:
        for t in range(1, Tr):
            pt = q0 + t * K + k0
            for k in range(kw):
                sdy[k] += ps[pt + k]
                sdyxm[k] += psx[pt + k]
                sxm[k] += psm[pt + k]
    for g in range(k0 // gs, (k0 + kw) // gs):
        q = b * G + g
        rs = rstd[q]
        delta = 0.0
        mg = 0.0
        mgx = 0.0
        if training:
            M = R * gs
            sg = 0.0
            sgxm = 0.0
            sx = 0.0
            for ci in range(g * gs // wd, (g + 1) * gs // wd):
                wk = w[ci]
                for k in range(ci * wd - k0, (ci + 1) * wd - k0):
                    sg += wk * sdy[k]
                    sgxm += wk * sdyxm[k]
                    sx += sxm[k]
            delta = sx / M
            mg = sg / M
            mgx = rs * (sgxm - delta * sg) / M
        mu = mean[q] + delta
        mh = x.dtype.type(mu)
        ml = x.dtype.type(mu - mh)
        q3 = rs * mgx
        for ci in range(g * gs // wd, (g + 1) * gs // wd):
            if need_sums:
                sw = 0.0
                sb = 0.0
                for k in range(ci * wd - k0, (ci + 1) * wd - k0):
                    sw += sdyxm[k] - delta * sdy[k]
                    sb += sdy[k]
                dwk[b * nch + ci] = rs * sw
                dbk[b * nch + ci] = sb
            for k in range(ci * wd, (ci + 1) * wd):
                th[c0 + k] = mh
                tl[c0 + k] = ml
                t1[c0 + k] = w[ci]
                t2[c0 + k] = mg
                t3[c0 + k] = q3
                t4[c0 + k] = rs


@njit(**SERIAL)
def dx_rows(dy, x, dx, b, t, R, K, rc, m, th, tl, t1, t2, t3, t4, c0):
    """Pass 3 for chunk t of slab b: dx = ((t1 dy - t2) - ((x - th) - tl) t3) t4, m rows at a time."""
    r0 = t * rc
    nr = min(rc, R - r0)
    W = m * K
    hb = np.empty(W, dtype=x.dtype)
    lb = np.empty(W, dtype=x.dtype)
    b1 = np.empty(W, dtype=x.dtype)
    b2 = np.empty(W, dtype=x.dtype)
    b3 = np.empty(W, dtype=x.dtype)
    b4 = np.empty(W, dtype=x.dtype)
    for i0 in range(0, W, K):                   # tile_into, the six tables in one loop
        for k in range(K):
            hb[i0 + k] = th[c0 + k]
            lb[i0 + k] = tl[c0 + k]
            b1[i0 + k] = t1[c0 + k]
            b2[i0 + k] = t2[c0 + k]
            b3[i0 + k] = t3[c0 + k]
            b4[i0 + k] = t4[c0 + k]
    o = (b * R + r0) * K
    end = o + nr * K
    while o < end:
        n = min(W, end - o)
        xs = x[o:o + n]
        gs = dy[o:o + n]
        ds = dx[o:o + n]
        for k in range(n):
            ds[k] = ((b1[k] * gs[k] - b2[k]) - ((xs[k] - hb[k]) - lb[k]) * b3[k]) * b4[k]
        o += n


@njit(**PARALLEL)
def col_backward_slabs(dy, x, B, R, K, gs, wd, w, mean, rstd, training, need_sums, dx, dwk,
                       dbk, rc, kt, m):
    """Column backward. w: (K // wd,) float64; mean, rstd: (B * G,) float64.

    training: the statistics came from x (full gradient through them); otherwise they are
    constants and ``dx = rstd * w * dy``. need_sums: compute dwk[b*C+c] = sum dy * xhat and
    dbk[b*C+c] = sum dy per channel c of w (float64, (B * C,), C = K // wd); always needed when
    training.

    One task per slab (``per_slab`` scheduling); no work buffer.
    """
    Tr = (R + rc - 1) // rc
    Tk = (K + kt - 1) // kt
    zero = Tr - Tr          # an int64 0 (a literal 0 would compile another specialization)
    for ib in prange(B):
        bb = np.int64(ib)
        npart = Tr * K if need_sums else 0
        ps = np.empty(npart)
        psx = np.empty(npart)
        psm = np.empty(npart)
        th = np.empty(K, dtype=x.dtype)
        tl = np.empty(K, dtype=x.dtype)
        t1 = np.empty(K, dtype=x.dtype)
        t2 = np.empty(K, dtype=x.dtype)
        t3 = np.empty(K, dtype=x.dtype)
        t4 = np.empty(K, dtype=x.dtype)
        if need_sums:
            for t in range(Tr):
                for j in range(Tk):
                    chunk_sums(dy, x, bb, t, j, R, K, gs, rc, kt, m, mean, ps, psx, psm,
                               t * K + j * kt)
        for j in range(Tk):
            reduce_tile(x, bb, j, R, K, gs, wd, Tr, kt, w, mean, rstd, training, need_sums,
                        ps, psx, psm, zero, dwk, dbk, th, tl, t1, t2, t3, t4, zero)
        for t in range(Tr):
            dx_rows(dy, x, dx, bb, t, R, K, rc, m, th, tl, t1, t2, t3, t4, zero)


@njit(**PARALLEL)
def col_backward_chunks(dy, x, B, R, K, gs, wd, w, mean, rstd, training, need_sums, dx, dwk,
                        dbk, rc, kt, m, work):
    """Column backward. w: (K // wd,) float64; mean, rstd: (B * G,) float64.

    training: the statistics came from x (full gradient through them); otherwise they are
    constants and ``dx = rstd * w * dy``. need_sums: compute dwk[b*C+c] = sum dy * xhat and
    dbk[b*C+c] = sum dy per channel c of w (float64, (B * C,), C = K // wd); always needed when
    training.

    Chunked scheduling; ``work``: float64 buffer of 3 * B * Tr * K values (need_sums).
    """
    Tr = (R + rc - 1) // rc
    Tk = (K + kt - 1) // kt
    npart = B * Tr * K if need_sums else 0
    ps = work[:npart]                 # chunk partials: caller's reusable buffer (3 * npart)
    psx = work[npart:2 * npart]
    psm = work[2 * npart:3 * npart]
    th = np.empty(B * K, dtype=x.dtype)
    tl = np.empty(B * K, dtype=x.dtype)
    t1 = np.empty(B * K, dtype=x.dtype)
    t2 = np.empty(B * K, dtype=x.dtype)
    t3 = np.empty(B * K, dtype=x.dtype)
    t4 = np.empty(B * K, dtype=x.dtype)
    if need_sums:
        for itask in prange(B * Tr * Tk):
            task = np.int64(itask)
            bb = task // (Tr * Tk)
            t = (task // Tk) % Tr
            j = task % Tk
            chunk_sums(dy, x, bb, t, j, R, K, gs, rc, kt, m, mean, ps, psx, psm,
                       (bb * Tr + t) * K + j * kt)
    for bb in range(B):
        for j in range(Tk):
            reduce_tile(x, bb, j, R, K, gs, wd, Tr, kt, w, mean, rstd, training, need_sums,
                        ps, psx, psm, bb * Tr * K, dwk, dbk, th, tl, t1, t2, t3, t4, bb * K)
    for itask in prange(B * Tr):
        task = np.int64(itask)
        bb = task // Tr
        t = task % Tr
        dx_rows(dy, x, dx, bb, t, R, K, rc, m, th, tl, t1, t2, t3, t4, bb * K)


# ==============================================================================================
# Serial twins. Each parallel kernel above is also compiled without ``parallel=True`` (its
# ``prange`` loops then run as plain loops over the tasks), for inputs too small to repay a
# parallel region: starting one costs a few microseconds on an idle machine and far more on a
# busy one, more than such an input's whole work. The twin runs the very same code, over the
# same task partition wherever results depend on it (per-task partial sums; elsewhere the row
# kernels' twins take one task, ``numba_cpu._row_tasks``), so its results are bit-identical to
# the parallel kernel's (tested).
# The twin is a copy of the Python function under another qualified name, so numba's on-disk
# cache (keyed by qualified name and line) keeps the two compilations apart.
# ==============================================================================================

# --- statistics out (serial, per call) ---------------------------------------------------------

@njit(**SERIAL)
def finish_moments(mean, m2, count, eps, mean_o, var_o, rstd_o, rstd64):
    """The statistics a forward returns, from float64 ``(mean, M2)`` over ``count`` values each:
    ``mean_o``, ``var_o = M2 / count`` (biased) and ``rstd_o = 1 / sqrt(var + eps)`` in x's dtype,
    and rstd in float64 into ``rstd64``. An output of size 0 is skipped; ``count == 0`` gives NaN.
    Given statistics (inference) pass ``m2 = var``, ``count = 1``. Returns True when a variance
    is negative (a given var; never from data), so that the caller can raise."""
    negative = False
    for i in range(mean.size):
        if count > 0:
            mu = mean[i]
            v = m2[i] / count
        else:
            mu = np.nan
            v = np.nan
        r = 1.0 / np.sqrt(v + eps)
        if mean_o.size:
            mean_o[i] = mu
        if var_o.size:
            var_o[i] = v
        if rstd_o.size:
            rstd_o[i] = r
        if rstd64.size:
            rstd64[i] = r
        negative |= v < 0
    return negative


@njit(**SERIAL)
def merge_planes(rmean, rm2, N, C, inner, mean64, m2_64):
    """BatchNorm over ``(n, c)`` planes of ``inner`` values each: the per-plane ``(mean, M2)``
    (``rmean[n * C + c]``) merged per channel (equal counts: the mean of the plane means, and
    ``M2 = sum M2_n + inner * sum (mean_n - mean)^2``)."""
    for c in range(C):
        s = 0.0
        for n in range(N):
            s += rmean[n * C + c]
        mu = s / N
        m2 = 0.0
        dev = 0.0
        for n in range(N):
            m2 += rm2[n * C + c]
            d = rmean[n * C + c] - mu
            dev += d * d
        mean64[c] = mu
        m2_64[c] = m2 + inner * dev


@njit(cache=True, nogil=True, error_model="numpy")      # no fastmath: NumPy's rounding
def merge_bwd_planes(sdy, sdyxm, sxm, N, C, count, training, w, mean, rstd, dweight, dbias, mu,
                     mg, mgx):
    """BatchNorm backward over ``(n, c)`` planes, between the SUMS and the APPLY pass of
    ``row_seg_backward``: the per-plane sums (index ``n * C + c``) summed per channel in plane
    order, then ``dweight = rstd * (sum dy (x - mean) - delta * sum dy)``, ``dbias = sum dy``
    and the APPLY inputs ``mu = mean + delta``, ``mg = w * sum dy / count``, ``mgx = w *
    dweight / count``, with ``delta = sum (x - mean) / count`` the mean refinement in training
    (with given statistics: ``delta = 0``, ``mu = mean``, ``mg = mgx = 0``)."""
    for c in range(C):
        a = 0.0
        b = 0.0
        d = 0.0
        for n in range(N):
            a += sdy[n * C + c]
            b += sdyxm[n * C + c]
            d += sxm[n * C + c]
        delta = d / count if training else 0.0
        dw = rstd[c] * (b - delta * a)
        dweight[c] = dw
        dbias[c] = a
        if training:
            mu[c] = mean[c] + delta
            mg[c] = w[c] * a / count
            mgx[c] = w[c] * dw / count
        else:
            mu[c] = mean[c]
            mg[c] = 0.0
            mgx[c] = 0.0


@njit(**SERIAL)
def bn_given_small(x, R, C, inner, wide, w, b, mean, var, eps, y, mean_o, var_o, rstd_o):
    """Batch norm with given statistics (inference) in one serial call, for serial-size inputs:
    ``finish_moments`` (count 1), ``seg_affine`` per channel and ``apply_seg``'s formula, the
    arithmetic of the APPLY passes (``merge_tile`` + ``apply_rows``, ``row_seg_forward``), so
    results are bit-identical to theirs (tested). What it saves is their scheduling and the
    Python between them, most of the time of a small input.

    x, y: ``R`` rows of ``C * inner`` values (``(N, C, inner)``, or ``(rows, C)`` with inner 1).
    ``wide``: the (mh, a, c) table is repeated per value of a row (short planes: one vector loop
    over the row) rather than kept per channel (one ``apply_seg`` per plane).
    w, b, mean, var: (C,) float64, or x's dtype (read in float64, as the callers' casts would).
    mean_o, var_o, rstd_o: (C,) in x's dtype. Returns True when a variance is negative.
    """
    K = C * inner
    th = np.empty(C, dtype=x.dtype)
    ta = np.empty(C, dtype=x.dtype)
    tc = np.empty(C, dtype=x.dtype)
    negative = 0
    for c in range(C):                         # one vector loop over the channels
        mu = np.float64(mean[c])
        v = np.float64(var[c])
        r = 1.0 / np.sqrt(v + eps)
        mean_o[c] = mu
        var_o[c] = v
        rstd_o[c] = r
        negative += 1 if v < 0 else 0
        th[c], ta[c], tc[c] = seg_affine(x, mu, r, np.float64(w[c]), np.float64(b[c]))
    if wide and inner > 1:                     # per value of a row
        hb = np.empty(K, dtype=x.dtype)
        ab = np.empty(K, dtype=x.dtype)
        cb = np.empty(K, dtype=x.dtype)
        for c in range(C):
            for k in range(c * inner, (c + 1) * inner):
                hb[k] = th[c]
                ab[k] = ta[c]
                cb[k] = tc[c]
        th, ta, tc = hb, ab, cb
    for i in range(R):
        if wide:
            xs = x[i * K:(i + 1) * K]
            ys = y[i * K:(i + 1) * K]
            for k in range(K):
                ys[k] = (xs[k] - th[k]) * ta[k] + tc[k]
        else:
            for c in range(C):
                apply_seg(x, y, (i * C + c) * inner, inner, th[c], ta[c], tc[c])
    return negative > 0


@njit(cache=True, nogil=True, error_model="numpy")      # no fastmath: NumPy's rounding
def fold_running(run_mean, run_var, mean, var, corr, f, check, nbt):
    """Running statistics update of batch norm, in place, in the arrays' dtype:
    ``run = run * (1 - f) + batch * f`` with ``batch`` the ``mean``, or ``var * corr`` (the
    unbiased variance). Each product and sum is rounded to the dtype, as the same NumPy
    expressions round them (no contraction into a fused multiply-add). ``check``: when some
    channel's mean or unbiased variance is not finite, nothing is changed and False is
    returned. A size-0 ``run_mean``/``run_var`` is skipped; ``nbt`` (size 0 or 1, int64) is
    incremented when the batch is folded in."""
    dt = mean.dtype.type
    c1 = dt(corr)
    if check:
        for c in range(mean.size):
            if not (np.isfinite(mean[c]) and np.isfinite(var[c] * c1)):
                return False
    keep = dt(1.0 - f)
    fd = dt(f)
    for c in range(run_mean.size):
        run_mean[c] = run_mean[c] * keep + mean[c] * fd
    for c in range(run_var.size):
        run_var[c] = run_var[c] * keep + (var[c] * c1) * fd
    for i in range(nbt.size):
        nbt[i] += 1
    return True


class KernelSet:
    """The top-level kernels of one kind (``PARALLEL_KERNELS`` or ``SERIAL_KERNELS``)."""

    def __init__(self, kind: str, kernels: dict):
        self.kind = kind
        self.__dict__.update(kernels)

    def __repr__(self):
        return f"<{self.kind} numba kernels>"


def _serial_twin(kernel):
    f = kernel.py_func
    twin = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__,
                              f.__closure__)
    twin.__qualname__ = f.__qualname__ + "_serial"
    twin.__doc__ = f"{f.__name__} without parallel=True (see 'Serial twins')."
    return njit(**SERIAL)(twin)


_TOP = (row_elem_forward, row_elem_backward, row_seg_forward, row_seg_backward,
        col_forward_slabs, col_forward_chunks, col_backward_slabs, col_backward_chunks)
KERNEL_NAMES = tuple(k.py_func.__name__ for k in _TOP)
PARALLEL_KERNELS = KernelSet("parallel", dict(zip(KERNEL_NAMES, _TOP)))
SERIAL_KERNELS = KernelSet("serial", {n: _serial_twin(k) for n, k in zip(KERNEL_NAMES, _TOP)})
