r"""Fused CPU kernels (numba, ``parallel=True``): the ``normlab.kernels`` contract.

Every method is one of two memory patterns (see ``_numba_kernels``)::

    row     the L values of one statistic are contiguous     LayerNorm, RMSNorm,
                                                             InstanceNorm / GroupNorm (N, C, *S),
                                                             BatchNorm (N, C, *S) planes
    column  the channel stays, reduced values are strided    BatchNorm (N, *S, C) and (N, C),
                                                             InstanceNorm / GroupNorm (N, *S, C)

Contract (same on every backend):

* Arrays in, arrays out. NumPy arrays in give NumPy arrays out; CPU torch tensors in give
  torch tensors out (inputs are read through zero-copy ``.numpy()`` views, outputs wrap the
  result arrays with ``torch.from_numpy``). Parameters and statistics may be either.
* ``y``, ``dx`` and the returned statistics have x's dtype; ``dweight``/``dbias`` too.
  Statistics accumulate in float64 (per cache block: one sweep about a shift, two-pass where
  that is ill-conditioned and for rows shorter than 1024 values; Chan merges), so float32 data
  with a large offset keeps full float32 accuracy.
* float32 and float64 only; anything else raises ``TypeError`` naming the dtype and the fix.
  ``dy`` of another floating dtype is cast to x's dtype.
* Non-contiguous input: made contiguous in the nearest layout (see ``_arrays``); an
  ``(N, C, *S)`` array stored channels-last runs the channels-last kernels with no copy and
  its outputs keep that memory layout.
* ``weight``/``bias`` None: no affine. Backward functions take ``need_weight_grad`` and
  ``need_bias_grad``: None (default) means "when ``weight`` is given"; ``dweight``/``dbias``
  are None when not computed. (BatchNorm's defaults follow the same rule.)
* Per-row statistics of layer_norm / rms_norm have the leading shape ``x.shape[:-k]``;
  group_norm's are ``(N, G)``, instance_norm's ``(N, C)``, batch_norm's ``(C,)``.
* Training backward re-centres at the exact batch mean: the saved ``mean`` (rounded to x's
  dtype) is refined by ``sum(x - mean) / M``, a sum taken in the same pass as the other two.
  With ``training=False`` (given statistics) the mean is used as given.
* Outputs are arrays owned by the caller. Large ones (y, dx of 1 MiB or more) are carved
  from the output pool (``_pool``): memory of earlier outputs that nothing refers to any more,
  already mapped, so a training loop does not page-fault its outputs in every step. Internal
  partial sums use a reusable per-thread buffer. Results do not depend on the number of numba
  threads.
* Memory passes: row kernels read x once and write y once (the row is normalized while in
  cache); backward reads (x, dy) once and writes dx once. BatchNorm needs its statistics
  before any output: x is read twice (dy and x twice in backward). Column kernels with many
  samples (InstanceNorm / GroupNorm channels-last) normalize each sample right after its
  statistics, re-reading it from cache.

Example:
    >>> import numpy as np
    >>> from normlab.kernels import numba_cpu as K
    >>> x = np.random.default_rng(0).normal(size=(8, 3, 5, 5)).astype(np.float32)
    >>> y, mean, var, rstd = K.batch_norm_forward(x, None, None, 1e-5)
    >>> bool(np.abs(y.mean(axis=(0, 2, 3))).max() < 1e-5), y.dtype
    (True, dtype('float32'))
"""

from __future__ import annotations

import functools
import inspect
import math
import time
import threading

import numba
import numpy as np

from .. import _checks
from ..reference.rms_norm import resolve_rms_eps
from . import FUNCTIONS
from . import _arrays as A
from . import _pool
from . import _numba_kernels as _k

__all__ = list(FUNCTIONS)          # the contract of normlab.kernels

NAME = "numba"

# --- work partition (fixed by the shape, never by the thread count) -------------------------

#: most row tasks of a row kernel (tasks are contiguous runs of rows)
ROW_TASKS = 256
#: per-task float64 partials of LayerNorm's dweight/dbias stay under this many elements
ROW_PARTIAL_ELEMS = 1 << 15
#: column kernels: bytes of x per (row chunk x column tile), re-read from L2 when a chunk's
#: moments are redone two-pass
COL_CHUNK_BYTES = 1 << 18
#: column kernels: widest column tile
COL_TILE = 1024
#: column kernels: narrow rows (K values) are processed max(1, COL_WIDE // K) rows at a time
COL_WIDE = 256
#: column kernels: with at least this many slabs (samples), one task per slab (see _numba_kernels)
COL_PER_SLAB_MIN = 8
#: BatchNorm on (N, C, *S): planes of at least this many values use the row kernels
BN_ROW_MIN_INNER = 32
#: inputs with fewer elements than this run the serial twins of the kernels (see
#: ``_numba_kernels``, "Serial twins") on the calling thread. A parallel region costs a wake-up
#: of the other threads: a few microseconds on an idle machine, but on a busy one (or right
#: after torch's own OpenMP pool ran, its threads still spinning) it was measured at 16-24 ms
#: per region on 2 cores, against 0.1-0.4 ms for the same (16, 32, 16, 16) batch norm on one
#: thread. torch avoids the same trap with grain sizes. The twins run the same tasks where
#: results depend on them (``_row_tasks``), so every result is the same on either side of this
#: bound (tested). At 1 << 18 (was 1 << 19), decode LayerNorm 64x4096 fp32 (1 MiB) runs on both
#: cores: in three interleaved bench runs its
#: forward went from x0.57-0.66 of torch to x0.84-0.86, its backward from x0.56-0.68 to
#: x0.94-0.95, RMSNorm's forward from x1.20-1.32 to x1.46-1.71.
SERIAL_BELOW = 1 << 18
_DUMMY = np.zeros(1)
_EMPTY = np.zeros(0)          # an output the kernel skips (size 0)
_SCRATCH = threading.local()


_LOCK = {}        # "lock": the workqueue layer's lock, or None (see _bind_lock); bound once
_BIND_LOCK = threading.Lock()


def _bind_lock():
    """Thread safety of the parallel kernels.

    numba's "workqueue" threading layer (its fallback when neither OpenMP nor TBB is
    available) is not thread-safe: two threads launching parallel kernels at once abort the
    process. There every parallel kernel call holds one process-wide lock, so concurrent
    callers take turns instead of crashing; with the "omp" and "tbb" layers there is no lock.
    The serial twins start no parallel region and never take the lock.
    """
    with _BIND_LOCK:
        if _LOCK:
            return
        numba.get_num_threads()            # launches the thread pool, which sets the layer
        _LOCK["lock"] = threading.RLock() if numba.threading_layer() == "workqueue" else None


