"""normlab.kernels: the fused numba kernels and the numpy backend against the float64 reference,
zero-copy behaviour, large-offset float32 accuracy against torch's, and the backend registry.

Compile time: the numba kernels are 8 functions x 2 dtypes, each in a parallel and a serial
build. A session fixture compiles them first (``numba_cpu.compile_all``); under pytest-xdist the
controller did that already (tests/conftest.py) and the workers load them from numba's on-disk
cache. No timing is asserted anywhere.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from normlab import reference as R
from normlab.reference.moments import summarize
from normlab import kernels
from normlab.kernels import _arrays, get_backend

numba = pytest.importorskip("numba")
from normlab.kernels import numba_cpu as NB  # noqa: E402
from normlab.kernels import numpy_ref as NP  # noqa: E402

torch = pytest.importorskip("torch")

F32, F64 = np.float32, np.float64
DTYPES = [F32, F64]
# (dtype, atol, rtol): atol is relative to max(1, max|expected|) of the compared array
TOL = {F32: (2e-5, 1e-4), F64: (1e-11, 1e-9)}
EPS = 1e-5


def close(actual, expected, dtype, what=""):
    assert actual is not None, f"{what}: got None"
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    atol, rtol = TOL[dtype]
    scale = max(1.0, float(np.abs(e).max())) if e.size else 1.0
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol * scale, err_msg=what)


def data(shape, dtype, seed=0, offset=3.0, scale=2.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + offset).astype(dtype)


def params(C, affine, seed=1, shape=None):
    if not affine:
        return None, None
    rng = np.random.default_rng(seed)
    shape = (C,) if shape is None else shape
    return 0.5 + rng.random(shape), rng.random(shape) - 0.5


def to_cl(x):
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


# --- compile first (loaded from numba's cache where the xdist controller compiled them) ------

@pytest.fixture(scope="session", autouse=True)
def _compiled_kernels():
    NB.compile_all()


# --- BatchNorm ---------------------------------------------------------------------------------

BN_SHAPES = [
    (7, 3), (13, 1), (4100, 16),               # (N, C): column kernel, several row chunks
    (3, 1030),                                 # K > one column tile
    (9, 2049),                                 # tiles of 4 rows a pass, a remainder row
    (2, 3, 1023), (1, 3, 1023), (2, 3, 7, 13),  # planes >= 32 values: row kernels
    (3, 7, 13), (2, 3, 4, 5), (2, 3, 2, 3, 5),  # small planes: column kernel on (N, C*inner)
    (4, 100, 20),                              # small planes, C*inner over one column tile
]


def _bn_case(shape, dtype, channels_last, affine, training, seed=0):
    x = data(shape, dtype, seed)
    C = shape[1]
    w, b = params(C, affine)
    rng = np.random.default_rng(seed + 7)
    dy = rng.standard_normal(shape).astype(dtype)
    stats = {} if training else dict(mean=rng.standard_normal(C) + 3, var=rng.random(C) + 0.5)
    if channels_last:
        x, dy = to_cl(x), to_cl(dy)
    return x, dy, w, b, stats


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NC", "CL"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_batch_norm_matches_reference(dtype, shape, channels_last, affine, training):
    x, dy, w, b, stats = _bn_case(shape, dtype, channels_last, affine, training)
    y, mean, var, rstd = NB.batch_norm_forward(x, w, b, EPS, channels_last=channels_last, **stats)
    yr, c = R.batch_norm_forward(x, w, b, eps=EPS, channels_last=channels_last, **stats)
    assert y.dtype == dtype and mean.dtype == dtype and var.dtype == dtype and rstd.dtype == dtype
    close(y, yr, dtype, "y")
    close(mean, c["mean"], dtype, "mean")
    close(var, c["var"], dtype, "var")
    close(rstd, 1 / np.sqrt(c["var"] + EPS), dtype, "rstd")
    dx, dw, db = NB.batch_norm_backward(dy, x, w, mean, rstd, channels_last=channels_last,
                                        training=training)
    gr = R.batch_norm_backward(dy, c)
    close(dx, gr[0], dtype, "dx")
    assert dx.dtype == dtype
    if affine:
        close(dw, gr[1], dtype, "dweight")
        close(db, gr[2], dtype, "dbias")
    else:
        assert dw is None and db is None


def test_batch_norm_gradient_flags():
    x, dy, _, _, _ = _bn_case((4, 3, 5, 7), F64, False, False, True)
    y, m, v, r = NB.batch_norm_forward(x, None, None, EPS)
    dx, dw, db = NB.batch_norm_backward(dy, x, None, m, r, need_weight_grad=True, need_bias_grad=True)
    _, c = R.batch_norm_forward(x, np.ones(3), np.zeros(3), eps=EPS)
    gr = R.batch_norm_backward(dy, c)
    close(dw, gr[1], F64, "dweight for a unit weight")
    close(db, gr[2], F64, "dbias")
    w = np.full(3, 2.0)
    dx, dw, db = NB.batch_norm_backward(dy, x, w, m, r, need_weight_grad=False, need_bias_grad=True)
    assert dw is None and db is not None
    dx, dw, db = NB.batch_norm_backward(dy, x, w, m, r, training=False, need_weight_grad=False,
                                        need_bias_grad=False)
    close(dx, dy * (2.0 * r)[None, :, None, None], F64, "inference dx")
    assert dw is None and db is None


# --- LayerNorm / RMSNorm -----------------------------------------------------------------------

ROW_CASES = [((1, 7), 1), ((13, 1023), 1), ((3, 5, 7), 2), ((7, 1), 1), ((2, 9000), 1),
             ((4, 3, 13), 1), ((5,), 1), ((3, 64), 1)]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape,k", ROW_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_layer_norm_matches_reference(dtype, shape, k, affine):
    ns = shape[len(shape) - k:]
    x = data(shape, dtype)
    dy = data(shape, dtype, seed=5, offset=0.0, scale=1.0)
    w, b = params(None, affine, shape=ns)
    y, mean, rstd = NB.layer_norm_forward(x, ns, w, b, EPS)
    yr, c = R.layer_norm_forward(x, ns, w, b, eps=EPS)
    lead = shape[:len(shape) - k]
    assert mean.shape == lead and rstd.shape == lead and y.dtype == dtype
    close(y, yr, dtype, "y")
    close(mean, c["mean"].reshape(lead), dtype, "mean")
    close(rstd, c["rstd"].reshape(lead), dtype, "rstd")
    dx, dw, db = NB.layer_norm_backward(dy, x, ns, w, mean, rstd)
    gr = R.layer_norm_backward(dy, c)
    close(dx, gr[0], dtype, "dx")
    if affine:
        close(dw, gr[1], dtype, "dweight")
        close(db, gr[2], dtype, "dbias")
        assert dw.shape == ns and dw.dtype == dtype
    else:
        assert dw is None and db is None


@pytest.mark.parametrize("eps", [EPS, None], ids=["eps", "eps=None"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape,k", ROW_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_rms_norm_matches_reference(dtype, shape, k, affine, eps):
    ns = shape[len(shape) - k:]
    x = data(shape, dtype, offset=0.5)
    dy = data(shape, dtype, seed=5, offset=0.0, scale=1.0)
    w, _ = params(None, affine, shape=ns)
    y, rstd = NB.rms_norm_forward(x, ns, w, eps)
    yr, c = R.rms_norm_forward(x, ns, w, eps=eps if eps is not None else float(np.finfo(dtype).eps))
    close(y, yr, dtype, "y")
    close(rstd, c["rstd"].reshape(rstd.shape), dtype, "rstd")
    dx, dw = NB.rms_norm_backward(dy, x, ns, w, rstd)
    gr = R.rms_norm_backward(dy, c)
    close(dx, gr[0], dtype, "dx")
    if affine:
        close(dw, gr[1], dtype, "dweight")
    else:
        assert dw is None


def spy_plain(monkeypatch, name):
    """Wrap the plain-path function ``NB.<name>``: ``(taken, spy)``, ``taken`` recording each
    call as True (the plain path ran), False (the checked path must) or "raised"."""
    real, taken = getattr(NB, name), []

    def spy(*args):
        try:
            out = real(*args)
        except ValueError:
            taken.append("raised")
            raise
        taken.append(out is not None)
        return out

    monkeypatch.setattr(NB, name, spy)
    return taken, spy


def read_only(x):
    """A read-only copy of x (another numba type: never a plain call)."""
    ro = x.copy()
    ro.flags.writeable = False
    return ro


def other_typed(w, b):
    """weight and bias as another type that holds the same values: float64 arrays for float32
    ones, lists for float64 ones (never plain; the checked path casts them back exactly)."""
    return (w.astype(F64), b.astype(F64)) if w.dtype == F32 else (list(w), list(b))


def assert_same(got, want):
    """Same outputs bit for bit, dtypes and shapes included."""
    assert len(got) == len(want)
    for g, e in zip(got, want):
        assert g.dtype == e.dtype and g.shape == e.shape and np.array_equal(g, e)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", [(8, 64), (3, 5, 7), (7,), (2, 3, 1, 4), (1, 4096)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_plain_row_calls_equal_the_checked_path(monkeypatch, dtype, shape, affine):
    """layer_norm/rms_norm forward of a plain call (ndarrays of x's dtype, float eps, one
    normalized dim; see _row_forward_plain) skips the conversions: same outputs, bit for bit,
    as the checked path; near-plain calls take the checked path and agree too."""
    L = shape[-1]
    x = data(shape, dtype)
    w, b = (v.astype(dtype) if v is not None else None for v in params(L, affine))
    taken, spy = spy_plain(monkeypatch, "_row_forward_plain")
    calls = [lambda x=x, w=w, b=b: NB.layer_norm_forward(x, (L,), w, b, EPS),
             lambda x=x, w=w: NB.rms_norm_forward(x, (L,), w),
             lambda x=x, w=w: NB.rms_norm_forward(x, (L,), w, EPS)]
    fast = [f() for f in calls]
    assert taken == [True] * 3
    monkeypatch.setattr(NB, "_row_forward_plain", lambda *args: None)
    for f, got in zip(calls, fast):
        assert_same(got, f())
    monkeypatch.setattr(NB, "_row_forward_plain", spy)
    taken.clear()
    ro = read_only(x)
    strided = np.repeat(x, 2, axis=-1)[..., ::2]                    # same values, not contiguous
    near = [lambda: NB.layer_norm_forward(x, (np.int64(L),), w, b, EPS),      # numpy int
            lambda: NB.layer_norm_forward(x, L, w, b, EPS),                   # int, not tuple
            lambda: NB.layer_norm_forward(x, (L,), w, b, np.float64(EPS)),    # numpy float
            lambda: NB.layer_norm_forward(ro, (L,), w, b, EPS),               # read-only x
            lambda: NB.layer_norm_forward(strided, (L,), w, b, EPS)]
    if affine:
        other = other_typed(w, b)
        near += [lambda: NB.layer_norm_forward(x, (L,), np.repeat(w, 2)[::2], b, EPS),  # strided
                 lambda: NB.layer_norm_forward(x, (L,), *other, EPS)]    # cast exactly to x's
    for f in near:
        y, mean, rstd = f()
        assert np.array_equal(y, fast[0][0]) and np.array_equal(rstd, fast[0][2])
    assert not any(taken)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape, cl", [((8, 64), False), ((3, 5, 7), False), ((2, 3, 40), False),
                                       ((2, 4, 3, 5), True), ((1, 512), False), ((1, 1), False)],
                         ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_small_given_statistics_calls_equal_the_parallel_kernels(monkeypatch, dtype, shape, cl,
                                                                 affine):
    """batch_norm_forward with given statistics on a serial-size input is one kernel call
    (bn_given_small; plain calls skip the conversions too, see _bn_plain): same outputs,
    bit for bit, as the parallel kernels' APPLY passes (column and row planes); near-plain calls
    take the checked path and agree; a negative var raises on both paths."""
    x = data(shape, dtype)
    C = shape[-1] if cl else shape[1]
    w, b = (v.astype(dtype) if v is not None else None for v in params(C, affine))
    rng = np.random.default_rng(5)
    mean, var = rng.standard_normal(C).astype(dtype), (rng.random(C) + 0.1).astype(dtype)
    taken, spy = spy_plain(monkeypatch, "_bn_plain")
    fast = NB.batch_norm_forward(x, w, b, EPS, channels_last=cl, mean=mean, var=var)
    assert taken == [True]
    monkeypatch.setattr(NB, "SERIAL_BELOW", 0)                 # the parallel kernels
    want = NB.batch_norm_forward(x, w, b, EPS, channels_last=cl, mean=mean, var=var)
    monkeypatch.undo()
    assert taken == [True, False]
    assert_same(fast, want)
    monkeypatch.setattr(NB, "_bn_plain", spy)
    taken.clear()
    ro = read_only(x)
    strided = np.repeat(x, 2, axis=-1)[..., ::2]                 # same values, not contiguous
    kw = dict(channels_last=cl, mean=mean, var=var)
    near = [lambda: NB.batch_norm_forward(x, w, b, np.float64(EPS), **kw),   # numpy float
            lambda: NB.batch_norm_forward(ro, w, b, EPS, **kw),              # read-only x
            lambda: NB.batch_norm_forward(torch.from_numpy(x), w, b, EPS, **kw),
            lambda: NB.batch_norm_forward(x, w, b, EPS, channels_last=int(cl), mean=mean, var=var),
            lambda: NB.batch_norm_forward(x, w, b, EPS, channels_last=cl, mean=list(mean),
                                          var=np.repeat(var, 2)[::2])]       # list, strided
    if not cl and shape[-1] > 1:
        near.append(lambda: NB.batch_norm_forward(strided, w, b, EPS, **kw))
    if affine:                     # another dtype: the checked path casts it to float64
        other = other_typed(w, b)
        near.append(lambda: NB.batch_norm_forward(x, *other, EPS, **kw))
    for f in near:
        got = f()
        for g, e in zip(got, fast, strict=True):
            assert np.array_equal(np.asarray(g), e)
    assert not any(taken)
    taken.clear()
    bad = -var
    for v in (bad, list(bad)):                                   # plain, and checked
        with pytest.raises(ValueError, match=r"var has a negative entry.*var\[0\]"):
            NB.batch_norm_forward(x, w, b, EPS, channels_last=cl, mean=mean, var=v)
    assert taken == ["raised", False]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape, cl", [((8, 64), False), ((8, 64, 4, 4), False),
                                       ((2, 3, 40), False), ((2, 4, 3, 5), True)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_plain_batch_norm_training_calls_equal_the_checked_path(monkeypatch, dtype, shape, cl,
                                                                affine):
    """batch_norm_forward in training of a plain call (see _bn_plain) skips the conversions:
    same outputs, bit for bit, as the checked path; near-plain calls take the checked path."""
    x = data(shape, dtype)
    C = shape[-1] if cl else shape[1]
    w, b = (v.astype(dtype) if v is not None else None for v in params(C, affine))
    taken, spy = spy_plain(monkeypatch, "_bn_plain")
    fast = NB.batch_norm_forward(x, w, b, EPS, channels_last=cl)
    monkeypatch.setattr(NB, "_bn_plain", lambda *args: None)
    assert_same(fast, NB.batch_norm_forward(x, w, b, EPS, channels_last=cl))
    assert taken == [True]
    monkeypatch.setattr(NB, "_bn_plain", spy)
    taken.clear()
    ro = read_only(x)
    near = [lambda: NB.batch_norm_forward(x, w, b, np.float64(EPS), channels_last=cl),
            lambda: NB.batch_norm_forward(ro, w, b, EPS, channels_last=cl),
            lambda: NB.batch_norm_forward(x, w, b, EPS, channels_last=int(cl))]
    if affine:
        other = other_typed(w, b)
        near.append(lambda: NB.batch_norm_forward(x, *other, EPS, channels_last=cl))
    for f in near:
        assert_same(f(), fast)
    assert not any(taken)
    one = (1,) * (x.ndim - 1) + (C,) if cl else (1, C) + (1,) * (x.ndim - 2)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        NB.batch_norm_forward(np.ones(one, dtype), w, b, EPS, channels_last=cl)
    with pytest.raises(ValueError, match="both mean and var"):
        NB.batch_norm_forward(x, w, b, EPS, channels_last=cl, mean=np.zeros(C, dtype))


# --- GroupNorm / InstanceNorm ------------------------------------------------------------------

GN_CASES = [((2, 6, 5), 3), ((2, 6, 5), 1), ((2, 6, 5), 6), ((3, 4, 7, 13), 2),
            ((9, 4, 3, 5), 2),             # >= 8 samples: one task per sample (channels-last)
            ((2, 8), 4), ((1, 6, 1023), 3), ((2, 4, 2, 3, 5), 4),
            ((2, 1040, 3), 8)]             # channels-last groups over more than one tile


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NC", "CL"])
@pytest.mark.parametrize("shape,G", GN_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_group_norm_matches_reference(dtype, shape, G, channels_last, affine):
    x = data(shape, dtype)
    dy = data(shape, dtype, seed=5, offset=0.0, scale=1.0)
    w, b = params(shape[1], affine)
    if channels_last:
        x, dy = to_cl(x), to_cl(dy)
    y, mean, rstd = NB.group_norm_forward(x, G, w, b, EPS, channels_last=channels_last)
    yr, c = R.group_norm_forward(x, G, w, b, eps=EPS, channels_last=channels_last)
    assert mean.shape == (shape[0], G) and mean.dtype == dtype
    close(y, yr, dtype, "y")
    close(mean, c["mean"], dtype, "mean")
    close(rstd, 1 / np.sqrt(c["var"] + EPS), dtype, "rstd")
    dx, dw, db = NB.group_norm_backward(dy, x, G, w, mean, rstd, channels_last=channels_last)
    gr = R.group_norm_backward(dy, c)
    close(dx, gr[0], dtype, "dx")
    if affine:
        close(dw, gr[1], dtype, "dweight")
        close(db, gr[2], dtype, "dbias")
    else:
        assert dw is None and db is None


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NC", "CL"])
@pytest.mark.parametrize("shape,G", [((8, 64, 4, 4), 32), ((2, 6, 5), 3), ((9, 4, 3, 5), 2),
                                     ((2, 8), 4)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_plain_group_norm_calls_equal_the_checked_path(monkeypatch, dtype, shape, G,
                                                       channels_last, affine):
    """group_norm_forward of a plain call (ndarrays of x's dtype, int groups, float eps; see
    _group_norm_plain) skips the conversions: same outputs, bit for bit, as the checked path;
    near-plain calls take the checked path and agree too."""
    x = data(shape, dtype)
    if channels_last:
        x = to_cl(x)
    w, b = (v.astype(dtype) if v is not None else None for v in params(shape[1], affine))
    taken, spy = spy_plain(monkeypatch, "_group_norm_plain")
    kw = dict(channels_last=channels_last)
    fast = NB.group_norm_forward(x, G, w, b, EPS, **kw)
    assert taken == [True]
    monkeypatch.setattr(NB, "_group_norm_plain", lambda *args: None)
    assert_same(fast, NB.group_norm_forward(x, G, w, b, EPS, **kw))
    monkeypatch.setattr(NB, "_group_norm_plain", spy)
    taken.clear()
    ro = read_only(x)
    near = [lambda: NB.group_norm_forward(x, np.int64(G), w, b, EPS, **kw),      # numpy int
            lambda: NB.group_norm_forward(x, G, w, b, np.float64(EPS), **kw),    # numpy float
            lambda: NB.group_norm_forward(ro, G, w, b, EPS, **kw),               # read-only x
            lambda: NB.group_norm_forward(x, G, w, b, EPS, channels_last=int(channels_last))]
    if affine:
        other = other_typed(w, b)
        near += [lambda: NB.group_norm_forward(x, G, np.repeat(w, 2)[::2], b, EPS, **kw),
                 lambda: NB.group_norm_forward(x, G, *other, EPS, **kw)]   # cast exactly to x's
    for f in near:
        for g, e in zip(f(), fast, strict=True):
            assert np.array_equal(g, e)
    assert not any(taken)
    taken.clear()
    with pytest.raises(ValueError, match="num_groups=5 does not divide"):
        NB.group_norm_forward(x, 5, w, b, EPS, **kw)
    assert taken == [False]


IN_SHAPES = [(2, 3, 7), (9, 5, 3, 4), (2, 3, 2, 3, 5), (1, 7, 1023), (3, 1, 13)]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NC", "CL"])
@pytest.mark.parametrize("shape", IN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_instance_norm_matches_reference(dtype, shape, channels_last, affine):
    x = data(shape, dtype)
    dy = data(shape, dtype, seed=5, offset=0.0, scale=1.0)
    w, b = params(shape[1], affine)
    if channels_last:
        x, dy = to_cl(x), to_cl(dy)
    y, mean, var, rstd = NB.instance_norm_forward(x, w, b, EPS, channels_last=channels_last)
    yr, c = R.instance_norm_forward(x, w, b, eps=EPS, channels_last=channels_last)
    assert mean.shape == shape[:2] and var.dtype == dtype
    close(y, yr, dtype, "y")
    close(mean, c["mean"], dtype, "mean")
    close(var, c["var"], dtype, "var")
    close(rstd, 1 / np.sqrt(c["var"] + EPS), dtype, "rstd")
    dx, dw, db = NB.instance_norm_backward(dy, x, w, mean, rstd, channels_last=channels_last)
    gr = R.instance_norm_backward(dy, c)
    close(dx, gr[0], dtype, "dx")
    if affine:
        close(dw, gr[1], dtype, "dweight")
        close(db, gr[2], dtype, "dbias")


@pytest.mark.parametrize("tile,wide", [(4, 256), (1024, 16)], ids=["tiles", "wide-rows"])
def test_small_work_partitions_match_reference(monkeypatch, tile, wide):
    """Many row chunks, column tiles or wide rows, many row tasks, on small inputs (merges)."""
    monkeypatch.setattr(NB, "COL_CHUNK_BYTES", 64)
    monkeypatch.setattr(NB, "COL_TILE", tile)
    monkeypatch.setattr(NB, "COL_WIDE", wide)
    monkeypatch.setattr(NB, "ROW_TASKS", 3)
    monkeypatch.setattr(NB, "ROW_PARTIAL_ELEMS", 8)
    for dt in DTYPES:
        for cl in (False, True):
            x, dy, w, b, _ = _bn_case((11, 6, 5), dt, cl, True, True)
            y, m, v, r = NB.batch_norm_forward(x, w, b, EPS, channels_last=cl)
            yr, c = R.batch_norm_forward(x, w, b, eps=EPS, channels_last=cl)
            close(y, yr, dt, "bn y")
            close(v, c["var"], dt, "bn var")
            g = NB.batch_norm_backward(dy, x, w, m, r, channels_last=cl)
            for a, e in zip(g, R.batch_norm_backward(dy, c)):
                close(a, e, dt, "bn grads")
            y, m, r = NB.group_norm_forward(x, 3, w, b, EPS, channels_last=cl)
            yr, c = R.group_norm_forward(x, 3, w, b, eps=EPS, channels_last=cl)
            close(y, yr, dt, "gn y")
            g = NB.group_norm_backward(dy, x, 3, w, m, r, channels_last=cl)
            for a, e in zip(g, R.group_norm_backward(dy, c)):
                close(a, e, dt, "gn grads")
        x = data((10, 7), dt)
        w, b = params(None, True, shape=(7,))
        y, m, r = NB.layer_norm_forward(x, 7, w, b, EPS)
        yr, c = R.layer_norm_forward(x, 7, w, b, eps=EPS)
        close(y, yr, dt, "ln y")
        for a, e in zip(NB.layer_norm_backward(x, x, 7, w, m, r), R.layer_norm_backward(x, c)):
            close(a, e, dt, "ln grads")


# --- numerical properties ----------------------------------------------------------------------

def test_results_do_not_depend_on_thread_count():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one numba thread only")
    x, dy, w, b, _ = _bn_case((64, 40, 9), F32, True, True, True)
    xr = data((300, 257), F32)

    def run():
        y, m, v, r = NB.batch_norm_forward(x, w, b, EPS, channels_last=True)
        g = NB.batch_norm_backward(dy, x, w, m, r, channels_last=True)
        yl, ml, rl = NB.layer_norm_forward(xr, 257, np.ones(257), np.zeros(257), EPS)
        gl = NB.layer_norm_backward(xr, xr, 257, np.ones(257), ml, rl)
        return (y, m, v) + g + (yl,) + gl

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run()
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = run()
    finally:
        numba.set_num_threads(before)
    for a, b_ in zip(one, two):
        np.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize("dt", [F32, F64])
def test_serial_twins_equal_the_parallel_kernels(monkeypatch, dt):
    """Inputs under SERIAL_BELOW run the serial twins: the same tasks, so bit-identical results.
    Every kernel of both sets runs here (row and column patterns, per-slab and chunked column
    schedules, training and given statistics, forward and backward)."""
    rng = np.random.default_rng(3)
    cases = [((64, 40, 9), True), ((5, 7, 40), False), ((3, 6, 5, 7), False), ((10, 6, 5, 7), True),
             ((300, 33), False)]
    ran = set()
    for ks in (NB._k.SERIAL_KERNELS, NB._k.PARALLEL_KERNELS):
        for name in NB._k.KERNEL_NAMES:
            def spy(*args, real=getattr(ks, name), tag=(ks.kind, name)):
                ran.add(tag)
                return real(*args)

            monkeypatch.setattr(ks, name, spy)

    def run():
        out = []
        for shape, cl in cases:
            x = (rng.standard_normal(shape) * 3 + 5).astype(dt)
            dy = rng.standard_normal(shape).astype(dt)
            C = shape[-1] if cl else shape[1]
            w, b = rng.standard_normal(C).astype(dt), rng.standard_normal(C).astype(dt)
            y, m, v, r = NB.batch_norm_forward(x, w, b, EPS, channels_last=cl)
            out += [y, m, v, r, *NB.batch_norm_backward(dy, x, w, m, r, channels_last=cl)]
            out += [NB.batch_norm_forward(x, w, b, EPS, channels_last=cl, mean=m, var=v)[0],
                    *NB.batch_norm_backward(dy, x, w, m, r, channels_last=cl, training=False)]
            if len(shape) >= 3:
                y, m, r = NB.group_norm_forward(x, 1, w, b, EPS, channels_last=cl)
                out += [y, m, r, *NB.group_norm_backward(dy, x, 1, w, m, r, channels_last=cl)]
                y, m, v, r = NB.instance_norm_forward(x, w, b, EPS, channels_last=cl)
                out += [y, m, r, *NB.instance_norm_backward(dy, x, w, m, r, channels_last=cl)]
            L = shape[-1]
            wl, bl = rng.standard_normal(L).astype(dt), rng.standard_normal(L).astype(dt)
            y, m, r = NB.layer_norm_forward(x, L, wl, bl, EPS)
            out += [y, m, r, *NB.layer_norm_backward(dy, x, L, wl, m, r)]
            y, r = NB.rms_norm_forward(x, L, wl, EPS)
            out += [y, r, *NB.rms_norm_backward(dy, x, L, wl, r)]
        return out

    state = rng.bit_generator.state
    monkeypatch.setattr(NB, "SERIAL_BELOW", 1 << 62)
    serial = run()
    rng.bit_generator.state = state
    monkeypatch.setattr(NB, "SERIAL_BELOW", 0)
    parallel = run()
    want = {(kind, n) for kind in ("serial", "parallel") for n in NB._k.KERNEL_NAMES}
    assert ran == want, sorted(want - ran)           # every kernel of both sets ran
    for a, b_ in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a, b_)


def _torch_err_bn(x, w, b, dy):
    """Errors of torch's CPU batch norm (y, mean, var, dx) against the float64 reference."""
    xt = torch.from_numpy(x).requires_grad_(True)
    y, mean, invstd = torch.ops.aten.native_batch_norm(xt, torch.from_numpy(w), torch.from_numpy(b),
                                                       None, None, True, 0.0, EPS)
    (dx,) = torch.autograd.grad(y, xt, torch.from_numpy(dy))
    return [t.detach().numpy() for t in (y, mean, 1 / invstd**2 - EPS, dx)]


