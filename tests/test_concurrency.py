"""Concurrency: one model, one NumPy layer, one estimator, the numba kernels, used from several
threads at once in inference, give bit-identical results to serial calls.

Why this holds (docs/reliability.md, "Thread safety"): the kernels keep no shared mutable state
(scratch buffers are thread-local, outputs freshly allocated); inputs under ``SERIAL_BELOW`` elements
run serial twins of the kernels on the calling thread, and numba's thread count, which the
caller may set, is per-thread in numba (tested below); the work partition depends on the shape only, never on
the thread count; and under numba's "workqueue" threading layer, which aborts the process on
concurrent use, the kernels take turns on one lock (tested in a subprocess).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from normlab import layers as L
from normlab.estimators import BatchNormalizer
from normlab.kernels import numba_cpu as K

WORKERS = 4
REPEATS = 3
BIG = K.SERIAL_BELOW          # elements: inputs at least this big run the parallel path


def _run_threads(fn, inputs):
    """fn over inputs, REPEATS times each, interleaved across WORKERS threads."""
    jobs = [x for _ in range(REPEATS) for x in inputs]
    with ThreadPoolExecutor(WORKERS) as ex:
        out = list(ex.map(fn, jobs))
    return [out[i::len(inputs)] for i in range(len(inputs))]   # results per input


def _assert_bit_identical(serial, threaded, equal):
    for i, (want, gots) in enumerate(zip(serial, threaded)):
        for got in gots:
            assert equal(want, got), f"input {i}: threaded result differs from serial"


def _tensors_equal(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b)) if isinstance(a, tuple) else torch.equal(a, b)


def _arrays_equal(a, b):
    if isinstance(a, tuple):
        return all(_arrays_equal(u, v) for u, v in zip(a, b))
    return a is None and b is None or np.array_equal(a, b)


# ---------------------------------------------------------------------- numba's thread count


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs NUMBA_NUM_THREADS >= 2")
def test_numba_thread_count_is_per_thread():
    """What the kernels rely on: set_num_threads in one thread leaves the others' count alone."""
    full = numba.get_num_threads()
    assert full >= 2
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def worker():
        numba.set_num_threads(1)
        seen["worker"] = numba.get_num_threads()
        inside.set()
        release.wait(10)
        seen["worker_after"] = numba.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    seen["main"] = numba.get_num_threads()
    release.set()
    t.join()
    assert seen == {"worker": 1, "worker_after": 1, "main": full}


def test_small_inputs_run_the_serial_twins_and_large_ones_the_parallel_kernels():
    """Inputs under SERIAL_BELOW run the serial twins on the calling thread; neither path
    changes numba's thread count."""
    full = numba.get_num_threads()
    seen = []

    @K._grain
    def probe(ks, x):
        seen.append((ks.kind, numba.get_num_threads()))

    probe(np.zeros(8))
    probe(torch.zeros(BIG))
    assert seen == [("serial", full), ("parallel", full)]
    assert numba.get_num_threads() == full


def test_thread_counts_restored_after_concurrent_calls():
    counts = []

    def work(x):
        before = numba.get_num_threads()
        K.layer_norm_forward(x, (x.shape[-1],), None, None, 1e-5)
        counts.append((before, numba.get_num_threads()))

    xs = [np.random.default_rng(i).standard_normal((4, 33)).astype(np.float32) for i in range(16)]
    with ThreadPoolExecutor(WORKERS) as ex:
        list(ex.map(work, xs))
    assert all(b == a for b, a in counts)


# ---------------------------------------------------------------------- the kernels directly


def _kernel_calls():
    """(name, fn(x) -> tuple of arrays): every kernel family, forward and backward."""
    eps = 1e-5

    def bn(x):
        y, mean, var, rstd = K.batch_norm_forward(x, w(x, 1), w(x, 1) * 0.5, eps)
        return (y,) + K.batch_norm_backward(np.cos(x), x, w(x, 1), mean, rstd)

    def bn_cl(x):
        y, mean, var, rstd = K.batch_norm_forward(x, None, None, eps, channels_last=True)
        return (y,) + K.batch_norm_backward(np.cos(x), x, None, mean, rstd, channels_last=True)

    def ln(x):
        shape = (x.shape[-1],)
        y, mean, rstd = K.layer_norm_forward(x, shape, w(x, -1), w(x, -1), eps)
        return (y,) + K.layer_norm_backward(np.cos(x), x, shape, w(x, -1), mean, rstd)

    def rms(x):
        shape = (x.shape[-1],)
        y, rstd = K.rms_norm_forward(x, shape, w(x, -1), eps)
        return (y,) + K.rms_norm_backward(np.cos(x), x, shape, w(x, -1), rstd)

    def gn(x):
        y, mean, rstd = K.group_norm_forward(x, 2, w(x, 1), w(x, 1), eps)
        return (y,) + K.group_norm_backward(np.cos(x), x, 2, w(x, 1), mean, rstd)

    def inorm(x):
        y, mean, var, rstd = K.instance_norm_forward(x, w(x, 1), None, eps)
        return (y,) + K.instance_norm_backward(np.cos(x), x, w(x, 1), mean, rstd)

    def w(x, axis):
        return np.linspace(0.5, 1.5, x.shape[axis]).astype(x.dtype)

    return {"batch_norm": bn, "batch_norm channels_last": bn_cl, "layer_norm": ln,
            "rms_norm": rms, "group_norm": gn, "instance_norm": inorm}


