"""Recycled memory for the large outputs of the CPU kernels (y, dx).

A fresh multi-megabyte array costs more than the kernel that fills it: the allocator maps new
pages from the operating system for every large allocation (glibc: above 32 MiB always, below
that whenever its heap was trimmed), and the first write to each page faults. On the 2-core
development machine a LayerNorm forward of a 64 MiB float32 (4096, 4096) input measured 8.5 ms
into a fresh output and 6.2 ms into a reused one; ``np.copyto`` into a fresh array 9.2 ms, into
a reused one 4.6 ms. In a training loop the same shapes come back every step, so the outputs of
one step can live in the memory of the previous step's, already mapped.

How: outputs of at least ``MIN_BYTES`` are views of pool-owned byte buffers. A buffer is handed
out again only when nothing but the pool refers to it (its reference count; every array or
tensor made from an output keeps a reference to the buffer through its ``base``), so memory in
use is never shared. The pool keeps at most ``$NORMLAB_OUTPUT_POOL_MB`` MiB (default 1024)
of buffers, oldest dropped first (a dropped buffer in use stays valid; it is freed when its last
array goes). ``NORMLAB_OUTPUT_POOL_MB=0`` turns the pool off; ``release()`` frees the idle
buffers now. Thread-safe (one lock).
"""

from __future__ import annotations

import math
import os
import sys
import threading

import numpy as np

__all__ = ["empty", "empty_like", "release", "MIN_BYTES", "ENV_VAR"]

#: outputs smaller than this come from np.empty (the allocator reuses small blocks by itself)
MIN_BYTES = 1 << 20
#: the environment variable that caps the pool, in MiB (0: no pool)
ENV_VAR = "NORMLAB_OUTPUT_POOL_MB"
_DEFAULT_MB = 1024
_PAGE = 1 << 12

_LOCK = threading.Lock()
_BUFS: list = []          # pool-owned 1-D uint8 arrays, least recently handed out first
# references to a buffer while _take tests it: the list, the loop variable, getrefcount's argument
_IDLE_REFS = 3


def _cap_bytes() -> int:
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return _DEFAULT_MB << 20
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_VAR} must be a number of MiB (0 turns the output pool off), "
                         f"got {raw!r}") from None
    if not (mb >= 0 and math.isfinite(mb)):
        raise ValueError(f"{ENV_VAR} must be a number of MiB >= 0, got {raw!r}")
    return int(mb * (1 << 20))


def _take(size: int):
    """An idle pool buffer of exactly ``size`` bytes, marked most recently used, or None.

    The most recently used idle buffer is taken: it is the one most likely still in cache
    (a loop whose outputs fit in L3 then writes into the same warm memory every call).
    """
    for i in range(len(_BUFS) - 1, -1, -1):
        buf = _BUFS[i]
        if buf.size == size and sys.getrefcount(buf) <= _IDLE_REFS:
            _BUFS.append(_BUFS.pop(i))
            return buf
    return None


def empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array, like ``np.empty(shape, dtype)``, whose memory is
    recycled from earlier outputs when it is large (see the module docstring)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype)
    cap = _cap_bytes()
    if nbytes > cap:
        return np.empty(shape, dtype)
    size = -(-nbytes // _PAGE) * _PAGE
    with _LOCK:
        buf = _take(size)
        if buf is None:
            buf = np.empty(size, np.uint8)
            _BUFS.append(buf)
            total = sum(b.size for b in _BUFS)
            while total > cap:                    # drop the least recently used
                total -= _BUFS.pop(0).size
        out = buf[:nbytes].view(dtype).reshape(shape)
    return out


def empty_like(a: np.ndarray) -> np.ndarray:
    """``empty(a.shape, a.dtype)``: small outputs straight from ``np.empty_like`` (half the
    Python work of ``empty`` on the per-call path of small inputs)."""
    if a.nbytes < MIN_BYTES:
        return np.empty_like(a, order="C")
    return empty(a.shape, a.dtype)


def release() -> int:
    """Free the pool's idle buffers now; returns the number of bytes released."""
    with _LOCK:
        freed = 0
        keep = []
        while _BUFS:
            buf = _BUFS.pop(0)
            if sys.getrefcount(buf) <= 2:          # the variable and getrefcount's argument
                freed += buf.size
            else:
                keep.append(buf)
            del buf
        _BUFS.extend(keep)
    return freed