def _err(a, e):
    return float(np.max(np.abs(np.asarray(a, np.float64) - e)))


@pytest.mark.parametrize("channels_last", [False, True], ids=["NC", "CL"])
def test_float32_large_offset_batch_norm_at_least_as_accurate_as_torch(channels_last):
    """Mean 1e4, std 1 in float32: one-pass E[x^2] - E[x]^2 would lose every digit."""
    shape = (16, 8, 16, 16)
    x = data(shape, F32, offset=1e4, scale=1.0)
    dy = data(shape, F32, seed=3, offset=0.0, scale=1.0)
    w, b = (np.linspace(0.5, 1.5, 8).astype(F32), np.linspace(-1, 1, 8).astype(F32))
    yr, c = R.batch_norm_forward(x, w, b, eps=EPS)
    gr = R.batch_norm_backward(dy, c)
    ref = [yr, c["mean"], c["var"], gr[0]]
    theirs = [_err(a, e) for a, e in zip(_torch_err_bn(x, w, b, dy), ref)]
    xx, dd = (to_cl(x), to_cl(dy)) if channels_last else (x, dy)
    y, m, v, r = NB.batch_norm_forward(xx, w, b, EPS, channels_last=channels_last)
    dx, _, _ = NB.batch_norm_backward(dd, xx, w, m, r, channels_last=channels_last)
    if channels_last:
        y, dx = np.moveaxis(y, -1, 1), np.moveaxis(dx, -1, 1)
    ours = [_err(a, e) for a, e in zip((y, m, v, dx), ref)]
    # floors: one float32 rounding of the value itself (the mean is ~1e4, so 0.5 ulp = 5e-4)
    floors = [1e-6 * 8, 0.5 * np.spacing(F32(1e4)), 1e-6, 1e-5]
    for name, o, t, f in zip(("y", "mean", "var", "dx"), ours, theirs, floors):
        assert o <= max(t, f), f"{name}: ours {o:.3g} vs torch {t:.3g}"
    assert ours[0] < 1e-5 and ours[2] < 1e-5          # float32 rounding, not cancellation


