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
    ``_row_bwd``: a persistent grid of P programs (``programs()``), each over a contiguous run
    of rows: dx per row, and dweight/dbias partial sums over its rows accumulated in registers
    (one-pass) or in its own row of the (P, L) float32 partial buffer (looped), written
    without atomics or locks; ``dweight = partials.sum(0)`` is the second, small reduction.
    The mean is refined to the exact batch mean (``mean + sum(x - mean) / L``), as numba's.

channel pattern (BatchNorm, GroupNorm, InstanceNorm; (N, C, *S) and (N, *S, C))
    Statistics are per (sample, channel) partial moments, merged on the host (small tensors):
    ``_plane_moments`` / ``_plane_sums`` for channels-first (each (n, c) plane is a
    contiguous row of S values; programs take BLOCK_R planes and loop over S), and
    ``_col_moments`` / ``_col_sums`` for channels-last (a (B, P, column-block) grid: each
    program reduces a run of rows of an (M, C) slab into per-column partials, again with
    per-tile two-pass moments and Chan's merge; no atomics). ``_apply`` then writes
    ``y = (x - mu) * a + c`` (forward) or ``dx = d * dy + (x - mu) * a + c`` (backward) with
    per-(n, c) coefficients: two reads of x (three of x and dy in backward), as the
    statistics are needed before any output.

Statistics returned by the forward functions (``mean``, ``var``, ``rstd``) are float32 for
16-bit inputs (the accumulation precision, as torch's CUDA kernels return them) and x's dtype
otherwise; ``dweight``/``dbias`` have the weight's dtype (x's when there is no weight).

Block sizes and the persistent grid size are module attributes (``ROW_BLOCK_MAX``,
``ROW_LOOP_BLOCK``, ``PLANE_BLOCK_R``, ``PLANE_BLOCK_S``, ``PLANE_TILE``, ``COL_BLOCK_M``,
``COL_BLOCK_K``, ``APPLY_BLOCK_R``, ``APPLY_BLOCK_C``, ``APPLY_TILE``, ``programs``): tests
shrink them to force the looped and multi-program paths on small shapes.

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
#: elementwise apply: tiles of at least APPLY_BLOCK_R rows by up to APPLY_BLOCK_C columns,
#: APPLY_TILE values (narrow rows: more rows per tile)
APPLY_BLOCK_R = 16
APPLY_BLOCK_C = 128
APPLY_TILE = 2048

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


def programs(work: int, device) -> int:
    """Size of a persistent grid over ``work`` independent items (rows, row blocks)."""
    if torch.device(device).type == "cuda" and not INTERPRET:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = 4 * sms
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
                mean = mean + delta * (nb / tot)
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


# =============================================================================================
# channel-pattern kernels
# =============================================================================================

@triton.jit
def _plane_moments(X, MEAN, M2, R, S, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                   ACC: tl.constexpr):
    """Per row (plane) of an (R, S) array: mean and sum of squared deviations (Chan merge)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < R
    base = rows.to(tl.int64) * S
    n = tl.full([BLOCK_R], 0.0, ACC)
    mean = tl.full([BLOCK_R], 0.0, ACC)
    m2 = tl.full([BLOCK_R], 0.0, ACC)
    for start in range(0, S, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        msk = rm[:, None] & (cols < S)[None, :]
        x = tl.load(X + base[:, None] + cols[None, :], mask=msk, other=0.0).to(ACC)
        nb = _rsum(msk.to(ACC), axis=1)
        mb = _rsum(x, axis=1) / tl.maximum(nb, 1.0)
        xc = tl.where(msk, x - mb[:, None], 0.0)
        m2b = _rsum(xc * xc, axis=1)
        tot = tl.maximum(n + nb, 1.0)
        delta = mb - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta * delta * (n * nb / tot)
        n = n + nb
    tl.store(MEAN + rows, mean.to(MEAN.dtype.element_ty), mask=rm)
    tl.store(M2 + rows, m2.to(M2.dtype.element_ty), mask=rm)


@triton.jit
def _plane_sums(DY, X, MU, SDY, SDYXC, SXC, R, S, BLOCK_R: tl.constexpr,
                BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """Per row of (R, S): sum(dy), sum(dy * (x - mu)), sum(x - mu) with mu per row."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < R
    base = rows.to(tl.int64) * S
    mu = tl.load(MU + rows, mask=rm, other=0.0).to(ACC)
    sdy = tl.full([BLOCK_R], 0.0, ACC)
    sdyxc = tl.full([BLOCK_R], 0.0, ACC)
    sxc = tl.full([BLOCK_R], 0.0, ACC)
    for start in range(0, S, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        msk = rm[:, None] & (cols < S)[None, :]
        off = base[:, None] + cols[None, :]
        x = tl.load(X + off, mask=msk, other=0.0).to(ACC)
        dy = tl.load(DY + off, mask=msk, other=0.0).to(ACC)
        xc = tl.where(msk, x - mu[:, None], 0.0)
        sdy += _rsum(dy, axis=1)
        sdyxc += _rsum(dy * xc, axis=1)
        sxc += _rsum(xc, axis=1)
    tl.store(SDY + rows, sdy.to(SDY.dtype.element_ty), mask=rm)
    tl.store(SDYXC + rows, sdyxc.to(SDYXC.dtype.element_ty), mask=rm)
    tl.store(SXC + rows, sxc.to(SXC.dtype.element_ty), mask=rm)


@triton.jit
def _col_moments(X, MEAN_P, M2_P, M, K, rows_per_prog, P, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Slab b of a (B, M, K) array, rows [p * rows_per_prog, ...): per-column partial moments
    written to [b, p, k] of (B, P, K) buffers."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    km = ks < K
    r0 = p * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, M)
    slab = b * M * K
    n = tl.full([BLOCK_K], 0.0, ACC)
    mean = tl.full([BLOCK_K], 0.0, ACC)
    m2 = tl.full([BLOCK_K], 0.0, ACC)
    for start in range(r0, r1, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        msk = (rows < r1)[:, None] & km[None, :]
        x = tl.load(X + slab + rows.to(tl.int64)[:, None] * K + ks[None, :], mask=msk,
                    other=0.0).to(ACC)
        nb = _rsum(msk.to(ACC), axis=0)
        mb = _rsum(x, axis=0) / tl.maximum(nb, 1.0)
        xc = tl.where(msk, x - mb[None, :], 0.0)
        m2b = _rsum(xc * xc, axis=0)
        tot = tl.maximum(n + nb, 1.0)
        delta = mb - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta * delta * (n * nb / tot)
        n = n + nb
    out = (b * P + p) * K + ks
    tl.store(MEAN_P + out, mean.to(MEAN_P.dtype.element_ty), mask=km)
    tl.store(M2_P + out, m2.to(M2_P.dtype.element_ty), mask=km)


@triton.jit
def _col_sums(DY, X, MU, SDY_P, SDYXC_P, SXC_P, M, K, rows_per_prog, P,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Per-column partial sums of dy, dy * (x - mu), x - mu (mu per (b, k)) over a run of rows."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    km = ks < K
    r0 = p * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, M)
    slab = b * M * K
    mu = tl.load(MU + b * K + ks, mask=km, other=0.0).to(ACC)
    sdy = tl.full([BLOCK_K], 0.0, ACC)
    sdyxc = tl.full([BLOCK_K], 0.0, ACC)
    sxc = tl.full([BLOCK_K], 0.0, ACC)
    for start in range(r0, r1, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        msk = (rows < r1)[:, None] & km[None, :]
        off = slab + rows.to(tl.int64)[:, None] * K + ks[None, :]
        x = tl.load(X + off, mask=msk, other=0.0).to(ACC)
        dy = tl.load(DY + off, mask=msk, other=0.0).to(ACC)
        xc = tl.where(msk, x - mu[None, :], 0.0)
        sdy += _rsum(dy, axis=0)
        sdyxc += _rsum(dy * xc, axis=0)
        sxc += _rsum(xc, axis=0)
    out = (b * P + p) * K + ks
    tl.store(SDY_P + out, sdy.to(SDY_P.dtype.element_ty), mask=km)
    tl.store(SDYXC_P + out, sdyxc.to(SDYXC_P.dtype.element_ty), mask=km)
    tl.store(SXC_P + out, sxc.to(SXC_P.dtype.element_ty), mask=km)


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
        P = programs(R, x.device)
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
                           num_warps=_warps(block))
        if need_w:
            dweight = dwp.sum(0).to(gdt).view(shape)
        if need_b:
            dbias = dbp.sum(0).to(gdt).view(shape)
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


def _merge(mean, m2, count, dim):
    """Chan's merge along ``dim`` of partial (mean, m2) with ``count`` values each (broadcastable)."""
    if not isinstance(count, torch.Tensor):                  # equal counts: plain numbers
        mu = mean.mean(dim)
        m2 = m2.sum(dim) + count * ((mean - mu.unsqueeze(dim)) ** 2).sum(dim)
        return mu, m2, count * mean.shape[dim]
    count = count.expand_as(mean)
    n = count.sum(dim)
    mu = (mean * count).sum(dim) / n.clamp_min(1)
    m2 = m2.sum(dim) + (count * (mean - mu.unsqueeze(dim)) ** 2).sum(dim)
    return mu, m2, n


def _moments_nc(lay, acc_dt):
    """Per-(n, c) ``(mean, m2)`` of shape (N, C) and the count of values behind each."""
    x, N, C, S = lay.x, lay.N, lay.C, lay.S
    dev = x.device
    if not lay.cl:
        R = N * C
        mean = torch.empty(R, dtype=acc_dt, device=dev)
        m2 = torch.empty(R, dtype=acc_dt, device=dev)
        bs, br = _plane_blocks(S)
        with _launch_env():
            _plane_moments[(triton.cdiv(R, br),)](x, mean, m2, R, S, BLOCK_R=br, BLOCK_S=bs,
                                                  ACC=_acc(x.dtype))
        return mean.view(N, C), m2.view(N, C), S
    # channels-last: slabs of (S, C), partial moments over runs of rows
    return _col_moments_merged(x, N, S, C, acc_dt)


def _plane_blocks(S: int):
    bs = min(PLANE_BLOCK_S, triton.next_power_of_2(max(S, 1)))
    return bs, max(PLANE_BLOCK_R, PLANE_TILE // bs)


def _col_split(B: int, M: int, K: int, dev):
    """``(P, per, kb, bk)``: P programs per slab and column block over runs of ``per`` rows
    (a multiple of COL_BLOCK_M), kb column blocks of bk columns; about ``programs()`` in all."""
    bk = min(COL_BLOCK_K, triton.next_power_of_2(max(K, 1)))
    kb = triton.cdiv(K, bk)
    row_blocks = triton.cdiv(M, COL_BLOCK_M)
    P = max(1, min(row_blocks, programs(B * kb * row_blocks, dev) // (B * kb)))
    per = triton.cdiv(triton.cdiv(M, P), COL_BLOCK_M) * COL_BLOCK_M
    return triton.cdiv(M, per), per, kb, bk


def _col_moments_merged(x, B, M, C, acc_dt):
    """Per-(slab, column) moments of a (B, M, C) array: ``(mean, m2)`` (B, C) and M."""
    dev = x.device
    P, per, kb, bk = _col_split(B, M, C, dev)
    mean_p = torch.empty((B, P, C), dtype=acc_dt, device=dev)
    m2_p = torch.empty((B, P, C), dtype=acc_dt, device=dev)
    with _launch_env():
        _col_moments[(B, P, kb)](x, mean_p, m2_p, M, C, per, P, BLOCK_M=COL_BLOCK_M,
                                 BLOCK_K=bk, ACC=_acc(x.dtype))
    if P == 1:
        return mean_p[:, 0], m2_p[:, 0], M
    counts = torch.full((P,), float(per), dtype=acc_dt, device=dev)   # no host-to-device copy
    counts[-1] = float(M - (P - 1) * per)                                 # (that would sync)
    mean, m2, _ = _merge(mean_p, m2_p, counts.view(1, P, 1), 1)
    return mean, m2, M


def _moments_channel_last_flat(lay, acc_dt):
    """BatchNorm channels-last: (N * S, C) as one slab: per-channel (mean, m2) (1, C), count."""
    return _col_moments_merged(lay.x, 1, lay.N * lay.S, lay.C, acc_dt)


def _sums_nc(lay, dy, mu_nc, flat):
    """Per-(n, c) (or per-channel with ``flat`` channels-last) sums of dy, dy*(x-mu), x-mu."""
    x, N, C, S = lay.x, lay.N, lay.C, lay.S
    dev = x.device
    acc_dt = mu_nc.dtype
    if not lay.cl:
        R = N * C
        mu = mu_nc.expand(N, C).contiguous().view(R)
        out = [torch.empty(R, dtype=acc_dt, device=dev) for _ in range(3)]
        bs, br = _plane_blocks(S)
        with _launch_env():
            _plane_sums[(triton.cdiv(R, br),)](dy, x, mu, *out, R, S, BLOCK_R=br, BLOCK_S=bs,
                                               ACC=_acc(x.dtype))
        return [o.view(N, C) for o in out]
    B, M = (1, N * S) if flat else (N, S)
    mu = mu_nc.expand(B, C).contiguous()
    P, per, kb, bk = _col_split(B, M, C, dev)
    out = [torch.empty((B, P, C), dtype=acc_dt, device=dev) for _ in range(3)]
    with _launch_env():
        _col_sums[(B, P, kb)](dy, x, mu, *out, M, C, per, P, BLOCK_M=COL_BLOCK_M, BLOCK_K=bk,
                              ACC=_acc(x.dtype))
    return [o.sum(1) for o in out]


def _apply_launch(lay, out, mu, a, d, c0, ns, dy=None, has_x=True):
    """Run ``_apply`` with (B', C) coefficient tensors (B' = 1 with ns = 0, or N with ns = C)."""
    x, N, C, S = lay.x, lay.N, lay.C, lay.S
    ROWS, COLS = (N * S, C) if lay.cl else (N * C, S)
    bc = min(APPLY_BLOCK_C, triton.next_power_of_2(max(COLS, 1)))
    br = max(APPLY_BLOCK_R, APPLY_TILE // bc)
    z = c0
    with _launch_env():
        _apply[(triton.cdiv(ROWS, br), triton.cdiv(COLS, bc))](
            x, x if dy is None else dy, out, z if mu is None else mu.contiguous(),
            z if a is None else a.contiguous(), z if d is None else d.contiguous(),
            c0.contiguous(), ROWS, COLS, C, S, ns, HAS_X=has_x, HAS_DY=dy is not None,
            CL=lay.cl, BLOCK_R=br, BLOCK_C=bc, ACC=_acc(x.dtype))


def _vec(v, C, x, name, fill, acc_dt):
    if v is None:
        return torch.full((C,), fill, dtype=acc_dt, device=x.device)
    _checks.check_vector(v, C, name)
    return _opt(v, x, name).to(acc_dt).view(C)


def _normalize(lay, mean_bc, rstd_bc, w, b, ns):
    """y from (B', C) statistics expanded per channel: y = (x - mean) * rstd * w + b."""
    y = torch.empty_like(lay.x)
    a = rstd_bc * w
    c0 = b.expand_as(a)
    if lay.x.numel():
        _apply_launch(lay, y, mean_bc, a, None, c0, ns)
    return y


def _grouped_forward(x, G, weight, bias, eps, channels_last, per_sample):
    """Shared forward. ``per_sample``: statistics per (n, group) (GN, IN), else per channel (BN).

    Returns y, mean (B', G), var (B', G) in the accumulation dtype, B' = N or 1.
    """
    lay = _Layout(x, channels_last)
    N, C, S = lay.N, lay.C, lay.S
    acc_dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = _vec(weight, C, x, "weight", 1.0, acc_dt)
    b = _vec(bias, C, x, "bias", 0.0, acc_dt)
    gs = C // G
    if not x.numel():
        nan = torch.full((N if per_sample else 1, G), math.nan, dtype=acc_dt, device=x.device)
        return lay, torch.empty_like(lay.x), nan, nan, w, b
    if per_sample:
        mean_nc, m2_nc, cnt = _moments_nc(lay, acc_dt)                       # (N, C)
        mean_g, m2_g, n = _merge(mean_nc.view(N, G, gs), m2_nc.view(N, G, gs), cnt, 2)
    elif lay.cl:
        mean_g, m2_g, n = _moments_channel_last_flat(lay, acc_dt)            # (1, C)
    else:
        mean_nc, m2_nc, cnt = _moments_nc(lay, acc_dt)
        mean_g, m2_g, n = _merge(mean_nc, m2_nc, cnt, 0)
        mean_g, m2_g = mean_g.view(1, C), m2_g.view(1, C)
    var_g = m2_g / n
    return lay, None, mean_g, var_g, w, b


def _expand(stat_bg, gs):
    """(B', G) -> (B', C) with each group's value repeated over its gs channels."""
    return stat_bg.repeat_interleave(gs, dim=1) if gs > 1 else stat_bg


def _grouped_apply_forward(lay, mean_g, var_g, w, b, eps, gs, ns):
    """y from (B', G) statistics; ``ns`` = C for per-sample statistics, 0 for per-channel."""
    rstd_g = torch.rsqrt(var_g + eps)
    return _normalize(lay, _expand(mean_g, gs), _expand(rstd_g, gs), w, b, ns), rstd_g


def _grouped_backward(dy, x, G, weight, mean, rstd, channels_last, need_w, need_b, per_sample,
                      training):
    """Shared backward: ``(dx, dweight, dbias)`` (statistics (N, G) or (C,))."""
    lay = _Layout(x, channels_last)
    N, C, S = lay.N, lay.C, lay.S
    dyp = lay.same(_dy(dy, x))
    acc_dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = _vec(weight, C, x, "weight", 1.0, acc_dt)
    gs = C // G
    Bp = N if per_sample else 1
    mean_g = _stat(mean, x, Bp * G, "mean", acc_dt).view(Bp, G)
    rstd_g = _stat(rstd, x, Bp * G, "rstd", acc_dt).view(Bp, G)
    gdt = _grad_dtype(x, weight)
    dx = torch.empty_like(lay.x)
    sums = bool(training or need_w or need_b)
    dweight = dbias = None
    if not x.numel():
        z = torch.zeros(C, dtype=gdt, device=x.device)
        return lay.restore(dx), (z if need_w else None), (z.clone() if need_b else None)
    ns = C if per_sample else 0
    mu_c = _expand(mean_g, gs)                                       # (B', C)
    rstd_c = _expand(rstd_g, gs)
    if sums:
        flat = (not per_sample) and lay.cl
        sdy, sdyxc, sxc = _sums_nc(lay, dyp, mu_c, flat)             # (N, C) or (1, C)
        if not per_sample and sdy.shape[0] != 1:
            sdy, sdyxc, sxc = (t.sum(0, keepdim=True) for t in (sdy, sdyxc, sxc))
        M = gs * S * (1 if per_sample else N)                        # values per statistic
        if training:
            delta_g = sxc.view(Bp, G, gs).sum(2) / M                  # exact batch mean
        else:
            delta_g = torch.zeros_like(mean_g)
        delta_c = _expand(delta_g, gs)
        sdyxhat = rstd_c * (sdyxc - delta_c * sdy)                   # sum dy * xhat, (B', C)
        if need_w:
            dweight = sdyxhat.sum(0).to(gdt)
        if need_b:
            dbias = sdy.sum(0).to(gdt)
    if training:
        mg = (w * sdy).view(Bp, G, gs).sum(2) / M                     # mean(g), g = dy * w
        mgx = (w * sdyxhat).view(Bp, G, gs).sum(2) / M                # mean(g * xhat)
        a = -_expand(rstd_g * rstd_g * mgx, gs)
        c0 = -_expand(rstd_g * mg, gs)
        _apply_launch(lay, dx, mu_c + delta_c, a, rstd_c * w, c0, ns, dy=dyp)
    else:
        d = (rstd_c * w).expand(Bp, C)
        _apply_launch(lay, dx, None, None, d, torch.zeros_like(d), ns, dy=dyp, has_x=False)
    return lay.restore(dx), dweight, dbias


def _out_stats(x, *ts):
    sd = _stat_dtype(x.dtype)
    return tuple(t.to(sd) for t in ts)


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
    acc_dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    for name, v in (("weight", weight), ("bias", bias), ("mean", mean), ("var", var)):
        _checks.check_vector(v, C, name)
    if mean is None:
        _checks.check_values_per_channel(lay.N * lay.S, x.shape, "batch_norm")
        lay, y, mean_g, var_g, w, b = _grouped_forward(x, C, weight, bias, eps, channels_last, False)
        if y is not None:                                        # empty input
            return (lay.restore(y),) + _out_stats(x, mean_g.view(C), var_g.view(C),
                                                   mean_g.view(C))
        y, rstd_g = _grouped_apply_forward(lay, mean_g, var_g, w, b, eps, 1, 0)
        return (lay.restore(y),) + _out_stats(x, mean_g.view(C), var_g.view(C), rstd_g.view(C))
    mean_g = _opt(mean, x, "mean").to(acc_dt).view(1, C)
    var_g = _opt(var, x, "var").to(acc_dt).view(1, C)
    if x.device.type != "cuda" and bool((var_g < 0).any()):
        # on CUDA this check would wait for the GPU on every call: there, as in torch, a negative
        # given variance gives NaN in its channel's output
        raise ValueError("batch_norm: the given var has negative entries; a variance must be >= 0")
    w = _vec(weight, C, x, "weight", 1.0, acc_dt)
    b = _vec(bias, C, x, "bias", 0.0, acc_dt)
    rstd_g = torch.rsqrt(var_g + eps)
    y = _normalize(lay, mean_g, rstd_g, w, b, 0)
    return (lay.restore(y),) + _out_stats(x, mean_g.view(C), var_g.view(C), rstd_g.view(C))


def batch_norm_backward(dy, x, weight, mean, rstd, *, channels_last=False, training=True,
                        need_weight_grad=None, need_bias_grad=None):
    r"""Batch norm backward: ``(dx, dweight, dbias)``; ``training=False``: given statistics."""
    x = _input(x).detach()
    _checks.check_min_ndim(x, 2, "batch_norm", "(N, C, *spatial)")
    C = _Layout(x, channels_last).C
    _checks.check_vector(weight, C, "weight")
    return _grouped_backward(dy, x, C, weight, mean, rstd, channels_last,
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
    lay, y, mean_g, var_g, w, b = _grouped_forward(x, G, weight, bias, eps, channels_last, True)
    if y is None:
        y, rstd_g = _grouped_apply_forward(lay, mean_g, var_g, w, b, eps, C // G, lay.C)
    else:
        rstd_g = mean_g
    return (lay.restore(y),) + _out_stats(x, mean_g, rstd_g)


def group_norm_backward(dy, x, num_groups, weight, mean, rstd, *, channels_last=False,
                        need_weight_grad=None, need_bias_grad=None):
    r"""Group norm backward: ``(dx, dweight, dbias)``."""
    x = _input(x).detach()
    _checks.check_min_ndim(x, 2, "group_norm", "(N, C, *spatial)")
    C = _channels(x, channels_last)
    _checks.check_groups(num_groups, C)
    _checks.check_vector(weight, C, "weight")
    return _grouped_backward(dy, x, int(num_groups), weight, mean, rstd, channels_last,
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
    lay, y, mean_g, var_g, w, b = _grouped_forward(x, C, weight, bias, eps, channels_last, True)
    if y is None:
        y, rstd_g = _grouped_apply_forward(lay, mean_g, var_g, w, b, eps, 1, lay.C)
    else:
        rstd_g = mean_g
    return (lay.restore(y),) + _out_stats(x, mean_g, var_g, rstd_g)


def instance_norm_backward(dy, x, weight, mean, rstd, *, channels_last=False, need_weight_grad=None,
                           need_bias_grad=None):
    r"""Instance norm backward: ``(dx, dweight, dbias)``."""
    x = _input(x).detach()
    C = _instance_checks(x, channels_last, weight, None)
    return _grouped_backward(dy, x, C, weight, mean, rstd, channels_last,
                             _want(need_weight_grad, weight), _want(need_bias_grad, weight),
                             True, True)