def _kernel_inputs(dtype):
    g = np.random.default_rng(0)
    small = [(g.standard_normal((n, 4, 7)) * 3 + 10).astype(dtype) for n in (2, 5, 8, 13)]
    big = [g.standard_normal((8, 4, BIG // 32)).astype(dtype)]    # exactly BIG elements
    return small + big


@pytest.mark.parametrize("name", list(_kernel_calls()))
def test_kernels_threaded_equals_serial(name):
    fn = _kernel_calls()[name]
    xs = _kernel_inputs(np.float32) + _kernel_inputs(np.float64)[:2]
    serial = [fn(x) for x in xs]
    _assert_bit_identical(serial, _run_threads(fn, xs), _arrays_equal)


# ---------------------------------------------------------------------- torch modules


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nlnn.BatchNorm2d(8), nn.ReLU(),
        nlnn.GroupNorm(4, 8), nlnn.InstanceNorm2d(8, affine=True, track_running_stats=True),
        nlnn.BatchRenorm2d(8), nlnn.GhostBatchNorm2d(8, virtual_batch_size=2),
        nlnn.FrozenBatchNorm2d(8), nlnn.SyncBatchNorm(8),
        nn.Flatten(2), nlnn.LayerNorm(64), nlnn.RMSNorm(64))
    # non-trivial running statistics and affine parameters
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(6, 3, 8, 8) * 2 + 1)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def test_nn_model_threaded_equals_serial():
    m = _model()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 3, 8, 8, generator=g) for n in (1, 2, 3, 5, 8, 16)]
    xs.append(torch.randn(256, 3, 8, 8, generator=g))      # BN input of 131072 elements
    with torch.no_grad():
        serial = [m(x) for x in xs]

        def fn(x):
            return m(x)

        threaded = _run_threads(fn, xs)
    _assert_bit_identical(serial, threaded, _tensors_equal)


def test_nn_big_batch_norm_threaded_equals_serial():
    """A BatchNorm input above SERIAL_BELOW: the parallel kernels, from several threads."""
    bn = nlnn.BatchNorm2d(16).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(8, 16, 64, 64, generator=g) for _ in range(2)]   # 524288 elements each
    assert xs[0].numel() >= BIG
    with torch.no_grad():
        serial = [bn(x) for x in xs]
        threaded = _run_threads(bn, xs)
    _assert_bit_identical(serial, threaded, _tensors_equal)


def test_nn_functional_training_threaded_equals_serial():
    """Batch statistics (no running stats: nothing shared is written) and autograd per thread."""
    from normlab.nn import functional as F

    def fn(x):
        x = x.clone().requires_grad_(True)
        y = F.batch_norm(x, None, None, training=True, eps=1e-5)
        (dx,) = torch.autograd.grad((y * torch.cos(y)).sum(), x)
        return y.detach(), dx

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 6, 9, generator=g) * 5 + 3 for n in (2, 3, 7, 16)]
    serial = [fn(x) for x in xs]
    _assert_bit_identical(serial, _run_threads(fn, xs), _tensors_equal)


# ---------------------------------------------------------------------- NumPy layers, estimator


def _layers():
    g = np.random.default_rng(4)
    out = {"BatchNorm": L.BatchNorm(6), "InstanceNorm": L.InstanceNorm(6, affine=True,
                                                                         track_running_stats=True),
           "GroupNorm": L.GroupNorm(3, 6), "LayerNorm": L.LayerNorm(10), "RMSNorm": L.RMSNorm(10)}
    for layer in out.values():
        for _ in range(2):      # non-trivial running statistics
            layer.forward((g.standard_normal((4, 6, 10)) * 2 + 1).astype(np.float32), training=True)
        if layer.weight is not None:
            layer.weight[...] = g.uniform(0.5, 1.5, layer.weight.shape)
    return out


@pytest.mark.parametrize("name", ["BatchNorm", "InstanceNorm", "GroupNorm", "LayerNorm", "RMSNorm"])
def test_layer_threaded_equals_serial(name):
    layer = _layers()[name]
    g = np.random.default_rng(5)
    xs = [(g.standard_normal((n, 6, 10)) * 3 - 2).astype(np.float32) for n in (1, 2, 5, 9)]
    xs.append(g.standard_normal((BIG // 60 + 1, 6, 10)).astype(np.float32))

    def fn(x):
        return layer.forward(x, training=False)

    serial = [fn(x) for x in xs]
    _assert_bit_identical(serial, _run_threads(fn, xs), _arrays_equal)


def test_estimator_transform_threaded_equals_serial():
    g = np.random.default_rng(6)
    est = BatchNormalizer().fit(g.standard_normal((50, 7)) * 4 + 2)
    xs = [g.standard_normal((n, 7)) for n in (1, 3, 20, 200)]
    serial = [est.transform(x) for x in xs]
    _assert_bit_identical(serial, _run_threads(est.transform, xs), _arrays_equal)


# ---------------------------------------------------------------------- workqueue layer

_WORKQUEUE_SCRIPT = textwrap.dedent("""
    import numba, numpy as np
    from concurrent.futures import ThreadPoolExecutor
    from normlab.kernels import numba_cpu as K
    xs = [np.random.default_rng(i).standard_normal((4, 4, 16)).astype(np.float32) for i in range(8)]
    xs.append(np.random.default_rng(9).standard_normal((8, 4, K.SERIAL_BELOW // 32)).astype(np.float32))
    f = lambda x: K.batch_norm_forward(x, None, None, 1e-5)[0]
    serial = [f(x) for x in xs]
    assert numba.threading_layer() == "workqueue", numba.threading_layer()
    with ThreadPoolExecutor(4) as ex:
        for _ in range(10):
            assert all(np.array_equal(a, b) for a, b in zip(ex.map(f, xs), serial))
    print("ok")
""")


def test_kernels_survive_concurrency_under_workqueue_layer():
    """numba's workqueue layer aborts the process on concurrent parallel launches; the kernels
    serialize their calls there (one lock) so that threaded use still works."""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    proc = subprocess.run([sys.executable, "-c", _WORKQUEUE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