def test_float32_large_offset_row_and_group_norms_at_least_as_accurate_as_torch():
    x = data((4, 9000), F32, offset=1e4, scale=1.0)      # rows of several cache blocks
    dy = data((4, 9000), F32, seed=3, offset=0.0, scale=1.0)
    yr, c = R.layer_norm_forward(x, 9000, eps=EPS)
    dxr = R.layer_norm_backward(dy, c)[0]
    xt = torch.from_numpy(x).requires_grad_(True)
    yt, mt, rt = torch.ops.aten.native_layer_norm(xt, (9000,), None, None, EPS)
    (dxt,) = torch.autograd.grad(yt, xt, torch.from_numpy(dy))
    y, m, r = NB.layer_norm_forward(x, 9000, None, None, EPS)
    dx = NB.layer_norm_backward(dy, x, 9000, None, m, r)[0]
    assert _err(y, yr) <= max(_err(yt.detach().numpy(), yr), 1e-5)
    assert _err(r, c["rstd"].ravel()) <= max(_err(rt.detach().numpy().ravel(), c["rstd"].ravel()), 1e-6)
    assert _err(dx, dxr) <= max(_err(dxt.numpy(), dxr), 1e-5)

    x = data((4, 8, 12, 12), F32, offset=1e4, scale=1.0)
    yr, c = R.group_norm_forward(x, 2, eps=EPS)
    yt = torch.nn.functional.group_norm(torch.from_numpy(x), 2, None, None, EPS).numpy()
    for cl in (False, True):
        xx = to_cl(x) if cl else x
        y, m, r = NB.group_norm_forward(xx, 2, None, None, EPS, channels_last=cl)
        y = np.moveaxis(y, -1, 1) if cl else y
        assert _err(y, yr) <= max(_err(yt, yr), 1e-5)