def _size(a) -> int:
    if type(a) is np.ndarray:
        return a.size
    return a.numel() if A.is_tensor(a) else np.size(a)


def _grain(fn):
    """The public kernel function: ``fn(ks, first, ...)`` with ``ks`` the serial twins
    (``_k.SERIAL_KERNELS``) when the first argument (x or dy) has fewer than ``SERIAL_BELOW``
    elements, else the parallel kernels (``_k.PARALLEL_KERNELS``, under the workqueue lock
    where that layer runs)."""

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        if _size(first) < SERIAL_BELOW:
            return fn(_k.SERIAL_KERNELS, first, *args, **kwargs)
        if not _LOCK:
            _bind_lock()
        lock = _LOCK["lock"]
        if lock is None:
            return fn(_k.PARALLEL_KERNELS, first, *args, **kwargs)
        with lock:
            return fn(_k.PARALLEL_KERNELS, first, *args, **kwargs)

    sig = inspect.signature(fn)
    wrapper.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])
    return wrapper


def _scratch(n: int) -> np.ndarray:
    """A float64 work buffer of ``n`` values, reused across calls of this thread.

    Internal partial sums only (never returned). Reuse matters: a fresh buffer of a few MiB is
    page-faulted by the kernel's threads on every call, which costs more than the kernel's
    own work on small machines.
    """
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, 1))
        _SCRATCH.buf = buf
    return buf[:n]


def _row_tasks(ks, R: int, L: int, partials: bool = False):
    """``(T, per)``: ``T`` tasks of ``per`` contiguous rows for a row kernel of ``ks``.

    Where results depend on the partition (``partials``: per-task sums), it is fixed by the
    shape, so the serial and the parallel kernels agree bit for bit. Elsewhere each row's
    results are its own, and the serial kernels take one task: a task's setup (its first row's
    ``r % P``, a division) costs about 10 ns, 2.5 of the 12 us of GroupNorm 8x64x4x4's forward
    kernel in 256 tasks.
    """
    if ks is _k.SERIAL_KERNELS and not partials:
        return 1, R
    T = R if R < ROW_TASKS else ROW_TASKS
    if partials and T * L > ROW_PARTIAL_ELEMS:
        T = ROW_PARTIAL_ELEMS // L
    if T < 1:
        T = 1
    return T, (R + T - 1) // T


