"""The output pool of the CPU kernels (normlab.kernels._pool): large outputs reuse the memory of
earlier outputs that nothing refers to any more, and never memory still in use."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from normlab.kernels import _pool as P
from normlab.kernels import numba_cpu as K

SHAPE = (512, 1024)          # 2 MiB of float32: above MIN_BYTES


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch):
    monkeypatch.setattr(P, "_BUFS", [])
    monkeypatch.delenv(P.ENV_VAR, raising=False)


def _addr(a) -> int:
    return a.data_ptr() if isinstance(a, torch.Tensor) else a.__array_interface__["data"][0]


def test_idle_memory_is_reused_and_memory_in_use_never_is():
    a = P.empty(SHAPE, np.float32)
    assert a.shape == SHAPE and a.dtype == np.float32 and a.flags.c_contiguous
    b = P.empty(SHAPE, np.float32)
    assert _addr(a) != _addr(b)
    old = _addr(a)
    del a
    assert _addr(P.empty(SHAPE, np.float32)) == old          # idle: reused
    held = [
        lambda x: x[3:5],                                      # a NumPy view
        lambda x: torch.from_numpy(x),                         # a tensor on it
        lambda x: torch.from_numpy(x)[1:].numpy(),             # a view of a view of a tensor
        lambda x: memoryview(x),                               # a buffer export
    ]
    for hold in held:
        x = P.empty(SHAPE, np.float32)
        x[:] = 7.0
        keep = hold(x)
        addr = _addr(x)
        del x
        y = P.empty(SHAPE, np.float32)
        assert _addr(y) != addr, hold
        y[:] = -1.0                                          # must not touch what keep sees
        assert np.all(np.asarray(keep) == 7.0), hold
        del keep, y


def test_the_most_recently_used_idle_buffer_is_handed_out():
    """Of several idle buffers, the one handed out last comes back first: it is the one most
    likely still in cache (with the least recently used first, a loop alternated between two
    buffers once two outputs had been alive together)."""
    a, b, c = (P.empty(SHAPE, np.float32) for _ in range(3))
    order = [_addr(a), _addr(b), _addr(c)]
    del a, b, c
    for _ in range(3):                                       # a loop with one output at a time
        y = P.empty(SHAPE, np.float32)
        assert _addr(y) == order[-1]
        del y
    y1, y2 = P.empty(SHAPE, np.float32), P.empty(SHAPE, np.float32)
    assert (_addr(y1), _addr(y2)) == (order[-1], order[-2])


def test_other_dtypes_and_sizes_share_nothing_they_should_not():
    a = P.empty(SHAPE, np.float32)
    addr = _addr(a)
    del a
    b = P.empty(SHAPE, np.float64)                            # twice the bytes: a new buffer
    assert b.dtype == np.float64 and b.shape == SHAPE and _addr(b) != addr
    assert P.empty((2, 3), np.float32).base is None            # small: plain np.empty


@pytest.mark.parametrize("shape", [SHAPE, (3, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_like_is_empty_of_the_arrays_shape_and_dtype(shape, dtype):
    """empty_like(a) is empty(a.shape, a.dtype): the pool's memory when large (reused once
    idle), a plain C-contiguous array when small."""
    a = np.ones(shape, dtype)
    y = P.empty_like(a)
    assert y.shape == a.shape and y.dtype == a.dtype and y.flags.c_contiguous
    assert y.flags.writeable and not np.shares_memory(y, a)
    large = y.nbytes >= P.MIN_BYTES
    assert len(P._BUFS) == (1 if large else 0)
    if large:
        addr = _addr(y)
        del y
        assert _addr(P.empty_like(a)) == addr                  # idle: reused


def test_the_cap_bounds_the_pool_and_zero_turns_it_off(monkeypatch):
    monkeypatch.setenv(P.ENV_VAR, "5")                          # MiB: two 2 MiB buffers fit
    bufs = [P.empty(SHAPE, np.float32) for _ in range(4)]
    assert sum(b.size for b in P._BUFS) <= 5 << 20 and len(P._BUFS) == 2
    for i, b in enumerate(bufs):                               # dropped ones stay valid, apart
        b[:] = i
    assert [float(b[-1, -1]) for b in bufs] == [0.0, 1.0, 2.0, 3.0]
    monkeypatch.setenv(P.ENV_VAR, "0")
    P._BUFS.clear()
    x = P.empty(SHAPE, np.float32)
    assert not P._BUFS and x.base is None
    monkeypatch.setenv(P.ENV_VAR, "lots")
    with pytest.raises(ValueError, match="NORMLAB_OUTPUT_POOL_MB.*'lots'"):
        P.empty(SHAPE, np.float32)


def test_release_frees_idle_buffers_only():
    a = P.empty(SHAPE, np.float32)
    b = P.empty(SHAPE, np.float32)
    del b
    assert P.release() == SHAPE[0] * SHAPE[1] * 4
    assert len(P._BUFS) == 1 and P._BUFS[0] is a.base


def test_kernel_outputs_in_a_loop_are_correct_and_recycled():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    y0 = K.layer_norm_forward(x, SHAPE[1], None, None, 1e-5)[0].copy()
    seen = set()
    for _ in range(4):
        y = K.layer_norm_forward(x, SHAPE[1], None, None, 1e-5)[0]
        np.testing.assert_array_equal(y, y0)
        seen.add(_addr(y))
        del y
    assert len(seen) == 1
    kept = [K.layer_norm_forward(x, SHAPE[1], None, None, 1e-5)[0] for _ in range(3)]
    assert len({_addr(k) for k in kept}) == 3                  # live outputs never share memory
    for k in kept:
        np.testing.assert_array_equal(k, y0)


def test_threads_never_get_the_same_buffer():
    out, lock = [], threading.Lock()

    def work():
        mine = [P.empty(SHAPE, np.float32) for _ in range(5)]
        for i, m in enumerate(mine):
            m[:] = i
        with lock:
            out.append(mine)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    addrs = [_addr(m) for mine in out for m in mine]
    assert len(set(addrs)) == len(addrs)
    for mine in out:
        for i, m in enumerate(mine):
            assert np.all(m == i)


def test_the_public_release_function():
    from normlab import kernels

    a = P.empty(SHAPE, np.float32)
    del a
    assert kernels.release_output_pool() == SHAPE[0] * SHAPE[1] * 4
    assert kernels.release_output_pool() == 0 and not P._BUFS