@pytest.mark.parametrize("width, far, inf", [(8, [3], [5]), (1100, [3, 600, 1090], [5, 1030])],
                         ids=["narrow", "strips"])
def test_a_shift_far_out_or_non_finite_falls_back_to_two_pass(width, far, inf):
    """The one-sweep moments sum about the mean of a block's first values (``_numba_kernels``):
    outliers there, or a non-finite value, send the block (column) to the two-pass, so the
    statistics stay as accurate as the reference's and non-finite values give its results.
    1100 columns: the column kernels sweep such chunks in strips of ``SWEEP_LANES_MAX`` lanes
    (512, 512, 76), each redoing its own columns."""
    n = 4096 if width < 100 else 512
    x = data((n, width), F64, offset=1.0, scale=1e-3)
    x[:4, far] = 1e8                   # the shift of these columns (and rows below) lies far out
    x[0, inf] = np.inf                 # a non-finite shift: mean inf, var NaN as two-pass gives
    _, c = R.batch_norm_forward(x, eps=EPS)
    for ks in (NB._k.SERIAL_KERNELS, NB._k.PARALLEL_KERNELS):
        y, m, v, r = NB.batch_norm_forward.__wrapped__(ks, x, None, None, EPS)
        np.testing.assert_array_equal(np.isinf(m), np.isinf(c["mean"].ravel()))
        np.testing.assert_array_equal(np.isnan(v), np.isnan(c["var"].ravel()))
        ok = np.isfinite(c["var"].ravel())
        np.testing.assert_allclose(m[ok], c["mean"].ravel()[ok], rtol=1e-14)
        np.testing.assert_allclose(v[ok], c["var"].ravel()[ok], rtol=1e-13)
    rows = np.ascontiguousarray(x.T)                   # the same values as rows (row kernels)
    _, c = R.layer_norm_forward(rows, n, eps=EPS)
    for ks in (NB._k.SERIAL_KERNELS, NB._k.PARALLEL_KERNELS):
        y, m, r = NB.layer_norm_forward.__wrapped__(ks, rows, n, None, None, EPS)
        assert np.isinf(m[inf]).all() and np.isnan(r[inf]).all()
        ok = ~np.isin(np.arange(width), inf)
        np.testing.assert_allclose(m[ok], c["mean"].ravel()[ok], rtol=1e-14)
        np.testing.assert_allclose(r[ok], c["rstd"].ravel()[ok], rtol=1e-13)