def _col_params(B: int, R: int, K: int, gs: int, itemsize: int):
    """``(rc, kt, m, per_slab)``: rows per chunk, columns per tile (whole groups), rows per wide
    row, scheduling."""
    if K <= COL_TILE:
        kt = K
        m = max(1, COL_WIDE // K)
    else:
        kt = gs * max(1, COL_TILE // gs)
        m = 1
    rc = max(1, min(R, COL_CHUNK_BYTES // (kt * itemsize)))
    rc = max(m, rc - rc % m)
    return rc, kt, m, B >= COL_PER_SLAB_MIN


def _col_forward(ks, x, B, R, K, gs, wd, w, b, eps, mode, t_mean, t_rstd, y, mean_out, m2_out,
                 rc, kt, m, per_slab):
    """Run the column forward with the per-slab or the chunked schedule (see _numba_kernels)."""
    if per_slab:
        ks.col_forward_slabs(x, B, R, K, gs, wd, w, b, float(eps), mode, t_mean, t_rstd, y,
                             mean_out, m2_out, rc, kt, m)
    else:
        work = _scratch(2 * B * ((R + rc - 1) // rc) * K if mode != _k.APPLY else 0)
        ks.col_forward_chunks(x, B, R, K, gs, wd, w, b, float(eps), mode, t_mean, t_rstd, y,
                              mean_out, m2_out, rc, kt, m, work)


def _col_backward(ks, dy, x, B, R, K, gs, wd, w, mean, rstd, training, need_sums, dx, dwk, dbk, rc,
                  kt, m, per_slab):
    if per_slab:
        ks.col_backward_slabs(dy, x, B, R, K, gs, wd, w, mean, rstd, training, need_sums, dx, dwk,
                              dbk, rc, kt, m)
    else:
        work = _scratch(3 * B * ((R + rc - 1) // rc) * K if need_sums else 0)
        ks.col_backward_chunks(dy, x, B, R, K, gs, wd, w, mean, rstd, training, need_sums, dx, dwk,
                               dbk, rc, kt, m, work)


# --- argument handling ----------------------------------------------------------------------

class _Call:
    """Converts the inputs of one call and the outputs back (NumPy or torch)."""

    def __init__(self, x, name="x"):
        if type(x) is np.ndarray and x.dtype in A.KERNEL_DTYPES:     # the common case, fast
            self.torch, self.x, self.dtype = False, x, x.dtype
            return
        self.torch = A.is_tensor(x)
        self.x = A.to_numpy(x, name)
        self.dtype = A.check_kernel_dtype(self.x, NAME)

    def arr(self, a, name):
        return A.to_numpy(a, name)

    def out(self, *arrays):
        dt, as_tensor = self.dtype, self.torch
        res = []
        for a in arrays:
            if a is not None and a.dtype != dt:
                a = a.astype(dt)
            if as_tensor:
                a = A.from_numpy(a, True)
            res.append(a)
        return tuple(res)


def _like(call, a, shape, name):
    """dy as an array of x's shape and of a floating dtype (cast to x's by the caller)."""
    a = call.arr(a, name)
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have the shape of x {tuple(shape)}, got shape {tuple(a.shape)}")
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    return a


def _stat(call, v, shape, name):
    """A saved statistic as a contiguous float64 array of ``prod(shape)`` values."""
    if v is None:
        raise ValueError(f"{name} is required: pass the {name} returned by the forward call")
    v = call.arr(v, name)
    n = math.prod(shape)
    if v.size != n:
        raise ValueError(f"{name} must have {n} values (shape {tuple(shape)}), got shape {tuple(v.shape)}")
    return _param(v, n, np.float64, None)


def _param(v, n: int, dtype, fill) -> np.ndarray:
    """A parameter or statistic as a contiguous (n,) kernel array of ``dtype``, ``fill``
    everywhere when None (unchecked: the callers check shapes first, or trust their caller)."""
    if v is None:
        return _filled(n, dtype, fill)
    v = _kernel_array(v, dtype)
    return v if v.ndim == 1 else v.reshape(n)


def _given(v, n: int, dt, fill) -> np.ndarray:
    """A parameter or given statistic for ``bn_given_small``: kept in x's dtype ``dt`` (the
    kernel reads it in float64, as a cast would), any other dtype as float64."""
    return _param(v, n, dt if v is None or v.dtype == dt else np.float64, fill)


def _cast(v, dt):
    return v if v is None or v.dtype == dt else v.astype(dt)


def _kernel_array(v: np.ndarray, dtype) -> np.ndarray:
    """``v`` itself when it is a C-contiguous, writable array of ``dtype``, else such a copy. A
    read-only array is another numba type: passed as is, it would compile every kernel again."""
    if v.dtype == dtype and v.flags.c_contiguous and v.flags.writeable:
        return v
    return v.astype(dtype, order="C")


def _want(flag, weight):
    return weight is not None if flag is None else bool(flag)


def _channels(xp, phys_cl):
    return xp.shape[-1] if phys_cl else xp.shape[1]


def _spatial(xp, phys_cl):
    return math.prod(xp.shape[1:-1] if phys_cl else xp.shape[2:])


# --- BatchNorm -------------------------------------------------------------------------------

@_grain
def batch_norm_forward(ks, x, weight, bias, eps, *, channels_last=False, mean=None, var=None):
    r"""Batch norm forward: ``(y, mean, var, rstd)``, statistics ``(C,)`` in x's dtype.

    ``mean``/``var`` None: training (batch mean and biased variance over N and the spatial
    axes). Given ``(C,)``: inference with those statistics (returned as given, cast).
    x: ``(N, C, *spatial)`` or, with ``channels_last``, ``(N, *spatial, C)``; zero or more
    spatial dims.
    """
    out = _bn_plain(ks, x, weight, bias, eps, channels_last, mean, var)
    if out is not None:
        return out
    call = _Call(x)
    x = call.x
    _checks.check_min_ndim(x, 2, "batch_norm", "(N, C, *spatial)")
    _checks.check_eps(eps)
    _checks.check_stats_pair(mean, var, "batch_norm")
    xp, cl, swapped = A.layout(x, channels_last)
    C = _channels(xp, cl)
    w = _vec(call, weight, C, "weight", 1.0)
    b = _vec(call, bias, C, "bias", 0.0)
    if mean is None:
        _checks.check_values_per_channel(xp.shape[0] * _spatial(xp, cl), x.shape, "batch_norm")
    else:
        mean = _vec(call, mean, C, "mean", 0.0)
        var = _vec(call, var, C, "var", 1.0)
    y, mean_o, var_o, rstd_o = _bn_forward(ks, xp, cl, w, b, eps, mean, var)
    return call.out(A.restore(y, channels_last, swapped), mean_o, var_o, rstd_o)


def _plain_array(ks, x, eps) -> bool:
    """What every *plain* call has (the plain paths of the forwards): the serial kernels
    (``ks``), a non-empty, writable, aligned C-contiguous float32/float64 ndarray ``x``, ``eps``
    a float > 0 and finite."""
    return (ks is _k.SERIAL_KERNELS and type(x) is np.ndarray and type(eps) is float
            and 0.0 < eps < math.inf and x.dtype in A.KERNEL_DTYPES and x.size > 0
            and x.flags.carray)


def _plain_channels(ks, x, eps, channels_last):
    """``(cl, C)`` for a *plain* call of a channel method (``_bn_plain``, ``_group_norm_plain``),
    or None: ``_plain_array``, x of at least 2 dims, ``channels_last`` True or False. ``cl``: x
    is (N, *S, C)."""
    if not (_plain_array(ks, x, eps) and x.ndim >= 2
            and (channels_last is True or channels_last is False)):
        return None
    cl = channels_last and x.ndim >= 3
    return cl, x.shape[-1] if cl else x.shape[1]


def _bn_plain(ks, x, weight, bias, eps, channels_last, mean, var):
    """``batch_norm_forward`` of a *plain* call, or None: then the checked path must run.

    Plain: ``_plain_channels``; weight, bias and (inference) mean and var None or plain (C,)
    arrays of x's dtype (``_plain_param``), mean and var both given or both None, more than one
    value per channel in training. Every check of the checked path holds for such a call and
    the kernel calls are the ones that path makes (``_bn_given_small`` in inference,
    ``_bn_forward`` in training, with the parameters cast to float64 as there), so results are
    the same; what it skips is the conversions. Inference on 8 x 64 float32: 20-26 us before
    (with the APPLY passes), 8 us after, torch's F.batch_norm 9-14 us on the 2-core
    development machine.
    """
    plain = _plain_channels(ks, x, eps, channels_last)
    if plain is None or (mean is None) != (var is None):
        return None
    cl, C = plain
    dt, shape = x.dtype, (C,)
    w = _plain_param(weight, shape, dt, C, None)
    b = _plain_param(bias, shape, dt, C, None)
    if w is False or b is False:
        return None
    if mean is None:                                     # training
        if x.size // C <= 1:
            return None                                  # the checked path raises
        return _bn_forward(ks, x, cl, _f64(w, C, 1.0), _f64(b, C, 0.0), eps, None, None)
    m = _plain_param(mean, shape, dt, C, None)
    v = _plain_param(var, shape, dt, C, None)
    if m is False or v is False:
        return None
    return _bn_given_small(x, C, 1 if cl else _spatial(x, cl), _param(w, C, dt, 1.0),
                           _param(b, C, dt, 0.0), eps, m, v)


def _bn_given_small(xp, C, inner, w, b, eps, mean, var):
    """Batch norm with given statistics on a serial-size, non-empty C-contiguous ``xp`` of rows
    of ``C * inner`` values ((N, C, inner), or (rows, C) with inner 1) in one kernel call
    (``bn_given_small``): ``(y, mean, var, rstd)``. w, b, mean, var: (C,) float64 or xp's
    dtype."""
    dt = xp.dtype
    y = _pool.empty_like(xp)
    mean_o, var_o, rstd_o = np.empty(C, dt), np.empty(C, dt), np.empty(C, dt)
    if _k.bn_given_small(xp.ravel(), xp.size // (C * inner), C, inner, inner < BN_ROW_MIN_INNER,
                         w, b, mean, var, float(eps), y.ravel(), mean_o, var_o, rstd_o):
        raise _negative_var(var)
    return y, mean_o, var_o, rstd_o


def _negative_var(var) -> ValueError:
    i = int(np.argmax(var < 0))
    return ValueError(
        f"batch_norm: the given var has a negative entry (a variance must be >= 0), got "
        f"var[{i}]={float(var[i])!r}; pass the running variance, not a log-variance")


def _bn_forward(ks, xp, cl, w, b, eps, mean64, var64):
    """Batch norm forward on a C-contiguous ``xp`` in its physical layout (``cl``: (N, *S, C));
    w, b: float64 (C,); ``mean64``/``var64``: given float64 (C,) statistics, or None (training).
    ``(y, mean, var, rstd)`` in xp's layout and dtype."""
    N, C = xp.shape[0], _channels(xp, cl)
    inner = _spatial(xp, cl)
    count = N * inner
    training = mean64 is None
    if not training and xp.size and ks is _k.SERIAL_KERNELS:
        return _bn_given_small(xp, C, 1 if cl else inner, w, b, eps, mean64, var64)
    dt = xp.dtype
    mean_o, var_o, rstd_o = np.empty(C, dt), np.empty(C, dt), np.empty(C, dt)   # as returned
    if not training:
        rstd64 = np.empty(C)
        if _k.finish_moments(mean64, var64, 1, float(eps), mean_o, var_o, rstd_o, rstd64):
            raise _negative_var(var64)
    y = _pool.empty_like(xp)
    if xp.size:
        xf, yf = xp.ravel(), y.ravel()
        if cl or inner < BN_ROW_MIN_INNER:
            R, K, gs = (count, C, 1) if cl else (N, C * inner, inner)
            rc, kt, m, per_slab = _col_params(1, R, K, gs, xp.itemsize)
            if training:
                mean64, m2 = np.empty(C), np.empty(C)
                _col_forward(ks, xf, 1, R, K, gs, gs, w, b, eps, _k.TRAIN, _DUMMY, _DUMMY, yf,
                             mean64, m2, rc, kt, m, per_slab)
                _k.finish_moments(mean64, m2, count, float(eps), mean_o, var_o, rstd_o, _EMPTY)
            else:
                _col_forward(ks, xf, 1, R, K, gs, gs, w, b, eps, _k.APPLY, mean64, rstd64, yf,
                             _DUMMY, _DUMMY, rc, kt, m, per_slab)
        else:
            R = N * C
            T, per = _row_tasks(ks, R, inner)
            if training:
                rmean, rm2 = np.empty(R), np.empty(R)
                ks.row_seg_forward(xf, R, 1, inner, C, T, per, w, b, float(eps), _k.STATS,
                                     _DUMMY, _DUMMY, yf, rmean, rm2)
                mean64, m2, rstd64 = np.empty(C), np.empty(C), np.empty(C)
                _k.merge_planes(rmean, rm2, N, C, inner, mean64, m2)
                _k.finish_moments(mean64, m2, count, float(eps), mean_o, var_o, rstd_o, rstd64)
            ks.row_seg_forward(xf, R, 1, inner, C, T, per, w, b, float(eps), _k.APPLY,
                                 mean64, rstd64, yf, _DUMMY, _DUMMY)
    elif training:
        for a in (mean_o, var_o, rstd_o):
            a.fill(np.nan)
    return y, mean_o, var_o, rstd_o


@_grain
def batch_norm_backward(ks, dy, x, weight, mean, rstd, *, channels_last=False, training=True,
                        need_weight_grad=None, need_bias_grad=None):
    r"""Batch norm backward: ``(dx, dweight, dbias)``.

    ``training``: the statistics were the batch's (full gradient through them); otherwise they
    were given constants and ``dx = rstd * weight * dy``.
    """
    call = _Call(x)
    x = call.x
    _checks.check_min_ndim(x, 2, "batch_norm", "(N, C, *spatial)")
    dy = _like(call, dy, x.shape, "dy")
    xp, cl, swapped = A.layout(x, channels_last)
    dyp = A.same_layout(dy, cl, channels_last, swapped).astype(xp.dtype, copy=False)
    C = _channels(xp, cl)
    w = _vec(call, weight, C, "weight", 1.0)
    mean64 = _stat(call, mean, (C,), "mean")
    rstd64 = _stat(call, rstd, (C,), "rstd")
    dx, dweight, dbias = _bn_backward(ks, dyp, xp, cl, w, mean64, rstd64, training,
                                      _want(need_weight_grad, weight), _want(need_bias_grad, weight))
    return call.out(A.restore(dx, channels_last, swapped), dweight, dbias)


def _bn_backward(ks, dyp, xp, cl, w, mean64, rstd64, training, need_w, need_b):
    """Batch norm backward on C-contiguous ``dyp``, ``xp`` of one physical layout (``cl``); w,
    mean64, rstd64: float64 (C,). ``(dx, dweight, dbias)``, the last two float64 or None."""
    N, C = xp.shape[0], _channels(xp, cl)
    inner = _spatial(xp, cl)
    count = N * inner
    sums = bool(training or need_w or need_b)
    dx = _pool.empty_like(xp)
    dweight = dbias = None
    if xp.size:
        xf, dyf, dxf = xp.ravel(), dyp.ravel(), dx.ravel()
        if cl or inner < BN_ROW_MIN_INNER:
            R, K, gs = (count, C, 1) if cl else (N, C * inner, inner)
            rc, kt, m, per_slab = _col_params(1, R, K, gs, xp.itemsize)
            dwc = np.empty(C if sums else 0)          # per channel: sum dy * xhat, sum dy
            dbc = np.empty(C if sums else 0)
            _col_backward(ks, dyf, xf, 1, R, K, gs, gs, w, mean64, rstd64, bool(training), sums,
                          dxf, dwc, dbc, rc, kt, m, per_slab)
            if sums:
                dweight, dbias = dwc, dbc
        else:
            R = N * C
            T, per = _row_tasks(ks, R, inner)
            if sums:
                sdy, sdyxm, sxm = np.empty(R), np.empty(R), np.empty(R)
                ks.row_seg_backward(dyf, xf, R, 1, inner, C, T, per, w, mean64, rstd64, _k.SUMS,
                                      _DUMMY, _DUMMY, dxf, sdy, sdyxm, sxm)
                dweight, dbias = np.empty(C), np.empty(C)          # sum dy * xhat, sum dy
                mu, mg, mgx = np.empty(C), np.empty(C), np.empty(C)
                _k.merge_bwd_planes(sdy, sdyxm, sxm, N, C, count, bool(training), w, mean64,
                                    rstd64, dweight, dbias, mu, mg, mgx)
            else:
                mu, mg, mgx = mean64, np.zeros(C), np.zeros(C)
            ks.row_seg_backward(dyf, xf, R, 1, inner, C, T, per, w, mu, rstd64, _k.APPLY,
                                  mg, mgx, dxf, _DUMMY, _DUMMY, _DUMMY)
    elif need_w or need_b:
        dweight = dbias = np.zeros(C)
    return dx, dweight if need_w else None, dbias if need_b else None


# --- LayerNorm / RMSNorm (row, per-element affine) -------------------------------------------

_NO_BIAS = object()      # _row_setup: no bias wanted (backward)


_FILLED = {}          # (L, dtype, fill) -> constant parameter array (internal, never returned)


def _filled(L, dtype, fill):
    """A (L,) array of ``fill``: the implicit weight/bias of a call without affine. Reused across
    calls (kernels only read it; it never leaves this module); at most 64 kept."""
    key = (L, dtype, fill)
    a = _FILLED.get(key)
    if a is None:
        if len(_FILLED) >= 64:
            _FILLED.clear()
        a = _FILLED[key] = np.full(L, fill, dtype)
    return a


def _vec(call, v, C, name, fill):
    """A per-channel vector (weight, bias, given statistics) checked to be (C,), as a contiguous
    float64 array (``fill`` when None)."""
    if v is None:
        return _filled(C, np.float64, fill)
    if type(v) is not np.ndarray:
        v = call.arr(v, name)
    if v.shape != (C,):
        _checks.check_vector(v, C, name)
    return _param(v, C, np.float64, fill)


def _row_param(call, v, shape, L, fill, name):
    """weight/bias as a contiguous (L,) array of x's dtype (``fill`` when None)."""
    if v is None:
        return _filled(L, call.dtype, fill)
    if type(v) is not np.ndarray:
        v = call.arr(v, name)
    if v.shape != shape:
        _checks.check_param_shape(v, shape, name)
    return _param(v, L, call.dtype, fill)


def _row_setup(call, normalized_shape, weight, bias, what):
    x = call.x
    shape = _checks.normalized_shape_tuple(normalized_shape)
    _checks.check_normalized_shape(x, shape, what)
    L = shape[0] if len(shape) == 1 else math.prod(shape)
    lead = x.shape[:x.ndim - len(shape)]
    w = _row_param(call, weight, shape, L, 1.0, "weight")
    b = None if bias is _NO_BIAS else _row_param(call, bias, shape, L, 0.0, "bias")
    return np.ascontiguousarray(x), L, lead, shape, w, b


def _row_forward(ks, call, normalized_shape, weight, bias, eps, centered, what):
    xc, L, lead, shape, w, b = _row_setup(call, normalized_shape, weight, bias, what)
    y, mean, rstd = _row_fwd(ks, xc, L, w, b, eps, centered)
    if len(lead) == 1:                                  # (R,) already
        return y, mean, rstd
    return y, mean.reshape(lead), rstd.reshape(lead)


def _row_fwd(ks, xc, L, w, b, eps, centered):
    """The row forward on a C-contiguous ``xc`` of rows of L values; w, b: (L,) contiguous in
    xc's dtype. ``(y, mean, rstd)``, the statistics flat (R,) in xc's dtype."""
    R = xc.size // L if L else 0
    y = _pool.empty_like(xc)
    mean, rstd = np.empty(R, xc.dtype), np.empty(R, xc.dtype)     # as returned: x's dtype
    if R:
        T, per = _row_tasks(ks, R, L)
        ks.row_elem_forward(xc.ravel(), R, L, T, per, w, b, float(eps), centered,
                              y.ravel(), mean, rstd)
    return y, mean, rstd


def _row_backward(ks, dy, x, normalized_shape, weight, mean, rstd, centered, need_w, need_b, what):
    call = _Call(x)
    xc, L, lead, shape, w, _ = _row_setup(call, normalized_shape, weight, _NO_BIAS, what)
    dyc = np.ascontiguousarray(_like(call, dy, xc.shape, "dy"), dtype=xc.dtype)
    R = math.prod(lead)
    mean64 = _stat(call, mean, lead, "mean") if centered else _filled(R, np.float64, 0.0)
    rstd64 = _stat(call, rstd, lead, "rstd")
    dx, dweight, dbias = _row_bwd(ks, dyc, xc, L, w, mean64, rstd64, centered, need_w, need_b)
    if need_w:
        dweight = dweight.reshape(shape)
    if need_b:
        dbias = dbias.reshape(shape)
    return call, dx, dweight, dbias


def _row_bwd(ks, dyc, xc, L, w, mean64, rstd64, centered, need_w, need_b):
    """The row backward on C-contiguous ``dyc``, ``xc``; w: (L,) in xc's dtype; mean64, rstd64:
    float64 (R,). ``(dx, dweight, dbias)``, the last two (L,) in xc's dtype (rounded from the
    float64 sums) or None."""
    R = xc.size // L if L else 0
    dx = _pool.empty_like(xc)
    grads = need_w or need_b
    T, per = _row_tasks(ks, R, L, partials=True)
    part = _scratch(2 * T * L if grads else 0)          # written and summed by the kernel
    dwp, dbp = part[:T * L], part[T * L:]
    if R:
        ks.row_elem_backward(dyc.ravel(), xc.ravel(), R, L, T, per, w, mean64, rstd64,
                               centered, grads, dx.ravel(), dwp, dbp)
    elif grads:
        dwp, dbp = np.zeros(L), np.zeros(L)
    dt = xc.dtype
    return (dx, dwp[:L].astype(dt) if need_w else None, dbp[:L].astype(dt) if need_b else None)


def _plain_param(v, shape, dt, L, fill):
    """``v`` when it is a writable, aligned C-contiguous ndarray of ``shape`` and ``dt``
    (``flags.carray``); the ``fill`` array (None for ``fill=None``) when None; otherwise False
    (not plain)."""
    if v is None:
        return None if fill is None else _filled(L, dt, fill)
    if type(v) is np.ndarray and v.shape == shape and v.dtype == dt and v.flags.carray:
        return v
    return False


def _row_forward_plain(ks, x, normalized_shape, weight, bias, eps, centered):
    """The row forward of a *plain* call, or None: then the checked path must run.

    Plain: ``_plain_array``; ``normalized_shape`` a tuple of one positive int equal to x's last
    dimension; weight and bias None or plain parameters (``_plain_param``). Every check of the
    checked path holds for such a call, and the kernel call is the one that path makes, so
    results are the same; what it skips is the conversions (8-10 us of Python per call against
    the kernel's 2-12 us on 8x64 to 8x4096, about half of it saved here).
    """
    if not (_plain_array(ks, x, eps) and type(normalized_shape) is tuple
            and len(normalized_shape) == 1):
        return None
    L, dt = normalized_shape[0], x.dtype
    if not (type(L) is int and L > 0 and x.ndim >= 1 and x.shape[-1] == L):
        return None
    w = _plain_param(weight, normalized_shape, dt, L, 1.0)
    b = _plain_param(bias, normalized_shape, dt, L, 0.0)
    if w is False or b is False:
        return None
    y, mean, rstd = _row_fwd(ks, x, L, w, b, eps, centered)
    if x.ndim != 2:
        lead = x.shape[:-1]
        mean, rstd = mean.reshape(lead), rstd.reshape(lead)
    return y, mean, rstd


#: eps=None of rms_norm for the kernel dtypes (``resolve_rms_eps``), for the plain path
_RMS_EPS = {dt: resolve_rms_eps(None, dt) for dt in A.KERNEL_DTYPES}


@_grain
def layer_norm_forward(ks, x, normalized_shape, weight, bias, eps):
    r"""Layer norm over the trailing ``normalized_shape``: ``(y, mean, rstd)``.

    ``mean``, ``rstd``: one per row, shape ``x.shape[:-len(normalized_shape)]``, x's dtype.
    weight, bias: ``normalized_shape`` or None.
    """
    out = _row_forward_plain(ks, x, normalized_shape, weight, bias, eps, True)
    if out is not None:
        return out
    _checks.check_eps(eps)
    call = _Call(x)
    y, mean, rstd = _row_forward(ks, call, normalized_shape, weight, bias, eps, True, "layer_norm")
    return call.out(y, mean, rstd)


@_grain
def layer_norm_backward(ks, dy, x, normalized_shape, weight, mean, rstd, *, need_weight_grad=None,
                        need_bias_grad=None):
    r"""Layer norm backward: ``(dx, dweight, dbias)`` (dweight/dbias of ``normalized_shape``)."""
    call, dx, dw, db = _row_backward(ks, dy, x, normalized_shape, weight, mean, rstd, True,
                                     _want(need_weight_grad, weight), _want(need_bias_grad, weight),
                                     "layer_norm")
    return call.out(dx, dw, db)


@_grain
def rms_norm_forward(ks, x, normalized_shape, weight, eps=None):
    r"""RMS norm over the trailing ``normalized_shape``: ``(y, rstd)``.

    ``eps=None`` resolves as torch.nn.functional.rms_norm does (see reference.rms_norm.resolve_rms_eps).
    """
    e = _RMS_EPS.get(x.dtype) if eps is None and type(x) is np.ndarray else eps
    out = _row_forward_plain(ks, x, normalized_shape, weight, None, e, False)
    if out is not None:
        return out[0], out[2]
    call = _Call(x)
    eps = resolve_rms_eps(eps, call.dtype)
    y, _, rstd = _row_forward(ks, call, normalized_shape, weight, None, eps, False, "rms_norm")
    return call.out(y, rstd)


@_grain
def rms_norm_backward(ks, dy, x, normalized_shape, weight, rstd, *, need_weight_grad=None):
    r"""RMS norm backward: ``(dx, dweight)``."""
    call, dx, dw, _ = _row_backward(ks, dy, x, normalized_shape, weight, None, rstd, False,
                                    _want(need_weight_grad, weight), False, "rms_norm")
    return call.out(dx, dw)


# --- GroupNorm / InstanceNorm (row on channels-first, column on channels-last) ---------------

def _grouped_forward(ks, xp, cl, G, w, b, eps, want_var):
    """Shared by group_norm (G groups) and instance_norm (G = C), on a C-contiguous ``xp`` in its
    physical layout (``cl``: (N, *S, C)); w, b: float64 (C,). ``y, mean, var, rstd`` (N, G) in
    x's dtype (``var`` empty unless ``want_var``), y in xp's layout."""
    N, C = xp.shape[0], _channels(xp, cl)
    inner = _spatial(xp, cl)
    gs = C // G
    dt = xp.dtype
    y = _pool.empty_like(xp)
    mean, m2 = np.empty(N * G), np.empty(N * G)
    if xp.size:
        xf, yf = xp.ravel(), y.ravel()
        if cl:
            rc, kt, m, per_slab = _col_params(N, inner, C, gs, xp.itemsize)
            _col_forward(ks, xf, N, inner, C, gs, 1, w, b, eps, _k.TRAIN, _DUMMY, _DUMMY, yf, mean,
                         m2, rc, kt, m, per_slab)
        else:
            R = N * G
            T, per = _row_tasks(ks, R, gs * inner)
            ks.row_seg_forward(xf, R, gs, inner, G, T, per, w, b, float(eps), _k.TRAIN,
                                 _DUMMY, _DUMMY, yf, mean, m2)
    mean_o, rstd_o = np.empty((N, G), dt), np.empty((N, G), dt)
    var_o = np.empty((N, G) if want_var else 0, dt)
    _k.finish_moments(mean, m2, gs * inner if xp.size else 0, float(eps), mean_o.ravel(),
                      var_o.ravel(), rstd_o.ravel(), _EMPTY)
    return y, mean_o, var_o, rstd_o


def _grouped_backward(ks, dyp, xp, cl, G, w, mean64, rstd64, need_w, need_b):
    """The grouped backward on C-contiguous ``dyp``, ``xp`` of one physical layout; w: float64
    (C,); mean64, rstd64: float64 (N * G,). ``(dx, dweight, dbias)``, the last two float64."""
    N, C = xp.shape[0], _channels(xp, cl)
    inner = _spatial(xp, cl)
    gs = C // G
    dx = _pool.empty_like(xp)
    sdy, sdyx = np.zeros(N * C), np.zeros(N * C)
    if xp.size:
        xf, dyf, dxf = xp.ravel(), dyp.ravel(), dx.ravel()
        if cl:
            rc, kt, m, per_slab = _col_params(N, inner, C, gs, xp.itemsize)
            _col_backward(ks, dyf, xf, N, inner, C, gs, 1, w, mean64, rstd64, True, True, dxf, sdyx,
                          sdy, rc, kt, m, per_slab)
        else:
            R = N * G
            T, per = _row_tasks(ks, R, gs * inner)
            ks.row_seg_backward(dyf, xf, R, gs, inner, G, T, per, w, mean64, rstd64, _k.FUSED,
                                  _DUMMY, _DUMMY, dxf, sdy, sdyx, _DUMMY)
    dweight = sdyx.reshape(N, C).sum(axis=0) if need_w else None
    dbias = sdy.reshape(N, C).sum(axis=0) if need_b else None
    return dx, dweight, dbias


def _grouped_call_forward(ks, call, G, w, b, eps, channels_last, want_var):
    xp, cl, swapped = A.layout(call.x, channels_last)
    y, mean, var, rstd = _grouped_forward(ks, xp, cl, G, w, b, eps, want_var)
    return A.restore(y, channels_last, swapped), mean, var, rstd


def _grouped_call_backward(ks, call, dy, G, w, mean, rstd, channels_last, need_w, need_b):
    xp, cl, swapped = A.layout(call.x, channels_last)
    dyp = A.same_layout(dy, cl, channels_last, swapped).astype(xp.dtype, copy=False)
    N = xp.shape[0]
    mean64 = _stat(call, mean, (N, G), "mean")
    rstd64 = _stat(call, rstd, (N, G), "rstd")
    dx, dweight, dbias = _grouped_backward(ks, dyp, xp, cl, G, w, mean64, rstd64, need_w, need_b)
    return A.restore(dx, channels_last, swapped), dweight, dbias


def _grouped_checks(call, x, channels_last, weight, bias, what, min_ndim, layout_s):
    """``(C, w, b)``: the channel count and weight/bias as float64 (C,) vectors (checked)."""
    _checks.check_min_ndim(x, min_ndim, what, layout_s)
    C = x.shape[-1] if (channels_last and x.ndim >= 3) else x.shape[1]
    return C, _vec(call, weight, C, "weight", 1.0), _vec(call, bias, C, "bias", 0.0)


def _group_norm_plain(ks, x, G, weight, bias, eps, channels_last):
    """``group_norm_forward`` of a *plain* call, or None: then the checked path must run.

    Plain: ``_plain_channels``; ``G`` an int > 0 dividing the channels; weight and bias None or
    plain (C,) arrays of x's dtype (``_plain_param``). Every check of the checked path holds for
    such a call and the kernel call is the one that path makes (``_grouped_forward``, the
    parameters cast to float64 as there), so results are the same; what it skips is the
    conversions.
    """
    plain = _plain_channels(ks, x, eps, channels_last)
    if plain is None or type(G) is not int:
        return None
    cl, C = plain
    if not (G > 0 and C % G == 0):
        return None
    dt = x.dtype
    w = _plain_param(weight, (C,), dt, C, None)
    b = _plain_param(bias, (C,), dt, C, None)
    if w is False or b is False:
        return None
    y, mean, _, rstd = _grouped_forward(ks, x, cl, G, _f64(w, C, 1.0), _f64(b, C, 0.0), eps,
                                        False)
    return y, mean, rstd


@_grain
def group_norm_forward(ks, x, num_groups, weight, bias, eps, *, channels_last=False):
    r"""Group norm forward: ``(y, mean, rstd)``, statistics ``(N, G)`` in x's dtype."""
    out = _group_norm_plain(ks, x, num_groups, weight, bias, eps, channels_last)
    if out is not None:
        return out
    call = _Call(x)
    C, w, b = _grouped_checks(call, call.x, channels_last, weight, bias, "group_norm", 2,
                              "(N, C, *spatial)")
    _checks.check_eps(eps)
    _checks.check_groups(num_groups, C)
    y, mean, _, rstd = _grouped_call_forward(ks, call, int(num_groups), w, b, eps, channels_last,
                                             False)
    return call.out(y, mean, rstd)


@_grain
def group_norm_backward(ks, dy, x, num_groups, weight, mean, rstd, *, channels_last=False,
                        need_weight_grad=None, need_bias_grad=None):
    r"""Group norm backward: ``(dx, dweight, dbias)``."""
    call = _Call(x)
    C, w, _ = _grouped_checks(call, call.x, channels_last, weight, None, "group_norm", 2,
                              "(N, C, *spatial)")
    _checks.check_groups(num_groups, C)
    dy = _like(call, dy, call.x.shape, "dy")
    out = _grouped_call_backward(ks, call, dy, int(num_groups), w, mean, rstd, channels_last,
                                 _want(need_weight_grad, weight), _want(need_bias_grad, weight))
    return call.out(*out)


def _instance_spatial_check(x, channels_last):
    spatial = math.prod(x.shape[1:-1] if channels_last else x.shape[2:])
    if spatial <= 1:
        raise ValueError(
            f"instance_norm in training needs more than 1 spatial element per channel, got an "
            f"input of shape {tuple(x.shape)} ({spatial} spatial element); InstanceNorm of a "
            f"single value is always 0: use LayerNorm or BatchNorm for (N, C) data")


@_grain
def instance_norm_forward(ks, x, weight, bias, eps, *, channels_last=False):
    r"""Instance norm forward (statistics per sample and channel): ``(y, mean, var, rstd)``, (N, C).

    For inference with given per-channel statistics use ``batch_norm_forward(..., mean=, var=)``:
    it is the same transform.
    """
    call = _Call(x)
    C, w, b = _grouped_checks(call, call.x, channels_last, weight, bias, "instance_norm", 3,
                              "(N, C, *spatial) with at least one spatial dim")
    _checks.check_eps(eps)
    _instance_spatial_check(call.x, channels_last)
    return call.out(*_grouped_call_forward(ks, call, C, w, b, eps, channels_last, True))


@_grain
def instance_norm_backward(ks, dy, x, weight, mean, rstd, *, channels_last=False, need_weight_grad=None,
                           need_bias_grad=None):
    r"""Instance norm backward: ``(dx, dweight, dbias)``."""
    call = _Call(x)
    C, w, _ = _grouped_checks(call, call.x, channels_last, weight, None, "instance_norm", 3,
                              "(N, C, *spatial) with at least one spatial dim")
    dy = _like(call, dy, call.x.shape, "dy")
    out = _grouped_call_backward(ks, call, dy, C, w, mean, rstd, channels_last,
                                 _want(need_weight_grad, weight), _want(need_bias_grad, weight))
    return call.out(*out)


# --- unchecked entries (not part of the kernel contract) -------------------------------------
#
# normlab.nn's eager path calls the cores above through these, on NumPy views of tensors that
# normlab.nn.functional has validated (shapes, dtypes, eps, groups, value counts): the checks
# and conversions of the contract functions cost more than the kernels on small inputs
# (LayerNorm 8 x 64: 5.7 + 12.4 us through the contract, 1.0 + 1.7 us in the kernels).
# The caller guarantees: x (and dy) C-contiguous float32/float64 arrays in their physical
# layout (``cl``: (N, *S, C)), dy of x's dtype; weight/bias/statistics of the shapes the
# contract functions check. Results are as the contract functions return them (x's dtype),
# still in the physical layout. Same cores, same results.

def _f64(v, n, fill):
    return _param(v, n, np.float64, fill)


@_grain
def direct_batch_norm_forward(ks, xp, cl, weight, bias, eps, mean=None, var=None):
    """``(y, mean, var, rstd)`` as ``batch_norm_forward`` (unchecked; see above)."""
    C = _channels(xp, cl)
    given = mean is not None
    if given and xp.size and ks is _k.SERIAL_KERNELS:     # no float64 casts: the kernel reads
        dt = xp.dtype                                      # x's dtype as they would
        return _bn_given_small(xp, C, 1 if cl else _spatial(xp, cl), _given(weight, C, dt, 1.0),
                               _given(bias, C, dt, 0.0), eps, _given(mean, C, dt, 0.0),
                               _given(var, C, dt, 1.0))
    return _bn_forward(ks, xp, cl, _f64(weight, C, 1.0), _f64(bias, C, 0.0), eps,
                       _f64(mean, C, 0.0) if given else None, _f64(var, C, 1.0) if given else None)


@_grain
def direct_batch_norm_backward(ks, dyp, xp, cl, weight, mean, rstd, training, need_w, need_b):
    """``(dx, dweight, dbias)`` as ``batch_norm_backward`` (unchecked; see above)."""
    C = _channels(xp, cl)
    dx, dw, db = _bn_backward(ks, dyp, xp, cl, _f64(weight, C, 1.0), _f64(mean, C, 0.0),
                              _f64(rstd, C, 1.0), training, need_w, need_b)
    return dx, _cast(dw, xp.dtype), _cast(db, xp.dtype)


@_grain
def direct_grouped_forward(ks, xp, cl, G, weight, bias, eps, want_var):
    """``(y, mean, var, rstd)``, statistics (N, G): group_norm (instance_norm: G = C)."""
    C = _channels(xp, cl)
    return _grouped_forward(ks, xp, cl, G, _f64(weight, C, 1.0), _f64(bias, C, 0.0), eps,
                            want_var)


@_grain
def direct_grouped_backward(ks, dyp, xp, cl, G, weight, mean, rstd, need_w, need_b):
    """``(dx, dweight, dbias)`` of group_norm / instance_norm (unchecked; see above)."""
    C, n = _channels(xp, cl), xp.shape[0] * G
    dx, dw, db = _grouped_backward(ks, dyp, xp, cl, G, _f64(weight, C, 1.0), _f64(mean, n, 0.0),
                                   _f64(rstd, n, 1.0), need_w, need_b)
    return dx, _cast(dw, xp.dtype), _cast(db, xp.dtype)


@_grain
def direct_row_forward(ks, xc, L, weight, bias, eps, centered):
    """``(y, mean, rstd)`` of layer_norm (``centered``) or rms_norm over rows of L values, the
    statistics flat (R,) (unchecked; see above)."""
    dt = xc.dtype
    return _row_fwd(ks, xc, L, _param(weight, L, dt, 1.0), _param(bias, L, dt, 0.0), eps,
                    centered)


@_grain
def direct_row_backward(ks, dyc, xc, L, weight, mean, rstd, centered, need_w, need_b):
    """``(dx, dweight, dbias)`` of layer_norm / rms_norm, dweight/dbias flat (L,) (unchecked)."""
    dt, R = xc.dtype, xc.size // L
    mean64 = _f64(mean, R, 0.0) if centered else _filled(R, np.float64, 0.0)
    return _row_bwd(ks, dyc, xc, L, _param(weight, L, dt, 1.0), mean64, _f64(rstd, R, 1.0),
                    centered, need_w, need_b)


# --- column moments (not part of the kernel contract) ---------------------------------------

@_grain
def column_moments(ks, x):
    """``(mean, M2)``: float64 ``(C,)`` moments of each column of a 2-D float32/float64 array
    ``(N, C)`` (``M2`` = sum of squared deviations), by the column kernels' statistics pass
    alone (one read of x; ``y`` is not computed). A column holding NaN or inf gives a non-finite
    mean or M2. The chunking is that of float64 data for both dtypes, so float32 data and the
    same values in float64 give bit-identical results. Used by ``normlab.estimators``.

    A read-only array (e.g. a memory map) is copied first: read-only arrays are another numba
    type, and passing one would compile the kernels again."""
    x = np.asarray(x)
    if x.ndim != 2 or x.dtype not in A.KERNEL_DTYPES:
        raise ValueError(f"column_moments takes a 2-D float32 or float64 array, got shape "
                         f"{x.shape} and dtype {x.dtype}")
    x = _kernel_array(x, x.dtype)
    N, C = x.shape
    mean, m2 = np.empty(C), np.empty(C)
    if N == 0:
        mean.fill(np.nan)
        m2.fill(np.nan)
        return mean, m2
    rc, kt, m, per_slab = _col_params(1, N, C, 1, 8)
    _col_forward(ks, x.ravel(), 1, N, C, 1, 1, _filled(C, np.float64, 1.0),
                 _filled(C, np.float64, 0.0), 1.0, _k.STATS, _DUMMY, _DUMMY,
                 _filled(0, x.dtype, 0.0), mean, m2, rc, kt, m, per_slab)   # y: not written
    return mean, m2


# --- ahead-of-use compilation -----------------------------------------------------------------

def compile_all(dtypes=(np.float32, np.float64)) -> float:
    """Compile every numba kernel of this backend for ``dtypes``, the serial twins and the
    parallel kernels, or load them from numba's on-disk cache; returns the seconds it took.

    The first call of a kernel in a fresh environment compiles it (README, "Performance"); this
    does all of it at once, e.g. in an image build step or before starting worker processes.
    Worker processes that compile the same cache=True functions at the same moment can write
    disagreeing cache entries (numba issues #10128, #10486); compiling here first, in one
    process, leaves them only loading (the test suite does this before pytest-xdist starts).
    """
    t0 = time.perf_counter()
    f = {name: globals()[name].__wrapped__ for name in __all__}     # taking the kernel set first
    for dt in dtypes:
        rng = np.random.default_rng(0)
        x4 = rng.standard_normal((2, 3, 7, 13)).astype(dt)          # planes >= 32: row kernels
        xc = np.ascontiguousarray(np.moveaxis(x4, 1, -1))            # channels-last: column
        xs = rng.standard_normal((COL_PER_SLAB_MIN, 5, 3)).astype(dt)  # per-slab schedule
        x2 = rng.standard_normal((5, 9)).astype(dt)
        w, m3 = np.ones(3), np.zeros(3)
        for ks in (_k.SERIAL_KERNELS, _k.PARALLEL_KERNELS):
            y, m, r = f["layer_norm_forward"](ks, x2, 9, None, None, 1e-5)
            f["layer_norm_backward"](ks, x2, x2, 9, None, m, r)
            y, m, r = f["group_norm_forward"](ks, x4, 3, w, w, 1e-5)
            f["group_norm_backward"](ks, x4, x4, 3, w, m, r)
            for cl, xx in ((False, x4), (True, xc)):
                y, m, v, r = f["batch_norm_forward"](ks, xx, w, w, 1e-5, channels_last=cl)
                f["batch_norm_backward"](ks, xx, xx, w, m, r, channels_last=cl)
                f["batch_norm_forward"](ks, xx, w, w, 1e-5, channels_last=cl, mean=m3, var=w)
                wd = w.astype(dt)                            # parameters of x's dtype
                f["batch_norm_forward"](ks, xx, wd, wd, 1e-5, channels_last=cl, mean=wd, var=wd)
            y, m, v, r = f["instance_norm_forward"](ks, xs, w, w, 1e-5, channels_last=True)
            f["instance_norm_backward"](ks, xs, xs, w, m, r, channels_last=True)
        for ks in (_k.SERIAL_KERNELS, _k.PARALLEL_KERNELS):  # the estimators' statistics
            column_moments.__wrapped__(ks, x2)
        v3 = np.ones(3, dt)                                  # nn.functional's running update
        _k.fold_running(v3.copy(), v3.copy(), v3, v3, 1.0, 0.1, True, np.zeros(1, np.int64))
    return time.perf_counter() - t0
