r"""Triton kernels (CUDA; CPU tensors under ``TRITON_INTERPRET=1``): the ``normlab.kernels`` contract.

Same names, signatures and conventions as ``numba_cpu``, for torch tensors only (NumPy arrays
are not accepted: use the ``numba`` or ``numpy`` backend for them). float16, bfloat16 and
float32 accumulate in float32, float64 in float64.

Kernels (one module, two memory patterns, see ARCHITECTURE.md):

row, per-element affine (LayerNorm, RMSNorm, and the fused residual-add variants)
    ``_row_fwd``: one program per row. When the row fits in one block (``L <= ROW_BLOCK_MAX``)
    it is loaded once, its moments are taken in registers (two-pass: mean, then the centered
    sum of squares) and y is written: one read of x, one write of y. Longer rows loop over
    blocks twice: moments with a per-block two-pass and Chan's merge of the blocks, then the
    normalize loop (the second read mostly hits L2).
    ``_row_bwd``: a persistent grid of P programs (``programs()``: about 16 warps' worth per
    SM, at most ``ROW_BWD_WARPS`` warps per row), each over a contiguous run of rows: dx per
    row, and dweight/dbias partial sums over its rows accumulated in registers (one-pass) or in
    its own row of the (P, L) float32 partial buffer (looped), written without atomics or
    locks; ``_sum_partials`` is the second, small reduction into dweight/dbias. The three row
    sums of the one-pass backward are independent (one round of reductions), and the mean is
    refined to the exact batch mean (``mean + sum(x - mean) / L``), as numba's.

channel pattern (BatchNorm, GroupNorm, InstanceNorm; (N, C, *S) and (N, *S, C))
    Three launches per direction, no torch arithmetic in between:
    ``_plane_moments`` / ``_col_moments`` write partial moments (B, P, C) (channels-first: one
    partial per (n, c) plane, a contiguous row of S values; channels-last: a (B, P,
    column-block) grid, each program reducing a run of rows of an (M, C) slab). Values are
    accumulated elementwise, shifted by the mean of the first tile, with one reduction at the
    end. ``_finalize_fwd`` merges the partials of each statistic (Chan's merge over P, then
    the gs channels of a group) into mean, var, rstd and the per-(b, c) coefficients;
    ``_apply`` writes ``y = (x - mu) * a + c``. Backward: ``_plane_sums`` / ``_col_sums``
    (partial sums of dy, dy (x - mean), x - mean, the mean read from the statistics),
    ``_finalize_bwd`` (the exact batch mean, dweight/dbias, the coefficients) and ``_apply``
    (``dx = d * dy + (x - mu) * a + c``). Two reads of x forward, three of x and dy backward,
    as the statistics are needed before any output.

Statistics returned by the forward functions (``mean``, ``var``, ``rstd``) are float32 for
16-bit inputs (the accumulation precision, as torch's CUDA kernels return them) and x's dtype
otherwise; ``dweight``/``dbias`` have the weight's dtype (x's when there is no weight).

Block sizes and the persistent grid size are module attributes (``ROW_BLOCK_MAX``,
``ROW_LOOP_BLOCK``, ``PLANE_BLOCK_R``, ``PLANE_BLOCK_S``, ``PLANE_TILE``, ``COL_BLOCK_M``,
``COL_BLOCK_K``, ``COL_PER_SM``, ``APPLY_BLOCK_R``, ``APPLY_BLOCK_C``, ``APPLY_TILE``,
``FIN_TILE``, ``SUM_BLOCK``, ``ROW_BWD_WARPS``, ``programs``): tests shrink them to force the
looped and multi-program paths on small shapes. Every call is free of host synchronization and
host-to-device copies, so it can be captured in a CUDA graph.

Running on CPU tensors needs the Triton interpreter: ``TRITON_INTERPRET=1`` in the environment
before this module (and its kernels) is imported. It is slow (a Python loop over programs), for
tests only.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _checks
from . import FUNCTIONS

NAME = "triton"

__all__ = list(FUNCTIONS) + ["add_layer_norm_forward", "add_rms_norm_forward", "unavailable",
                             "INTERPRET"]


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() not in ("", "0", "false", "no")


#: whether the kernels below were built for the Triton interpreter (decided at import, as
#: triton.jit decides it)
INTERPRET = _env_interpret()

#: LayerNorm/RMSNorm: rows up to this many values run the one-pass kernel
ROW_BLOCK_MAX = 16384
#: LayerNorm/RMSNorm: block of the looped kernel for longer rows
ROW_LOOP_BLOCK = 4096
#: channels-first statistics: at least PLANE_BLOCK_R planes per program, blocks of up to
#: PLANE_BLOCK_S plane values, PLANE_TILE values per tile (short planes: more planes per tile)
PLANE_BLOCK_R = 4
PLANE_BLOCK_S = 1024
PLANE_TILE = 4096
#: channels-last statistics: rows per tile, up to COL_BLOCK_K columns (channels) per program
COL_BLOCK_M = 32
COL_BLOCK_K = 64
#: column partials: programs per SM of the persistent grid (an H200 in bf16, 2026-12-04: 4 took
#: 0-25% less GPU time than 8 and 16 on channels-last BatchNorm, GroupNorm and InstanceNorm)
COL_PER_SM = 4
#: elementwise apply: tiles of at least APPLY_BLOCK_R rows by up to APPLY_BLOCK_C columns,
#: APPLY_TILE values (narrow rows: more rows per tile)
APPLY_BLOCK_R = 16
APPLY_BLOCK_C = 128
APPLY_TILE = 2048
#: row backward: at most this many warps per row, and about 16 warps' worth of programs per SM
#: (an H200 in bf16, 2026-12-04: 2 programs of 8 warps per SM were best for rows of 4096 and 8192
#: values, 8 programs of 2 warps for rows of 1024; 16 warps per row of 16384 values were slower
#: than 8)
ROW_BWD_WARPS = 8
#: the column sums of the row backward's (programs, L) partial dweight/dbias
SUM_BLOCK = 256
#: statistics finalization: tiles of up to FIN_TILE (group, channel-of-group) values
FIN_TILE = 256

_F16 = (torch.float16, torch.bfloat16)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unavailable(device: str) -> Optional[str]:
    """Why the registry should not pick this backend for ``device`` ("cuda", "cpu"), or None.

    On CPU that needs kernels built for the interpreter and ``TRITON_INTERPRET`` set now (the
    caller asks for the interpreter); the functions of this module themselves only need the
    former (``_cannot_run``).
    """
    if device == "cpu" and INTERPRET and not _env_interpret():
        return ("TRITON_INTERPRET is not set now (the kernels were built for the interpreter; "
                "set it again to choose them for CPU tensors)")
    return _cannot_run(device)


def availability_state() -> tuple:
    """What ``unavailable`` depends on besides the device (the registry memoizes by it):
    whether the kernels were built for the interpreter and whether TRITON_INTERPRET is set now.
    (CUDA's presence is taken as fixed for the life of the process.)"""
    return INTERPRET, _env_interpret()


def _cannot_run(device: str) -> Optional[str]:
    if device == "cpu":
        if not INTERPRET:
            return ("it runs on CPU tensors only in the Triton interpreter: set TRITON_INTERPRET=1 "
                    "before triton and normlab's Triton kernels are imported (slow; for tests)")
        return None
    if device == "cuda":
        if INTERPRET:
            return ("the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 when "
                    "they were imported); unset it to run them on the GPU")
        if not torch.cuda.is_available():
            return ("CUDA is not available (torch.cuda.is_available() is False) and "
                    "TRITON_INTERPRET is not set")
        return None
    return f"it runs on cuda (or on cpu under TRITON_INTERPRET=1), not on {device!r}"


@contextlib.contextmanager
def _launch_env():
    """Keep TRITON_INTERPRET set while interpreted kernels run (triton checks it lazily)."""
    if not INTERPRET or _env_interpret():
        yield
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TRITON_INTERPRET", None)


def programs(work: int, device, per_sm: int = 4) -> int:
    """Size of a persistent grid over ``work`` independent items (rows, row blocks)."""
    if torch.device(device).type == "cuda" and not INTERPRET:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = per_sm * sms
    else:
        target = 4
    return max(1, min(work, target))


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _stat_dtype(dtype):
    return torch.float32 if dtype in _F16 else dtype


def _warps(block: int) -> int:
    return int(min(16, max(1, block // 512)))


# Only builtins of triton.language (and jit functions of this module) are used inside the
# kernels: triton.language's own jit helpers (tl.sum, tl.zeros) are built when triton is
# imported, and in a process that imported triton before TRITON_INTERPRET was set they cannot
# run under the interpreter. ``_rsum`` is tl.sum for float input (the interpreter runs the
# standard sum combiner as np.sum).

@triton.jit
def _rsum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


# =============================================================================================
# row kernels: LayerNorm / RMSNorm (optionally after a residual add)
# =============================================================================================

@triton.jit
def _chan_mean(mean, mb, d, f):
    """Chan's merged mean ``mean + d * f`` (``d = mb - mean``, ``f = n_b / n``); where d is not
    finite (``d - d`` is NaN), ``mean * (1 - f) + mb * f``, which keeps an infinite mean infinite
    rather than turning it into ``inf - inf`` (as ``_numba_kernels.chan_mean``)."""
    return tl.where(d - d == 0.0, mean + d * f, mean * (1.0 - f) + mb * f)


@triton.jit
def _row_fwd(X, RES, S, Y, W, B, MEAN, RSTD, L, eps,
             HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
             CENTERED: tl.constexpr, LOOPED: tl.constexpr, BLOCK: tl.constexpr,
             ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * L
    if not LOOPED:
        cols = tl.arange(0, BLOCK)
        m = cols < L
        x = tl.load(X + base + cols, mask=m, other=0.0).to(ACC)
        if HAS_RES:
            xs = (x + tl.load(RES + base + cols, mask=m, other=0.0).to(ACC)).to(S.dtype.element_ty)
            tl.store(S + base + cols, xs, mask=m)
            x = xs.to(ACC)                  # normalize the sum as stored (rounded)
        if CENTERED:
            mean = _rsum(x, axis=0) / L
            xc = tl.where(m, x - mean, 0.0)
        else:
            xc = x
        var = _rsum(xc * xc, axis=0) / L
        rstd = 1.0 / tl.sqrt(var + eps)
        y = xc * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=m, other=0.0).to(ACC)
        if HAS_B:
            y = y + tl.load(B + cols, mask=m, other=0.0).to(ACC)
        tl.store(Y + base + cols, y.to(Y.dtype.element_ty), mask=m)
    else:
        zero = _rsum(tl.full([BLOCK], 0.0, ACC), axis=0)
        n = zero
        mean = zero
        m2 = zero
        for start in range(0, L, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m = cols < L
            x = tl.load(X + base + cols, mask=m, other=0.0).to(ACC)
            if HAS_RES:
                xs = (x + tl.load(RES + base + cols, mask=m, other=0.0).to(ACC)).to(S.dtype.element_ty)
                tl.store(S + base + cols, xs, mask=m)
                x = xs.to(ACC)
            if CENTERED:
                nb = _rsum(m.to(ACC), axis=0)
                mb = _rsum(x, axis=0) / nb
                xc = tl.where(m, x - mb, 0.0)
                m2b = _rsum(xc * xc, axis=0)
                tot = n + nb
                delta = mb - mean
                mean = _chan_mean(mean, mb, delta, nb / tot)
                m2 = m2 + m2b + delta * delta * (n * nb / tot)
                n = tot
            else:
                m2 = m2 + _rsum(x * x, axis=0)
        rstd = 1.0 / tl.sqrt(m2 / L + eps)
        for start in range(0, L, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m = cols < L
            if HAS_RES:
                x = tl.load(S + base + cols, mask=m, other=0.0).to(ACC)
            else:
                x = tl.load(X + base + cols, mask=m, other=0.0).to(ACC)
            if CENTERED:
                x = x - mean
            y = x * rstd
            if HAS_W:
                y = y * tl.load(W + cols, mask=m, other=0.0).to(ACC)
            if HAS_B:
                y = y + tl.load(B + cols, mask=m, other=0.0).to(ACC)
            tl.store(Y + base + cols, y.to(Y.dtype.element_ty), mask=m)
    if CENTERED:
        tl.store(MEAN + row, mean.to(MEAN.dtype.element_ty))
    tl.store(RSTD + row, rstd.to(RSTD.dtype.element_ty))


@triton.jit
def _row_bwd(DY, X, W, MEAN, RSTD, DS, DX, DWP, DBP, R, L, rows_per_prog,
             HAS_W: tl.constexpr, HAS_DS: tl.constexpr, CENTERED: tl.constexpr,
             NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, LOOPED: tl.constexpr,
             BLOCK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    r0 = pid.to(tl.int64) * rows_per_prog          # int64 row index, so r * L cannot overflow
    r1 = tl.minimum(r0 + rows_per_prog, R)
    prow = pid.to(tl.int64) * L
    if not LOOPED:
        cols = tl.arange(0, BLOCK)
        m = cols < L
        if HAS_W:
            w = tl.load(W + cols, mask=m, other=0.0).to(ACC)
        dw_acc = tl.full([BLOCK], 0.0, ACC)
        db_acc = tl.full([BLOCK], 0.0, ACC)
        for r in range(r0, r1):
            base = r * L
            x = tl.load(X + base + cols, mask=m, other=0.0).to(ACC)
            dy = tl.load(DY + base + cols, mask=m, other=0.0).to(ACC)
            rstd = tl.load(RSTD + r).to(ACC)
            if HAS_W:
                g = dy * w
            else:
                g = dy
            if CENTERED:
                # the three sums are independent (one round of reductions, not two): the exact
                # batch mean is mean + delta, and sum(g * (xc - delta)) = s_gxc - delta * s_g
                xc = tl.where(m, x - tl.load(MEAN + r).to(ACC), 0.0)
                s_g = _rsum(g, axis=0)
                delta = _rsum(xc, axis=0) / L
                c1 = rstd * (_rsum(g * xc, axis=0) - delta * s_g) / L
                xhat = tl.where(m, xc - delta, 0.0) * rstd
                dx = rstd * (g - s_g / L - xhat * c1)
            else:
                xhat = x * rstd
                c1 = _rsum(g * xhat, axis=0) / L
                dx = rstd * (g - xhat * c1)
            if HAS_DS:
                dx = dx + tl.load(DS + base + cols, mask=m, other=0.0).to(ACC)
            tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=m)
            if NEED_DW:
                dw_acc += dy * xhat
            if NEED_DB:
                db_acc += dy
        if NEED_DW:
            tl.store(DWP + prow + cols, dw_acc.to(DWP.dtype.element_ty), mask=m)
        if NEED_DB:
            tl.store(DBP + prow + cols, db_acc.to(DBP.dtype.element_ty), mask=m)
    else:
        for r in range(r0, r1):
            base = r * L
            rstd = tl.load(RSTD + r).to(ACC)
            if CENTERED:
                mu = tl.load(MEAN + r).to(ACC)
            zero = _rsum(tl.full([BLOCK], 0.0, ACC), axis=0)
            s_xc = zero
            s_g = zero
            s_gxc = zero
            for start in range(0, L, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                m = cols < L
                x = tl.load(X + base + cols, mask=m, other=0.0).to(ACC)
                g = tl.load(DY + base + cols, mask=m, other=0.0).to(ACC)
                if HAS_W:
                    g = g * tl.load(W + cols, mask=m, other=0.0).to(ACC)
                if CENTERED:
                    xc = tl.where(m, x - mu, 0.0)
                    s_xc += _rsum(xc, axis=0)
                    s_g += _rsum(g, axis=0)
                else:
                    xc = x
                s_gxc += _rsum(g * xc, axis=0)
            if CENTERED:
                delta = s_xc / L
                mu = mu + delta
                c1 = rstd * (s_gxc - delta * s_g) / L        # mean(g * xhat)
                c2 = s_g / L
            else:
                c1 = rstd * s_gxc / L
            for start in range(0, L, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                m = cols < L
                x = tl.load(X + base + cols, mask=m, other=0.0).to(ACC)
                dy = tl.load(DY + base + cols, mask=m, other=0.0).to(ACC)
                if CENTERED:
                    xhat = tl.where(m, x - mu, 0.0) * rstd
                else:
                    xhat = x * rstd
                if HAS_W:
                    g = dy * tl.load(W + cols, mask=m, other=0.0).to(ACC)
                else:
                    g = dy
                if CENTERED:
                    dx = rstd * (g - c2 - xhat * c1)
                else:
                    dx = rstd * (g - xhat * c1)
                if HAS_DS:
                    dx = dx + tl.load(DS + base + cols, mask=m, other=0.0).to(ACC)
                tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=m)
                if NEED_DW:     # this program's own row of the partial buffer: no race
                    p = tl.load(DWP + prow + cols, mask=m, other=0.0)
                    tl.store(DWP + prow + cols, p + (dy * xhat).to(DWP.dtype.element_ty), mask=m)
                if NEED_DB:
                    p = tl.load(DBP + prow + cols, mask=m, other=0.0)
                    tl.store(DBP + prow + cols, p + dy.to(DBP.dtype.element_ty), mask=m)


@triton.jit
def _sum_partials(DWP, DBP, DW, DB, P, L, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                  BLOCK: tl.constexpr):
    """dweight / dbias: the column sums of the (P, L) partial buffers, in the gradients' dtype."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = cols < L
    dw = tl.full([BLOCK], 0.0, DWP.dtype.element_ty)
    db = tl.full([BLOCK], 0.0, DBP.dtype.element_ty)
    pw = DWP + cols                                 # pointers step by L: 64-bit offsets
    pb = DBP + cols
    for _ in range(0, P):
        if NEED_DW:
            dw += tl.load(pw, mask=m, other=0.0)
        if NEED_DB:
            db += tl.load(pb, mask=m, other=0.0)
        pw += L
        pb += L
    if NEED_DW:
        tl.store(DW + cols, dw.to(DW.dtype.element_ty), mask=m)
    if NEED_DB:
        tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=m)


# =============================================================================================
# channel-pattern kernels
# =============================================================================================

@triton.jit
def _finite_or_zero(shift):
    """The shift of the shifted sums, or 0 where it is not finite (an inf or NaN in the first
    tile): the sums about 0 then give the reference's mean (inf for an inf among finite values,
    NaN for +inf with -inf or a NaN) and a NaN M2, where ``x - inf`` would make both NaN."""
    return tl.where(shift - shift == 0.0, shift, 0.0)


@triton.jit
def _plane_moments(X, MEAN, M2, R, S, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                   ACC: tl.constexpr):
    """Per row (plane) of an (R, S) array: mean and sum of squared deviations.

    Sums of the values shifted by the mean of the first tile, accumulated elementwise (one
    reduction at the end, none in the loop): a constant offset of the data cancels exactly."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < R
    base = rows.to(tl.int64) * S
    cols = tl.arange(0, BLOCK_S)
    msk = rm[:, None] & (cols < S)[None, :]
    x = tl.load(X + base[:, None] + cols[None, :], mask=msk, other=0.0).to(ACC)
    shift = _finite_or_zero(_rsum(x, axis=1) / tl.minimum(S, BLOCK_S))
    xs = tl.where(msk, x - shift[:, None], 0.0)
    acc = xs
    acc2 = xs * xs
    for start in range(BLOCK_S, S, BLOCK_S):
        c = start + cols
        msk = rm[:, None] & (c < S)[None, :]
        x = tl.load(X + base[:, None] + c[None, :], mask=msk, other=0.0).to(ACC)
        xs = tl.where(msk, x - shift[:, None], 0.0)
        acc += xs
        acc2 += xs * xs
    s1 = _rsum(acc, axis=1)
    tl.store(MEAN + rows, (shift + s1 / S).to(MEAN.dtype.element_ty), mask=rm)
    tl.store(M2 + rows, (_rsum(acc2, axis=1) - s1 * s1 / S).to(M2.dtype.element_ty), mask=rm)


@triton.jit
def _plane_sums(DY, X, MEAN, SDY, SDYXC, SXC, R, S, C, NS, gs, BLOCK_R: tl.constexpr,
                BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """Per row (n, c) of (R, S): sum(dy), sum(dy * (x - mu)), sum(x - mu), mu the statistic
    ``MEAN[n * NS + c // gs]`` (NS = G for per-sample statistics, 0 for per-channel)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < R
    base = rows.to(tl.int64) * S
    mu = tl.load(MEAN + (rows // C) * NS + (rows % C) // gs, mask=rm, other=0.0).to(ACC)
    sdy = tl.full([BLOCK_R, BLOCK_S], 0.0, ACC)
    sdyxc = tl.full([BLOCK_R, BLOCK_S], 0.0, ACC)
    sxc = tl.full([BLOCK_R, BLOCK_S], 0.0, ACC)
    for start in range(0, S, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        msk = rm[:, None] & (cols < S)[None, :]
        off = base[:, None] + cols[None, :]
        x = tl.load(X + off, mask=msk, other=0.0).to(ACC)
        dy = tl.load(DY + off, mask=msk, other=0.0).to(ACC)
        xc = tl.where(msk, x - mu[:, None], 0.0)
        sdy += dy
        sdyxc += dy * xc
        sxc += xc
    tl.store(SDY + rows, _rsum(sdy, axis=1).to(SDY.dtype.element_ty), mask=rm)
    tl.store(SDYXC + rows, _rsum(sdyxc, axis=1).to(SDYXC.dtype.element_ty), mask=rm)
    tl.store(SXC + rows, _rsum(sxc, axis=1).to(SXC.dtype.element_ty), mask=rm)


@triton.jit
def _col_moments(X, MEAN_P, M2_P, M, K, rows_per_prog, P, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Slab b of a (B, M, K) array, rows [p * rows_per_prog, ...): per-column partial moments
    written to [b, p, k] of (B, P, K) buffers (shifted sums, as ``_plane_moments``)."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    km = ks < K
    r0 = p * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, M)
    slab = b * M * K
    rows = r0 + tl.arange(0, BLOCK_M)
    msk = (rows < r1)[:, None] & km[None, :]
    x = tl.load(X + slab + rows.to(tl.int64)[:, None] * K + ks[None, :], mask=msk,
                other=0.0).to(ACC)
    shift = _finite_or_zero(_rsum(x, axis=0) / tl.minimum(r1 - r0, BLOCK_M))
    xs = tl.where(msk, x - shift[None, :], 0.0)
    acc = xs
    acc2 = xs * xs
    for start in range(r0 + BLOCK_M, r1, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        msk = (rows < r1)[:, None] & km[None, :]
        x = tl.load(X + slab + rows.to(tl.int64)[:, None] * K + ks[None, :], mask=msk,
                    other=0.0).to(ACC)
        xs = tl.where(msk, x - shift[None, :], 0.0)
        acc += xs
        acc2 += xs * xs
    n = r1 - r0
    s1 = _rsum(acc, axis=0)
    out = (b * P + p) * K + ks
    tl.store(MEAN_P + out, (shift + s1 / n).to(MEAN_P.dtype.element_ty), mask=km)
    tl.store(M2_P + out, (_rsum(acc2, axis=0) - s1 * s1 / n).to(M2_P.dtype.element_ty), mask=km)


@triton.jit
def _col_sums(DY, X, MEAN, SDY_P, SDYXC_P, SXC_P, M, K, rows_per_prog, P, NS, gs,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Per-column partial sums of dy, dy * (x - mu), x - mu over a run of rows, mu the statistic
    ``MEAN[b * NS + k // gs]``."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    km = ks < K
    r0 = p * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, M)
    slab = b * M * K
    mu = tl.load(MEAN + b * NS + ks // gs, mask=km, other=0.0).to(ACC)
    sdy = tl.full([BLOCK_M, BLOCK_K], 0.0, ACC)
    sdyxc = tl.full([BLOCK_M, BLOCK_K], 0.0, ACC)
    sxc = tl.full([BLOCK_M, BLOCK_K], 0.0, ACC)
    for start in range(r0, r1, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        msk = (rows < r1)[:, None] & km[None, :]
        off = slab + rows.to(tl.int64)[:, None] * K + ks[None, :]
        x = tl.load(X + off, mask=msk, other=0.0).to(ACC)
        dy = tl.load(DY + off, mask=msk, other=0.0).to(ACC)
        xc = tl.where(msk, x - mu[None, :], 0.0)
        sdy += dy
        sdyxc += dy * xc
        sxc += xc
    out = (b * P + p) * K + ks
    tl.store(SDY_P + out, _rsum(sdy, axis=0).to(SDY_P.dtype.element_ty), mask=km)
    tl.store(SDYXC_P + out, _rsum(sdyxc, axis=0).to(SDYXC_P.dtype.element_ty), mask=km)
    tl.store(SXC_P + out, _rsum(sxc, axis=0).to(SXC_P.dtype.element_ty), mask=km)


@triton.jit
def _group_tile(G, gs, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr):
    """Slab b (program 0), a block of groups g (program 1) with its mask, and the channels
    c = g * gs + j of those groups ([BLOCK_G, BLOCK_J], mask cm)."""
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_J)
    gm = g < G
    return b, g, gm, gm[:, None] & (j < gs)[None, :], g[:, None] * gs + j[None, :]


@triton.jit
def _finalize_fwd(MEAN_P, M2_P, W, B, MEAN, VAR, RSTD, MU_C, A_C, C0_C, P, C, G, gs, per, M, eps,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, GIVEN: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr, ACC: tl.constexpr):
    """Statistics and the apply coefficients of slab b (program_id 0) for a block of groups.

    Partial moments (mean, m2) are (B, P, C): partial p covers min(per, M - p * per) values of
    each channel; a group is gs consecutive channels. Writes mean, var (biased), rstd (B, G) and
    the per-(b, c) coefficients of ``_apply``: mu = mean, a = rstd * w, c0 = bias.
    ``GIVEN``: MEAN_P and M2_P are the given mean and var (C,) instead (inference; gs = 1).
    """
    b, g, gm, cm, c = _group_tile(G, gs, BLOCK_G, BLOCK_J)
    if GIVEN:
        mean = tl.load(MEAN_P + g, mask=gm, other=0.0).to(ACC)
        var = tl.load(M2_P + g, mask=gm, other=1.0).to(ACC)
    else:
        n = _rsum(tl.full([BLOCK_G], 0.0, ACC), axis=0)
        mc = tl.full([BLOCK_G, BLOCK_J], 0.0, ACC)
        m2c = tl.full([BLOCK_G, BLOCK_J], 0.0, ACC)
        for p in range(0, P):                           # Chan's merge, partial by partial
            cnt = tl.minimum(per, M - p * per).to(ACC)
            off = (b * P + p) * C + c
            mb = tl.load(MEAN_P + off, mask=cm, other=0.0).to(ACC)
            m2b = tl.load(M2_P + off, mask=cm, other=0.0).to(ACC)
            tot = n + cnt
            d = mb - mc
            mc = _chan_mean(mc, mb, d, cnt / tot)
            m2c = m2c + m2b + d * d * (n * cnt / tot)
            n = tot
        # the gs channels of a group hold n values each: equal-count merge
        mean = _rsum(tl.where(cm, mc, 0.0), axis=1) / gs
        dev = tl.where(cm, mc - mean[:, None], 0.0)
        var = (_rsum(tl.where(cm, m2c, 0.0), axis=1) + n * _rsum(dev * dev, axis=1)) / (n * gs)
        # shifted sums can round below 0; NaN stays NaN (tl.maximum would return the 0)
        var = tl.where(var < 0.0, 0.0, var)
    rstd = 1.0 / tl.sqrt(var + eps)
    out = b * G + g
    tl.store(MEAN + out, mean.to(MEAN.dtype.element_ty), mask=gm)
    tl.store(VAR + out, var.to(VAR.dtype.element_ty), mask=gm)
    tl.store(RSTD + out, rstd.to(RSTD.dtype.element_ty), mask=gm)
    zero = tl.full([BLOCK_G, BLOCK_J], 0.0, ACC)
    a = rstd[:, None] + zero
    if HAS_W:
        a = a * tl.load(W + c, mask=cm, other=0.0).to(ACC)
    if HAS_B:
        c0 = tl.load(B + c, mask=cm, other=0.0).to(ACC)
    else:
        c0 = zero
    co = b * C + c
    tl.store(MU_C + co, (mean[:, None] + zero).to(MU_C.dtype.element_ty), mask=cm)
    tl.store(A_C + co, a.to(A_C.dtype.element_ty), mask=cm)
    tl.store(C0_C + co, c0.to(C0_C.dtype.element_ty), mask=cm)


@triton.jit
def _finalize_bwd(SDY_P, SDYXC_P, SXC_P, MEAN, RSTD, W, MU_C, A_C, D_C, C0_C, DW, DB,
                  P, C, G, gs, M,
                  HAS_W: tl.constexpr, SUMS: tl.constexpr, TRAINING: tl.constexpr,
                  NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr, ACC: tl.constexpr):
    """The backward's per-statistic algebra for slab b and a block of groups.

    From the partial sums (B, P, C) of dy, dy * (x - mean), x - mean: the exact batch mean
    (mean + delta), dweight/dbias of slab b (DW, DB (B, C)), and the coefficients of ``_apply``
    for dx = (x - mu) * a + d * dy + c0 (training) or d * dy (given statistics).
    """
    b, g, gm, cm, c = _group_tile(G, gs, BLOCK_G, BLOCK_J)
    co = b * C + c
    zero = tl.full([BLOCK_G, BLOCK_J], 0.0, ACC)
    rstd = tl.load(RSTD + b * G + g, mask=gm, other=0.0).to(ACC)
    if HAS_W:
        w = tl.load(W + c, mask=cm, other=0.0).to(ACC)
    else:
        w = tl.where(cm, 1.0, 0.0) + zero
    if SUMS:
        sdy = zero
        sdyxc = zero
        sxc = zero
        for p in range(0, P):
            off = (b * P + p) * C + c
            sdy += tl.load(SDY_P + off, mask=cm, other=0.0).to(ACC)
            sdyxc += tl.load(SDYXC_P + off, mask=cm, other=0.0).to(ACC)
            sxc += tl.load(SXC_P + off, mask=cm, other=0.0).to(ACC)
        if TRAINING:
            delta = _rsum(sxc, axis=1) / M                 # exact batch mean - mean
        else:
            delta = _rsum(zero, axis=1)
        sdyxhat = rstd[:, None] * (sdyxc - delta[:, None] * sdy)      # sum(dy * xhat)
        if NEED_W:
            tl.store(DW + co, sdyxhat.to(DW.dtype.element_ty), mask=cm)
        if NEED_B:
            tl.store(DB + co, sdy.to(DB.dtype.element_ty), mask=cm)
        if TRAINING:
            mg = _rsum(w * sdy, axis=1) / M                # mean(dy * w)
            mgx = _rsum(w * sdyxhat, axis=1) / M           # mean(dy * w * xhat)
            mean = tl.load(MEAN + b * G + g, mask=gm, other=0.0).to(ACC)
            tl.store(MU_C + co, ((mean + delta)[:, None] + zero).to(MU_C.dtype.element_ty), mask=cm)
            tl.store(A_C + co, ((-rstd * rstd * mgx)[:, None] + zero).to(A_C.dtype.element_ty),
                     mask=cm)
            tl.store(C0_C + co, ((-rstd * mg)[:, None] + zero).to(C0_C.dtype.element_ty), mask=cm)
    if not TRAINING:
        tl.store(C0_C + co, zero.to(C0_C.dtype.element_ty), mask=cm)
    tl.store(D_C + co, (rstd[:, None] * w).to(D_C.dtype.element_ty), mask=cm)


@triton.jit
def _apply(X, DY, OUT, MU, A, D, C0, ROWS, COLS, C, S, NS,
           HAS_X: tl.constexpr, HAS_DY: tl.constexpr, CL: tl.constexpr,
           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """out = (x - MU[i]) * A[i] + D[i] * dy + C0[i], i = n * NS + c, on a (ROWS, COLS) view.

    Channels-first (CL False): rows are (n, c) planes, columns the S spatial values.
    Channels-last: rows are (n, s) with s < S, columns the C channels.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rm = rows < ROWS
    cm = cols < COLS
    msk = rm[:, None] & cm[None, :]
    off = rows.to(tl.int64)[:, None] * COLS + cols[None, :]
    if CL:
        idx = (rows // S)[:, None] * NS + cols[None, :]
        cmsk = msk
    else:
        idx = ((rows // C) * NS + rows % C)[:, None]
        cmsk = rm[:, None]
    out = tl.load(C0 + idx, mask=cmsk, other=0.0).to(ACC)
    if HAS_X:
        x = tl.load(X + off, mask=msk, other=0.0).to(ACC)
        mu = tl.load(MU + idx, mask=cmsk, other=0.0).to(ACC)
        a = tl.load(A + idx, mask=cmsk, other=0.0).to(ACC)
        out = out + (x - mu) * a
    if HAS_DY:
        dy = tl.load(DY + off, mask=msk, other=0.0).to(ACC)
        d = tl.load(D + idx, mask=cmsk, other=0.0).to(ACC)
        out = out + d * dy
    tl.store(OUT + off, out.to(OUT.dtype.element_ty), mask=msk)


# =============================================================================================
# argument handling
# =============================================================================================

def _tensor(x, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"the triton backend takes torch tensors, got {name} of type {type(x).__name__}; "
            f"use torch.as_tensor({name}, device='cuda'), or the numba/numpy backend for arrays")
    return x


def _input(x):
    x = _tensor(x)
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"the triton backend supports float16, bfloat16, float32 and float64 input, got dtype "
            f"{x.dtype}; cast the input, e.g. x.float()")
    why = _cannot_run(x.device.type)
    if why is not None:
        raise ValueError(f"the triton backend cannot run on a tensor on {x.device}: {why}")
    return x


def _opt(v, x, name):
    """An optional parameter/statistic tensor, contiguous, on x's device."""
    if v is None:
        return None
    v = _tensor(v, name)
    if v.device != x.device:
        raise ValueError(f"{name} is on device {v.device} but x is on {x.device}; move it with "
                         f"{name}.to(x.device)")
    return v.detach().contiguous()


def _dy(dy, x):
    dy = _tensor(dy, "dy")
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy must have the shape of x {tuple(x.shape)}, got shape {tuple(dy.shape)}")
    if not dy.is_floating_point():
        raise TypeError(f"dy must be a floating-point tensor, got dtype {dy.dtype}")
    return dy.detach().to(x.dtype)


def _want(flag, weight):
    return weight is not None if flag is None else bool(flag)


def _grad_dtype(x, weight):
    return x.dtype if weight is None else weight.dtype


def _stat(v, x, n, name, dtype=torch.float32):
    if v is None:
        raise ValueError(f"{name} is required: pass the {name} returned by the forward call")
    v = _opt(v, x, name)
    if v.numel() != n:
        raise ValueError(f"{name} must have {n} values, got shape {tuple(v.shape)}")
    return v.reshape(n).to(dtype)


def _dummy(x):
    return x.new_empty(1)


# =============================================================================================
# LayerNorm / RMSNorm
# =============================================================================================

def _row_block(L: int):
    block = triton.next_power_of_2(max(L, 1))
    if block <= ROW_BLOCK_MAX:
        return block, False
    return min(triton.next_power_of_2(ROW_LOOP_BLOCK), block), True


def _row_shape(x, normalized_shape, what):
    shape = _checks.normalized_shape_tuple(normalized_shape)
    _checks.check_normalized_shape(x, shape, what)
    L = math.prod(shape)
    lead = tuple(x.shape[:x.ndim - len(shape)])
    return shape, L, lead


def _row_forward(x, residual, normalized_shape, weight, bias, eps, centered, what):
    x = _input(x).detach()
    shape, L, lead = _row_shape(x, normalized_shape, what)
    _checks.check_param_shape(weight, shape, "weight")
    _checks.check_param_shape(bias, shape, "bias")
    w, b = _opt(weight, x, "weight"), _opt(bias, x, "bias")
    xc = x.contiguous()
    R = xc.numel() // L if L else 0
    s = None
    if residual is not None:
        residual = _tensor(residual, "residual").detach()
        if tuple(residual.shape) != tuple(x.shape):
            raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got shape "
                             f"{tuple(residual.shape)}")
        residual = residual.to(x.dtype).contiguous()
        s = torch.empty_like(xc)
    y = torch.empty_like(xc)
    sd = _stat_dtype(x.dtype)
    mean = torch.empty(R, dtype=sd, device=x.device)
    rstd = torch.empty(R, dtype=sd, device=x.device)
    if R:
        block, looped = _row_block(L)
        d = _dummy(x)
        with _launch_env():
            _row_fwd[(R,)](xc, d if residual is None else residual, d if s is None else s, y,
                           d if w is None else w, d if b is None else b, mean, rstd, L,
                           float(eps), HAS_RES=residual is not None, HAS_W=w is not None,
                           HAS_B=b is not None, CENTERED=centered, LOOPED=looped, BLOCK=block,
                           ACC=_acc(x.dtype), num_warps=_warps(block))
    return y.view(x.shape), (None if s is None else s.view(x.shape)), mean.view(lead), rstd.view(lead)


def _row_backward(dy, x, normalized_shape, weight, mean, rstd, centered, need_w, need_b, what,
                  dsum=None):
    x = _input(x).detach()
    shape, L, lead = _row_shape(x, normalized_shape, what)
    _checks.check_param_shape(weight, shape, "weight")
    w = _opt(weight, x, "weight")
    dyc = _dy(dy, x).contiguous()
    xc = x.contiguous()
    R = xc.numel() // L if L else 0
    sd = _stat_dtype(x.dtype)
    mean_t = _stat(mean, x, R, "mean", sd) if centered else None
    rstd_t = _stat(rstd, x, R, "rstd", sd)
    ds = None if dsum is None else _dy(dsum, x).contiguous()
    dx = torch.empty_like(xc)
    gdt = _grad_dtype(x, weight)
    dweight = dbias = None
    if R:
        block, looped = _row_block(L)
        warps = min(ROW_BWD_WARPS, _warps(block))
        P = programs(R, x.device, per_sm=max(2, 16 // warps))
        per = triton.cdiv(R, P)
        P = triton.cdiv(R, per)
        acc_dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        alloc = torch.zeros if looped else torch.empty
        dwp = alloc((P, L), dtype=acc_dt, device=x.device) if need_w else None
        dbp = alloc((P, L), dtype=acc_dt, device=x.device) if need_b else None
        d = _dummy(x)
        with _launch_env():
            _row_bwd[(P,)](dyc, xc, d if w is None else w, d if mean_t is None else mean_t, rstd_t,
                           d if ds is None else ds, dx, d if dwp is None else dwp,
                           d if dbp is None else dbp, R, L, per, HAS_W=w is not None,
                           HAS_DS=ds is not None, CENTERED=centered, NEED_DW=need_w,
                           NEED_DB=need_b, LOOPED=looped, BLOCK=block, ACC=_acc(x.dtype),
                           num_warps=warps)
        if need_w or need_b:
            dweight = torch.empty(shape, dtype=gdt, device=x.device) if need_w else None
            dbias = torch.empty(shape, dtype=gdt, device=x.device) if need_b else None
            bs = min(SUM_BLOCK, triton.next_power_of_2(L))
            with _launch_env():
                _sum_partials[(triton.cdiv(L, bs),)](
                    d if dwp is None else dwp, d if dbp is None else dbp,
                    d if dweight is None else dweight, d if dbias is None else dbias, P, L,
                    NEED_DW=need_w, NEED_DB=need_b, BLOCK=bs)
    else:
        if need_w:
            dweight = torch.zeros(shape, dtype=gdt, device=x.device)
        if need_b:
            dbias = torch.zeros(shape, dtype=gdt, device=x.device)
        if ds is not None:
            dx.copy_(ds)
    return dx.view(x.shape), dweight, dbias


def layer_norm_forward(x, normalized_shape, weight, bias, eps):
    r"""Layer norm over the trailing ``normalized_shape``: ``(y, mean, rstd)`` (one per row)."""
    _checks.check_eps(eps)
    y, _, mean, rstd = _row_forward(x, None, normalized_shape, weight, bias, eps, True, "layer_norm")
    return y, mean, rstd


def layer_norm_backward(dy, x, normalized_shape, weight, mean, rstd, *, need_weight_grad=None,
                        need_bias_grad=None):
    r"""Layer norm backward: ``(dx, dweight, dbias)``."""
    return _row_backward(dy, x, normalized_shape, weight, mean, rstd, True,
                         _want(need_weight_grad, weight), _want(need_bias_grad, weight),
                         "layer_norm")


def _rms_eps(eps, x):
    if eps is None:
        return torch.finfo(x.dtype if x.dtype not in _F16 else torch.float32).eps
    _checks.check_eps(eps)
    return float(eps)


def rms_norm_forward(x, normalized_shape, weight, eps=None):
    r"""RMS norm over the trailing ``normalized_shape``: ``(y, rstd)``; ``eps=None`` as torch."""
    eps = _rms_eps(eps, _tensor(x))
    y, _, _, rstd = _row_forward(x, None, normalized_shape, weight, None, eps, False, "rms_norm")
    return y, rstd


def rms_norm_backward(dy, x, normalized_shape, weight, rstd, *, need_weight_grad=None):
    r"""RMS norm backward: ``(dx, dweight)``."""
    dx, dw, _ = _row_backward(dy, x, normalized_shape, weight, None, rstd, False,
                              _want(need_weight_grad, weight), False, "rms_norm")
    return dx, dw


def add_layer_norm_forward(x, residual, normalized_shape, weight, bias, eps):
    r"""Fused ``s = x + residual; y = layer_norm(s)``: ``(y, s, mean, rstd)`` in one pass.

    The backward is ``layer_norm_add_backward`` below (the gradient reaching s from both y
    and the returned sum).
    """
    _checks.check_eps(eps)
    return _row_forward(x, residual, normalized_shape, weight, bias, eps, True, "layer_norm")


def add_rms_norm_forward(x, residual, normalized_shape, weight, eps=None):
    r"""Fused ``s = x + residual; y = rms_norm(s)``: ``(y, s, rstd)``."""
    eps = _rms_eps(eps, _tensor(x))
    y, s, _, rstd = _row_forward(x, residual, normalized_shape, weight, None, eps, False, "rms_norm")
    return y, s, rstd


def add_layer_norm_backward(dy, dsum, s, normalized_shape, weight, mean, rstd, *,
                            need_weight_grad=None, need_bias_grad=None):
    r"""Backward of ``add_layer_norm_forward``: ``(ds, dweight, dbias)``; ``ds`` (the gradient of
    the sum, from y and from ``dsum``, the gradient of the returned sum; None for none) is the
    gradient of both x and residual."""
    return _row_backward(dy, s, normalized_shape, weight, mean, rstd, True,
                         _want(need_weight_grad, weight), _want(need_bias_grad, weight),
                         "layer_norm", dsum=dsum)


def add_rms_norm_backward(dy, dsum, s, normalized_shape, weight, rstd, *, need_weight_grad=None):
    r"""Backward of ``add_rms_norm_forward``: ``(ds, dweight)``."""
    dx, dw, _ = _row_backward(dy, s, normalized_shape, weight, None, rstd, False,
                              _want(need_weight_grad, weight), False, "rms_norm", dsum=dsum)
    return dx, dw


__all__ += ["add_layer_norm_backward", "add_rms_norm_backward"]


# =============================================================================================
# channel pattern: BatchNorm, GroupNorm, InstanceNorm
# =============================================================================================

class _Layout:
    """An (N, C, *S) or (N, *S, C) input as the channel kernels see it (contiguous, no copy when
    the memory already is one of the two)."""

    def __init__(self, x, channels_last):
        if x.ndim < 3:
            xp, cl, swapped = x.contiguous(), True, False        # (N, C): S = 1, channels-last
        elif x.is_contiguous():
            xp, cl, swapped = x, bool(channels_last), False
        else:
            alt = x.movedim(1, -1) if not channels_last else x.movedim(-1, 1)
            if alt.is_contiguous():
                xp, cl, swapped = alt, not channels_last, True
            else:
                xp, cl, swapped = x.contiguous(), bool(channels_last), False
        self.x, self.cl, self.swapped, self.declared = xp, cl, swapped, bool(channels_last)
        self.N = xp.shape[0]
        self.C = xp.shape[-1] if cl else xp.shape[1]
        sp = xp.shape[1:-1] if cl else xp.shape[2:]
        self.S = math.prod(sp)

    def same(self, a):
        """dy (declared layout) in x's physical layout, contiguous."""
        if a.ndim >= 3 and self.swapped:
            a = a.movedim(1, -1) if not self.declared else a.movedim(-1, 1)
        return a.contiguous()

    def restore(self, a):
        if not self.swapped:
            return a
        return a.movedim(-1, 1) if not self.declared else a.movedim(1, -1)


def _plane_blocks(S: int):
    bs = min(PLANE_BLOCK_S, triton.next_power_of_2(max(S, 1)))
    return bs, max(PLANE_BLOCK_R, PLANE_TILE // bs)


def _col_split(B: int, M: int, K: int, dev):
    """``(P, per, kb, bk)``: P programs per slab and column block over runs of ``per`` rows
    (a multiple of COL_BLOCK_M), kb column blocks of bk columns; about ``programs()`` in all."""
    bk = min(COL_BLOCK_K, triton.next_power_of_2(max(K, 1)))
    kb = triton.cdiv(K, bk)
    row_blocks = triton.cdiv(M, COL_BLOCK_M)
    P = max(1, min(row_blocks, programs(B * kb * row_blocks, dev, COL_PER_SM) // (B * kb)))
    per = triton.cdiv(triton.cdiv(M, P), COL_BLOCK_M) * COL_BLOCK_M
    return triton.cdiv(M, per), per, kb, bk


class _Split:
    """How the channel kernels cut a non-empty input into partials: B slabs (statistics per
    slab: the samples for GroupNorm/InstanceNorm, one for BatchNorm) of P partials per channel,
    partial p covering ``min(per, M - p * per)`` of the slab's M values per channel. The partial
    buffers are (B, P, C); statistic (b, g) pools the partials of its gs channels."""

    def __init__(self, lay, per_sample, G, partials=True):
        N, C, S = lay.N, lay.C, lay.S
        self.B, self.G, self.gs = _slabs(lay, per_sample), G, C // G
        self.NS = G if per_sample else 0            # statistic of row n: n * NS + c // gs
        if not partials:                            # given statistics: no partials to cut
            self.P = self.per = self.M = 1
        elif not lay.cl:                            # one partial per (n, c) plane
            self.P, self.per = (1 if per_sample else N), S
            self.M = self.P * S
        else:
            self.M = S if per_sample else N * S
            self.P, self.per, self.kb, self.bk = _col_split(self.B, self.M, C, lay.x.device)
        self.count = self.gs * self.M               # values behind one statistic

    def fin_grid(self):
        bj = triton.next_power_of_2(self.gs)
        bg = max(1, min(triton.next_power_of_2(self.G), FIN_TILE // bj))
        return (self.B, triton.cdiv(self.G, bg)), bg, bj


def _slabs(lay, per_sample):
    return lay.N if per_sample else 1


def _moments(lay, sp, acc_dt):
    """Partial ``(mean, m2)`` (B, P, C) of the input."""
    x, N, C, S = lay.x, lay.N, lay.C, lay.S
    mean = torch.empty((sp.B, sp.P, C), dtype=acc_dt, device=x.device)
    m2 = torch.empty_like(mean)
    with _launch_env():
        if not lay.cl:
            bs, br = _plane_blocks(S)
            _plane_moments[(triton.cdiv(N * C, br),)](x, mean, m2, N * C, S, BLOCK_R=br,
                                                      BLOCK_S=bs, ACC=_acc(x.dtype))
        else:
            _col_moments[(sp.B, sp.P, sp.kb)](x, mean, m2, sp.M, C, sp.per, sp.P,
                                              BLOCK_M=COL_BLOCK_M, BLOCK_K=sp.bk, ACC=_acc(x.dtype))
    return mean, m2


def _sums(lay, sp, dy, mean_g, acc_dt):
    """Partial sums (B, P, C) of dy, dy * (x - mean), x - mean, mean the (B, G) statistics."""
    x, N, C, S = lay.x, lay.N, lay.C, lay.S
    out = [torch.empty((sp.B, sp.P, C), dtype=acc_dt, device=x.device) for _ in range(3)]
    with _launch_env():
        if not lay.cl:
            bs, br = _plane_blocks(S)
            _plane_sums[(triton.cdiv(N * C, br),)](dy, x, mean_g, *out, N * C, S, C, sp.NS, sp.gs,
                                                   BLOCK_R=br, BLOCK_S=bs, ACC=_acc(x.dtype))
        else:
            _col_sums[(sp.B, sp.P, sp.kb)](dy, x, mean_g, *out, sp.M, C, sp.per, sp.P, sp.NS, sp.gs,
                                           BLOCK_M=COL_BLOCK_M, BLOCK_K=sp.bk, ACC=_acc(x.dtype))
    return out


def _apply_launch(lay, out, mu, a, d, c0, ns, dy=None, has_x=True):
    """Run ``_apply`` with (B', C) coefficient tensors (B' = 1 with ns = 0, or N with ns = C)."""
    x, N, C, S = lay.x, lay.N, lay.C, lay.S
    ROWS, COLS = (N * S, C) if lay.cl else (N * C, S)
    bc = min(APPLY_BLOCK_C, triton.next_power_of_2(max(COLS, 1)))
    br = max(APPLY_BLOCK_R, APPLY_TILE // bc)
    with _launch_env():
        _apply[(triton.cdiv(ROWS, br), triton.cdiv(COLS, bc))](
            x, x if dy is None else dy, out, c0 if mu is None else mu, c0 if a is None else a,
            c0 if d is None else d, c0, ROWS, COLS, C, S, ns, HAS_X=has_x, HAS_DY=dy is not None,
            CL=lay.cl, BLOCK_R=br, BLOCK_C=bc, ACC=_acc(x.dtype))


def _param(v, C, x, name):
    """An optional per-channel parameter, checked, as the kernels read it (any float dtype)."""
    _checks.check_vector(v, C, name)
    return None if v is None else _opt(v, x, name).reshape(C)


def _channel_forward(x, G, weight, bias, eps, channels_last, per_sample, mean=None, var=None):
    """Shared forward: ``(y, mean, var, rstd)``, statistics (B', G) in the statistics dtype
    (B' = N per sample, else 1); ``mean``/``var`` given: inference with them (G = C)."""
    lay = _Layout(x, channels_last)
    C = lay.C
    sd = _stat_dtype(x.dtype)
    w, b = _param(weight, C, x, "weight"), _param(bias, C, x, "bias")
    # three allocations, not views of one: custom-op outputs may not share storage
    stats = [torch.empty((_slabs(lay, per_sample), G), dtype=sd, device=x.device)
             for _ in range(3)]
    if not x.numel():
        return (lay.restore(torch.empty_like(lay.x)),) + tuple(t.fill_(math.nan) for t in stats)
    given = mean is not None
    sp = _Split(lay, per_sample, G, partials=not given)
    if given:
        mean_p, m2_p = _opt(mean, x, "mean").reshape(C), _opt(var, x, "var").reshape(C)
    else:
        mean_p, m2_p = _moments(lay, sp, sd)
    coef = torch.empty((3, sp.B, C), dtype=sd, device=x.device)
    grid, bg, bj = sp.fin_grid()
    d = _dummy(x)
    with _launch_env():
        _finalize_fwd[grid](mean_p, m2_p, d if w is None else w, d if b is None else b,
                            stats[0], stats[1], stats[2], coef[0], coef[1], coef[2],
                            sp.P, C, G, sp.gs, sp.per, sp.M, float(eps), HAS_W=w is not None,
                            HAS_B=b is not None, GIVEN=given, BLOCK_G=bg, BLOCK_J=bj,
                            ACC=_acc(x.dtype))
    y = torch.empty_like(lay.x)
    _apply_launch(lay, y, coef[0], coef[1], None, coef[2], C if per_sample else 0)
    return lay.restore(y), stats[0], stats[1], stats[2]


def _channel_backward(dy, x, G, weight, mean, rstd, channels_last, need_w, need_b, per_sample,
                      training):
    """Shared backward: ``(dx, dweight, dbias)`` (statistics (N, G) or (C,))."""
    lay = _Layout(x, channels_last)
    C = lay.C
    dyp = lay.same(_dy(dy, x))
    sd = _stat_dtype(x.dtype)
    w = _param(weight, C, x, "weight")
    nstat = _slabs(lay, per_sample) * G
    mean_g, rstd_g = _stat(mean, x, nstat, "mean", sd), _stat(rstd, x, nstat, "rstd", sd)
    gdt = _grad_dtype(x, weight)
    dx = torch.empty_like(lay.x)
    if not x.numel():
        z = torch.zeros(C, dtype=gdt, device=x.device)
        return lay.restore(dx), (z if need_w else None), (z.clone() if need_b else None)
    sums = bool(training or need_w or need_b)
    sp = _Split(lay, per_sample, G, partials=sums)
    parts = _sums(lay, sp, dyp, mean_g, sd) if sums else [rstd_g] * 3
    coef = torch.empty((4, sp.B, C), dtype=sd, device=x.device)
    # dweight/dbias of each slab; with one slab (BatchNorm) they are the results themselves
    gdt_b = gdt if sp.B == 1 else sd
    d = _dummy(x)
    dwb = torch.empty((sp.B, C), dtype=gdt_b, device=x.device) if need_w else d
    dbb = torch.empty((sp.B, C), dtype=gdt_b, device=x.device) if need_b else d
    grid, bg, bj = sp.fin_grid()
    with _launch_env():
        _finalize_bwd[grid](*parts, mean_g, rstd_g, d if w is None else w, coef[0],
                            coef[1], coef[2], coef[3], dwb, dbb, sp.P, C, G, sp.gs,
                            sp.count, HAS_W=w is not None, SUMS=sums, TRAINING=training,
                            NEED_W=need_w, NEED_B=need_b, BLOCK_G=bg, BLOCK_J=bj,
                            ACC=_acc(x.dtype))
    ns = C if per_sample else 0
    if training:
        _apply_launch(lay, dx, coef[0], coef[1], coef[2], coef[3], ns, dy=dyp)
    else:
        _apply_launch(lay, dx, None, None, coef[2], coef[3], ns, dy=dyp, has_x=False)
    def total(t, need):
        return None if not need else t.view(C) if sp.B == 1 else t.sum(0).to(gdt)

    return lay.restore(dx), total(dwb, need_w), total(dbb, need_b)


def batch_norm_forward(x, weight, bias, eps, *, channels_last=False, mean=None, var=None):
    r"""Batch norm forward: ``(y, mean, var, rstd)``, statistics ``(C,)``.

    ``mean``/``var`` None: training (batch statistics, biased variance); given: inference.
    """
    x = _input(x).detach()
    _checks.check_min_ndim(x, 2, "batch_norm", "(N, C, *spatial)")
    _checks.check_eps(eps)
    _checks.check_stats_pair(mean, var, "batch_norm")
    lay = _Layout(x, channels_last)
    C = lay.C
    for name, v in (("weight", weight), ("bias", bias), ("mean", mean), ("var", var)):
        _checks.check_vector(v, C, name)
    if mean is None:
        _checks.check_values_per_channel(lay.N * lay.S, x.shape, "batch_norm")
    elif x.device.type != "cuda" and bool((var < 0).any()):
        # on CUDA this check would wait for the GPU on every call: there, as in torch, a negative
        # given variance gives NaN in its channel's output
        i = int((var < 0).nonzero()[0, 0])
        raise ValueError(
            f"batch_norm: the given var has a negative entry (a variance must be >= 0), got "
            f"var[{i}]={float(var[i])!r}; pass the running variance, not a log-variance")
    y, mean_g, var_g, rstd_g = _channel_forward(x, C, weight, bias, eps, channels_last, False,
                                                mean, var)
    return y, mean_g.view(C), var_g.view(C), rstd_g.view(C)


def batch_norm_backward(dy, x, weight, mean, rstd, *, channels_last=False, training=True,
                        need_weight_grad=None, need_bias_grad=None):
    r"""Batch norm backward: ``(dx, dweight, dbias)``; ``training=False``: given statistics."""
    x = _input(x).detach()
    _checks.check_min_ndim(x, 2, "batch_norm", "(N, C, *spatial)")
    C = _Layout(x, channels_last).C
    _checks.check_vector(weight, C, "weight")
    return _channel_backward(dy, x, C, weight, mean, rstd, channels_last,
                             _want(need_weight_grad, weight), _want(need_bias_grad, weight),
                             False, bool(training))


def _channels(x, channels_last):
    return x.shape[-1] if (channels_last and x.ndim >= 3) else x.shape[1]


def group_norm_forward(x, num_groups, weight, bias, eps, *, channels_last=False):
    r"""Group norm forward: ``(y, mean, rstd)``, statistics ``(N, G)``."""
    x = _input(x).detach()
    _checks.check_min_ndim(x, 2, "group_norm", "(N, C, *spatial)")
    _checks.check_eps(eps)
    C = _channels(x, channels_last)
    _checks.check_groups(num_groups, C)
    G = int(num_groups)
    for name, v in (("weight", weight), ("bias", bias)):
        _checks.check_vector(v, C, name)
    y, mean_g, _, rstd_g = _channel_forward(x, G, weight, bias, eps, channels_last, True)
    return y, mean_g, rstd_g


def group_norm_backward(dy, x, num_groups, weight, mean, rstd, *, channels_last=False,
                        need_weight_grad=None, need_bias_grad=None):
    r"""Group norm backward: ``(dx, dweight, dbias)``."""
    x = _input(x).detach()
    _checks.check_min_ndim(x, 2, "group_norm", "(N, C, *spatial)")
    C = _channels(x, channels_last)
    _checks.check_groups(num_groups, C)
    _checks.check_vector(weight, C, "weight")
    return _channel_backward(dy, x, int(num_groups), weight, mean, rstd, channels_last,
                             _want(need_weight_grad, weight), _want(need_bias_grad, weight),
                             True, True)


def _instance_checks(x, channels_last, weight, bias):
    _checks.check_min_ndim(x, 3, "instance_norm", "(N, C, *spatial) with at least one spatial dim")
    C = _channels(x, channels_last)
    for name, v in (("weight", weight), ("bias", bias)):
        _checks.check_vector(v, C, name)
    return C


def instance_norm_forward(x, weight, bias, eps, *, channels_last=False):
    r"""Instance norm forward: ``(y, mean, var, rstd)``, statistics ``(N, C)``."""
    x = _input(x).detach()
    C = _instance_checks(x, channels_last, weight, bias)
    _checks.check_eps(eps)
    spatial = math.prod(x.shape[1:-1] if channels_last else x.shape[2:])
    if spatial <= 1:
        raise ValueError(
            f"instance_norm in training needs more than 1 spatial element per channel, got an "
            f"input of shape {tuple(x.shape)} ({spatial} spatial element); InstanceNorm of a "
            f"single value is always 0: use LayerNorm or BatchNorm for (N, C) data")
    return _channel_forward(x, C, weight, bias, eps, channels_last, True)


def instance_norm_backward(dy, x, weight, mean, rstd, *, channels_last=False, need_weight_grad=None,
                           need_bias_grad=None):
    r"""Instance norm backward: ``(dx, dweight, dbias)``."""
    x = _input(x).detach()
    C = _instance_checks(x, channels_last, weight, None)
    return _channel_backward(dy, x, C, weight, mean, rstd, channels_last,
                             _want(need_weight_grad, weight), _want(need_bias_grad, weight),
                             True, True)