def test_backward_refines_a_rounded_mean_in_training_only():
    """The saved mean is only a pivot in training: dx is exact even when it is off by 0.01."""
    x, dy, w, b, _ = _bn_case((6, 3, 5, 7), F64, False, True, True)
    y, m, v, r = NB.batch_norm_forward(x, w, b, EPS)
    exact = NB.batch_norm_backward(dy, x, w, m, r)
    shifted = NB.batch_norm_backward(dy, x, w, m + 0.01, r)
    for a, e in zip(shifted, exact):
        close(a, e, F64, "training grads with a shifted mean")
    # inference: the given mean is a constant of the model, used as given
    _, dw_given, _ = NB.batch_norm_backward(dy, x, w, m + 0.01, r, training=False)
    _, dw_exact, _ = NB.batch_norm_backward(dy, x, w, m, r, training=False)
    assert not np.allclose(dw_given, dw_exact)
    xl = data((5, 33), F64)
    yl, ml, rl = NB.layer_norm_forward(xl, 33, None, None, EPS)
    close(NB.layer_norm_backward(xl, xl, 33, None, ml + 0.01, rl)[0],
          NB.layer_norm_backward(xl, xl, 33, None, ml, rl)[0], F64, "ln dx")


@pytest.mark.parametrize("channels_last", [False, True], ids=["NC", "CL"])
def test_nan_propagates_to_its_own_statistic_only(channels_last):
    """No fast-math nnan: a NaN poisons its channel / row / group, nothing else."""
    x = data((4, 3, 6, 5), F32)
    x[1, 1, 2, 3] = np.nan
    xx = to_cl(x) if channels_last else x
    axis = -1 if channels_last else 1
    y, m, v, r = NB.batch_norm_forward(xx, None, None, EPS, channels_last=channels_last)
    assert np.isnan(m).tolist() == [False, True, False]
    assert np.isnan(np.moveaxis(y, axis, 0)).any(axis=(1, 2, 3)).tolist() == [False, True, False]
    y, m, v, r = NB.instance_norm_forward(xx, None, None, EPS, channels_last=channels_last)
    assert np.argwhere(np.isnan(m)).tolist() == [[1, 1]]
    y, m, r = NB.group_norm_forward(xx, 3, None, None, EPS, channels_last=channels_last)
    assert np.argwhere(np.isnan(m)).tolist() == [[1, 1]]
    y, m, r = NB.layer_norm_forward(x, (6, 5), None, None, EPS)
    assert np.argwhere(np.isnan(m)).tolist() == [[1, 1]]


@pytest.mark.parametrize("ks", ["serial", "parallel"])
def test_an_infinity_gives_the_references_statistics_across_merged_blocks(ks):
    """Blocks of a long row and chunks of a column merge with Chan's formula; an infinite value
    in either part must give the reference's mean (inf; NaN for +inf and -inf together) and a
    NaN variance, not the NaN of ``inf + (finite - inf) * f``."""
    ks = NB._k.SERIAL_KERNELS if ks == "serial" else NB._k.PARALLEL_KERNELS
    inf = np.inf
    rows = np.ones((4, 9000))                       # rows of three BLOCKs
    rows[0, 5000], rows[1, 10], rows[2, 10], rows[2, 8999] = inf, -inf, inf, -inf
    _, m, r = NB.layer_norm_forward.__wrapped__(ks, rows, 9000, None, None, EPS)
    assert m.tolist()[:2] == [inf, -inf] and np.isnan(m[2]) and m[3] == 1.0
    assert np.isnan(r[:3]).all() and np.isfinite(r[3])
    _, m, r = NB.group_norm_forward.__wrapped__(ks, rows.reshape(4, 2, 4500), 2, None, None, EPS)
    assert np.array_equal(m.ravel(), [1, inf, -inf, 1, inf, -inf, 1, 1], equal_nan=True)
    cols = np.ones((600, 1100))                     # chunks of rows, tiles of columns
    cols[0, 5], cols[500, 700], cols[0, 9], cols[500, 9] = inf, -inf, inf, -inf
    _, m, v, _ = NB.batch_norm_forward.__wrapped__(ks, cols, None, None, EPS)
    _, c = R.batch_norm_forward(cols, eps=EPS)
    np.testing.assert_array_equal(m, c["mean"].ravel())
    np.testing.assert_array_equal(v, c["var"].ravel())
    assert m[5] == inf and m[700] == -inf and np.isnan(m[9]) and np.isnan(v[[5, 700, 9]]).all()


def test_empty_batches_give_empty_outputs():
    x = np.zeros((0, 3, 4), F32)
    y, m, r = NB.layer_norm_forward(x, 4, np.ones(4), None, EPS)
    assert y.shape == x.shape and m.shape == (0, 3)
    dx, dw, db = NB.layer_norm_backward(x, x, 4, np.ones(4), m, r)
    assert dx.shape == x.shape and dw.tolist() == [0.0] * 4
    assert NB.group_norm_forward(x, 3, None, None, EPS)[1].shape == (0, 3)
    assert NB.instance_norm_forward(x, None, None, EPS)[1].shape == (0, 3)
    assert NB.batch_norm_forward(x, None, None, EPS, mean=np.zeros(3), var=np.ones(3))[0].shape == x.shape


# --- arrays in, arrays out ---------------------------------------------------------------------

def test_numpy_in_numpy_out_and_outputs_are_fresh():
    x = data((4, 3, 5), F32)
    y, m, v, r = NB.batch_norm_forward(x, None, None, EPS)
    assert isinstance(y, np.ndarray) and not np.shares_memory(y, x)
    assert _arrays.layout(x, False)[0] is x            # contiguous input: used as is


def _spy_on_kernel(monkeypatch, name, spy):
    """Call ``spy(*args)`` before kernel ``name`` runs, in both kernel sets (serial twins for
    small inputs, parallel kernels for large ones)."""
    for ks in (NB._k.SERIAL_KERNELS, NB._k.PARALLEL_KERNELS):
        real = getattr(ks, name)

        def wrapped(*args, real=real):
            spy(*args)
            return real(*args)

        monkeypatch.setattr(ks, name, wrapped)


def test_torch_tensors_in_torch_tensors_out_without_copying_the_input(monkeypatch):
    xt = torch.from_numpy(data((4, 3, 6, 5), F32)).requires_grad_(True)
    wt = torch.ones(3, requires_grad=True)
    seen = []
    _spy_on_kernel(monkeypatch, "row_seg_forward", lambda x, *args: seen.append(
        x.__array_interface__["data"][0]))
    y, m, v, r = NB.instance_norm_forward(xt, wt, None, EPS)
    assert seen and all(p == xt.data_ptr() for p in seen)
    assert all(isinstance(t, torch.Tensor) for t in (y, m, v, r))
    assert y.dtype == torch.float32 and not y.requires_grad
    yn = NB.instance_norm_forward(xt.detach().numpy(), np.ones(3), None, EPS)[0]
    np.testing.assert_array_equal(y.numpy(), yn)
    assert _arrays.to_numpy(xt, "x").__array_interface__["data"][0] == xt.data_ptr()


def test_channels_last_memory_runs_channels_last_kernels_without_a_copy(monkeypatch):
    """A logical (N, C, H, W) tensor stored channels-last is not copied to NCHW."""
    x = torch.from_numpy(data((4, 3, 6, 5), F32)).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    seen = []
    _spy_on_kernel(monkeypatch, "col_forward_chunks", lambda xf, *args: seen.append(
        xf.__array_interface__["data"][0]))
    y, m, v, r = NB.batch_norm_forward(x, None, None, EPS)   # declared channels-first
    assert seen == [x.data_ptr()]
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    yr, c = R.batch_norm_forward(x.numpy(), eps=EPS)
    close(y.numpy(), yr, F32, "y")
    dy = torch.ones_like(x)
    dx, _, _ = NB.batch_norm_backward(dy, x, None, m, r)
    assert dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_non_contiguous_input_gives_the_contiguous_answer(dtype):
    base = data((5, 6, 8, 9), dtype)
    x = base[:, ::2, :, 1::2]                             # strided in every sense
    assert not x.flags.c_contiguous and not np.moveaxis(x, 1, -1).flags.c_contiguous
    xc = np.ascontiguousarray(x)
    for fn in (lambda a: NB.batch_norm_forward(a, None, None, EPS),
               lambda a: NB.group_norm_forward(a, 3, None, None, EPS),
               lambda a: NB.instance_norm_forward(a, None, None, EPS),
               lambda a: NB.layer_norm_forward(a, (8, 4), None, None, EPS)):
        for a, e in zip(fn(x), fn(xc)):
            np.testing.assert_array_equal(a, e)
    xf = np.asfortranarray(data((7, 5), dtype))
    np.testing.assert_array_equal(NB.layer_norm_forward(xf, 5, None, None, EPS)[0],
                                  NB.layer_norm_forward(np.ascontiguousarray(xf), 5, None, None, EPS)[0])


@pytest.mark.parametrize("bad", [np.float16, np.int32, np.complex64])
def test_unsupported_dtype_raises_type_error_naming_it_and_the_fix(bad):
    x = np.ones((4, 3, 5), dtype=bad)
    with pytest.raises(TypeError, match=np.dtype(bad).name) as e:
        NB.batch_norm_forward(x, None, None, EPS)
    assert "numpy" in str(e.value) and "float32" in str(e.value)
    with pytest.raises(TypeError, match="bfloat16"):
        NB.layer_norm_forward(torch.ones(2, 4, dtype=torch.bfloat16), 4, None, None, EPS)


def test_bad_arguments_raise_clear_errors():
    x = data((4, 3, 5), F32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        NB.batch_norm_forward(x[:1, :, :1], None, None, EPS)
    with pytest.raises(ValueError, match="both mean and var"):
        NB.batch_norm_forward(x, None, None, EPS, mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        NB.batch_norm_forward(x, np.ones(4), None, EPS)
    with pytest.raises(ValueError, match="negative"):
        NB.batch_norm_forward(x, None, None, EPS, mean=np.zeros(3), var=-np.ones(3))
    with pytest.raises(ValueError, match="eps"):
        NB.layer_norm_forward(x, 5, None, None, 0.0)
    with pytest.raises(ValueError, match="num_groups=2 does not divide"):
        NB.group_norm_forward(x, 2, None, None, EPS)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        NB.instance_norm_forward(x[:, :, :1], None, None, EPS)
    y, m, v, r = NB.batch_norm_forward(x, None, None, EPS)
    with pytest.raises(ValueError, match="shape of x"):
        NB.batch_norm_backward(x[:2], x, None, m, r)
    with pytest.raises(ValueError, match="rstd must have 3 values"):
        NB.batch_norm_backward(x, x, None, m, r[:2])
    with pytest.raises(ValueError, match="trailing dimensions"):
        NB.layer_norm_forward(x, 4, None, None, EPS)


# --- the numpy backend -------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True], ids=["NC", "CL"])
@pytest.mark.parametrize("dtype", [np.float16, F32, F64], ids=["f16", "f32", "f64"])
def test_numpy_backend_matches_the_numba_backend(dtype, channels_last):
    ref_dt = F64 if dtype == np.float16 else dtype
    x, dy, w, b, _ = _bn_case((5, 4, 3, 6), dtype, channels_last, True, True)
    outs = []
    for be in (NP, NB):
        xx, dd = (x, dy) if be is NP else (x.astype(ref_dt), dy.astype(ref_dt))
        y, m, v, r = be.batch_norm_forward(xx, w, b, EPS, channels_last=channels_last)
        g = be.batch_norm_backward(dd, xx, w, m, r, channels_last=channels_last)
        y2, m2, r2 = be.group_norm_forward(xx, 2, w, b, EPS, channels_last=channels_last)
        g2 = be.group_norm_backward(dd, xx, 2, w, m2, r2, channels_last=channels_last)
        y3, m3, v3, r3 = be.instance_norm_forward(xx, w, b, EPS, channels_last=channels_last)
        g3 = be.instance_norm_backward(dd, xx, w, m3, r3, channels_last=channels_last)
        ns = xx.shape[-2:]
        wl, bl = params(None, True, shape=ns)
        y4, m4, r4 = be.layer_norm_forward(xx, ns, wl, bl, EPS)
        g4 = be.layer_norm_backward(dd, xx, ns, wl, m4, r4)
        y5, r5 = be.rms_norm_forward(xx, ns, wl, None if dtype != np.float16 else EPS)
        g5 = be.rms_norm_backward(dd, xx, ns, wl, r5)
        outs.append((y, m, v, r) + g + (y2, m2, r2) + g2 + (y3, m3, v3, r3) + g3
                    + (y4, m4, r4) + g4 + (y5, r5) + g5)
    for a, e in zip(*outs):
        assert a.dtype == dtype
        if dtype == np.float16:
            np.testing.assert_allclose(a.astype(F64), e, rtol=2e-2, atol=2e-2 * max(1, np.abs(e).max()))
        else:
            close(a, e, dtype)


def test_numpy_backend_accepts_torch_tensors():
    be = get_backend("numpy")
    xt = torch.from_numpy(data((3, 8), F32))
    y, m, r = be.layer_norm_forward(xt, 8, None, None, EPS)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), NB.layer_norm_forward(xt.numpy(), 8, None, None, EPS)[0],
                               atol=1e-5)


# --- the registry ------------------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(kernels, "_CHOSEN", {})    # get_backend's memo: these tests edit the registry
    return monkeypatch


OPTIONAL_BACKENDS = {"triton"}      # the gpu extra; tested in test_triton_kernels.py


def test_every_backend_has_the_whole_contract(clean_env):
    for name, info in kernels.available_backends().items():
        if name in OPTIONAL_BACKENDS and not info["available"]:
            continue
        assert info["available"], (name, info["reason"])
        impl = kernels._LOADED[name]
        for fn in kernels.FUNCTIONS:
            assert callable(getattr(impl, fn)), (name, fn)
        if kernels.available_backends("cpu")[name]["available"]:
            assert get_backend(name).name == name


def test_resolution_order_argument_then_env_then_device_default(clean_env):
    assert get_backend().name == "numba"                       # CPU default
    clean_env.setenv(kernels.ENV_VAR, "numpy")
    assert get_backend().name == "numpy"                       # env var beats the default
    assert get_backend("numba").name == "numba"                # argument beats the env var
    clean_env.setenv(kernels.ENV_VAR, "")
    assert get_backend().name == "numba"                       # empty = unset
    cuda_ok = kernels.available_backends("cuda").get("triton", {}).get("available", False)
    assert get_backend(device="cuda:0").name == ("triton" if cuda_ok else "numpy")  # else fallback
    assert get_backend(dtype=np.float16).name == "numpy"       # numba cannot take float16
    assert get_backend(dtype=torch.float32).name == "numba"


def test_explicit_choice_that_cannot_run_raises_naming_it_and_the_options(clean_env):
    with pytest.raises(ValueError, match=r"'triton'.*name argument.*valid choices here: 'numba', 'numpy'"):
        get_backend("triton")
    clean_env.setenv(kernels.ENV_VAR, "nope")
    with pytest.raises(ValueError, match=r"'nope'.*NORMLAB_BACKEND"):
        get_backend()
    clean_env.delenv(kernels.ENV_VAR)
    with pytest.raises(ValueError, match=r"'numba'.*'cuda'.*runs on cpu"):
        get_backend("numba", device="cuda")
    with pytest.raises(ValueError, match=r"'numba'.*float16"):
        get_backend("numba", dtype="float16")


def test_numba_that_fails_to_import_raises_if_chosen_and_falls_back_if_automatic(clean_env):
    def broken():
        raise ImportError("No module named 'numba'")

    entry = kernels._REGISTRY["numba"]
    clean_env.setitem(kernels._REGISTRY, "numba", replace(entry, loader=broken))
    clean_env.delitem(kernels._LOADED, "numba", raising=False)
    be = get_backend()
    assert be.name == "numpy"
    info = kernels.available_backends()
    assert not info["numba"]["available"] and "No module named" in info["numba"]["reason"]
    with pytest.raises(ValueError, match="No module named 'numba'"):
        get_backend("numba")
    clean_env.setenv(kernels.ENV_VAR, "numba")
    with pytest.raises(ValueError, match="NORMLAB_BACKEND"):
        get_backend()
    kernels._LOADED.pop("numba", None)                         # forget the failed load


def test_register_backend_adds_a_device_default(clean_env):
    clean_env.setattr(kernels, "_REGISTRY", dict(kernels._REGISTRY))
    clean_env.setattr(kernels, "_DEVICE_DEFAULTS", dict(kernels._DEVICE_DEFAULTS))
    clean_env.setattr(kernels, "_LOADED", dict(kernels._LOADED))
    kernels.register_backend("fake", lambda: NP, devices=("cuda",), default_for=("cuda",))
    assert get_backend(device="cuda").name == "fake"
    assert get_backend(device="cpu").name == "numba"


@pytest.mark.parametrize("shape", [(1, 3), (7, 5), (4097, 3), (300, 1100), (20000, 16)])
def test_column_moments_match_the_reference_and_agree_across_dtypes(shape):
    """``numba_cpu.column_moments`` (the estimators' statistics): the reference's float64 mean
    and M2 per column, the same bits for float32 data and its float64 copy, non-finite for a
    column holding NaN, and a read-only input is taken as it is."""
    x32 = data(shape, F32, offset=1e4)
    x64 = x32.astype(F64)
    n, m, m2 = summarize(x64, axes=(0,))
    for x in (x32, x64):
        mean, M2 = NB.column_moments(x)
        assert mean.dtype == M2.dtype == F64 and mean.shape == M2.shape == (shape[1],)
        np.testing.assert_allclose(mean, m, rtol=1e-15)
        np.testing.assert_allclose(M2, m2, rtol=1e-11, atol=1e-11 * shape[0])
    a, b = NB.column_moments(x32), NB.column_moments(x64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    ro = x64.copy()
    ro[0, -1] = np.nan
    ro.flags.writeable = False
    mean, M2 = NB.column_moments(ro)
    assert np.isnan(mean[-1]) and np.isnan(M2[-1]) and np.isfinite(mean[:-1]).all()
