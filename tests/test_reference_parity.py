"""normlab.reference against torch (forward and autograd, float64) and against itself.

* parity: every forward and every backward against torch.nn.functional in float64 (Batch
  Renorm against a hand-written torch formula with r and d detached), channels-last data going
  through torch as a permuted view;
* running statistics: ``running_stats_update`` against the update torch's F.batch_norm and
  nn.BatchNorm (momentum=None, cumulative average) make in place;
* equivalences between methods: LayerNorm over (C, *spatial) == GroupNorm(1),
  InstanceNorm == GroupNorm(C), Batch Renorm with r_max=1, d_max=0 == BatchNorm, and
  channels-last == channels-first transposed.

Tolerance: both sides evaluate the same float64 formula with different operation orders; on
these O(1) data the results differ by a few ulps times the reduction length (< 1e-13), so
1e-10 relative to the magnitude leaves a wide margin while any formula difference (eps
placement, biased vs unbiased variance, a missing term) shows up at >= 1e-6.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normlab import reference as R

RTOL = 1e-10
EPS = 1e-5
AFFINE = [(False, False), (True, False), (False, True), (True, True)]
AFFINE_IDS = ["noaffine", "w", "b", "wb"]


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def assert_close(actual, expected, name, rtol=RTOL):
    expected = np.asarray(expected)
    assert actual is not None, f"{name} is None"
    assert actual.dtype == np.float64, f"{name} has dtype {actual.dtype}"
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    err = float(np.max(np.abs(actual - expected), initial=0.0))
    assert err <= rtol * scale, f"{name}: max abs difference {err:.3e} (scale {scale:.3g})"


def _cl_shape(shape, cl):
    return (shape[0],) + tuple(shape[2:]) + (shape[1],) if cl else tuple(shape)


def _t(a, grad=False):
    return None if a is None else torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def _torch_cf(fn, x, cl):
    """Apply a channels-first torch function to (possibly channels-last) data via permutes."""
    if not cl:
        return fn(x)
    return fn(x.movedim(-1, 1)).movedim(1, -1)


def torch_run(torch_forward, x, w, b, dy):
    """y, dx, dweight, dbias of ``torch_forward(x, w, b)`` with autograd, as float64 NumPy arrays."""
    xt, wt, bt = _t(x, True), _t(w, True), _t(b, True)
    y = torch_forward(xt, wt, bt)
    (y * _t(dy)).sum().backward()
    grad = lambda t: None if t is None else t.grad.numpy()  # noqa: E731
    return y.detach().numpy(), grad(xt), grad(wt), grad(bt)


def assert_matches_torch(ref_forward, ref_backward, torch_forward, x, w, b, dy):
    y, cache = ref_forward()
    dx, dw, db = ref_backward(dy, cache)
    ty, tdx, tdw, tdb = torch_run(torch_forward, x, w, b, dy)
    assert_close(y, ty, "y")
    assert_close(dx, tdx, "dx")
    for name, ours, theirs in (("dweight", dw, tdw), ("dbias", db, tdb)):
        if theirs is None:
            assert ours is None, f"{name} should be None for an absent parameter"
        else:
            assert_close(ours, theirs, name)


# (channels-first shape) for methods with a channel axis: none and 1..3 spatial dims, odd sizes.
SHAPES = [(5, 3), (2, 7), (3, 1), (2, 3, 5), (3, 7, 1), (5, 1, 2), (2, 3, 5, 1), (3, 1, 2, 5),
          (2, 7, 1, 2), (2, 3, 1, 2, 5), (3, 1, 5, 2, 1), (2, 7, 2, 1, 2), (4, 16, 9, 11),
          (8, 5, 17)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
SPATIAL_SHAPES = [s for s in SHAPES if len(s) > 2 and int(np.prod(s[2:])) > 1]
SPATIAL_IDS = ["x".join(map(str, s)) for s in SPATIAL_SHAPES]


def _data(shape, cl, affine, *key):
    rng = _rng(shape, cl, affine, *key)
    C = shape[1]
    x = rng.normal(0.5, 2.0, size=_cl_shape(shape, cl))
    w = rng.normal(size=C) if affine[0] else None
    b = rng.normal(size=C) if affine[1] else None
    stats = dict(mean=rng.normal(size=C), var=rng.uniform(0.1, 3.0, size=C))
    return x, w, b, stats, rng.normal(size=x.shape)


layouts = pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
affines = pytest.mark.parametrize("affine", AFFINE, ids=AFFINE_IDS)


# ------------------------------------------------------------------------ forward + backward


@layouts
@affines
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_matches_torch(training, shape, affine, cl):
    x, w, b, stats, dy = _data(shape, cl, affine, "bn", training)
    given = {} if training else stats
    tm, tv = (None, None) if training else (_t(stats["mean"]), _t(stats["var"]))
    assert_matches_torch(
        lambda: R.batch_norm_forward(x, w, b, eps=EPS, channels_last=cl, **given),
        R.batch_norm_backward,
        lambda xt, wt, bt: _torch_cf(
            lambda v: F.batch_norm(v, tm, tv, wt, bt, training=training, eps=EPS), xt, cl),
        x, w, b, dy)


@layouts
@affines
@pytest.mark.parametrize("shape", SPATIAL_SHAPES, ids=SPATIAL_IDS)
@pytest.mark.parametrize("given", [False, True], ids=["batchstats", "givenstats"])
def test_instance_norm_matches_torch(given, shape, affine, cl):
    x, w, b, stats, dy = _data(shape, cl, affine, "in", given)
    kw = stats if given else {}
    tm, tv = (_t(stats["mean"]), _t(stats["var"])) if given else (None, None)
    assert_matches_torch(
        lambda: R.instance_norm_forward(x, w, b, eps=EPS, channels_last=cl, **kw),
        R.instance_norm_backward,
        lambda xt, wt, bt: _torch_cf(
            lambda v: F.instance_norm(v, tm, tv, wt, bt, use_input_stats=not given, eps=EPS),
            xt, cl),
        x, w, b, dy)


GROUP_CASES = [((2, 6, 5), 1), ((2, 6, 5), 2), ((2, 6, 5), 3), ((2, 6, 5), 6), ((5, 6), 2),
               ((2, 7), 7), ((3, 3, 2, 1), 3), ((2, 6, 1, 2, 2), 3), ((4, 32, 7, 5), 8)]


@layouts
@affines
@pytest.mark.parametrize("shape,groups", GROUP_CASES,
                         ids=[f"{'x'.join(map(str, s))}-G{g}" for s, g in GROUP_CASES])
def test_group_norm_matches_torch(shape, groups, affine, cl):
    x, w, b, _, dy = _data(shape, cl, affine, "gn", groups)

    def torch_gn(xt, wt, bt):
        if wt is None and bt is not None:
            # torch 2.13's group_norm backward fails ("tensor does not have a device") with a
            # bias but no weight; a weight of ones is the same function
            wt = torch.ones(shape[1], dtype=torch.float64)
        return _torch_cf(lambda v: F.group_norm(v, groups, wt, bt, eps=EPS), xt, cl)

    assert_matches_torch(
        lambda: R.group_norm_forward(x, groups, w, b, eps=EPS, channels_last=cl),
        R.group_norm_backward, torch_gn, x, w, b, dy)


TRAILING_CASES = [((7,), 1), ((5, 7), 1), ((3, 1), 1), ((2, 3, 5), 1), ((2, 3, 5), 2),
                  ((2, 1, 5), 2), ((2, 3, 2, 5), 3), ((3, 4, 257), 1)]
TRAILING_IDS = [f"{'x'.join(map(str, s))}-k{k}" for s, k in TRAILING_CASES]


def _trailing_data(shape, k, affine, *key):
    rng = _rng(shape, k, affine, *key)
    ns = tuple(shape[len(shape) - k:])
    x = rng.normal(0.5, 2.0, size=shape)
    w = rng.normal(size=ns) if affine[0] else None
    b = rng.normal(size=ns) if affine[1] else None
    return x, ns, w, b, rng.normal(size=shape)


@affines
@pytest.mark.parametrize("shape,k", TRAILING_CASES, ids=TRAILING_IDS)
def test_layer_norm_matches_torch(shape, k, affine):
    x, ns, w, b, dy = _trailing_data(shape, k, affine, "ln")
    assert_matches_torch(
        lambda: R.layer_norm_forward(x, ns, w, b, eps=EPS), R.layer_norm_backward,
        lambda xt, wt, bt: F.layer_norm(xt, ns, wt, bt, eps=EPS), x, w, b, dy)


@pytest.mark.parametrize("eps", [None, 1e-6, 1e-2], ids=["eps_none", "eps1e-6", "eps1e-2"])
@pytest.mark.parametrize("weight", [False, True], ids=["noweight", "w"])
@pytest.mark.parametrize("shape,k", TRAILING_CASES, ids=TRAILING_IDS)
def test_rms_norm_matches_torch(shape, k, weight, eps):
    x, ns, w, _, dy = _trailing_data(shape, k, (weight, False), "rms")
    _, cache = R.rms_norm_forward(x, ns, w, eps=eps)
    assert R.rms_norm_backward(dy, cache)[2] is None       # RMS norm has no bias
    assert_matches_torch(
        lambda: R.rms_norm_forward(x, ns, w, eps=eps), R.rms_norm_backward,
        lambda xt, wt, bt: F.rms_norm(xt, ns, wt, eps=eps), x, w, None, dy)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_rms_norm_eps_none_is_the_machine_epsilon_torch_computes_in(dtype):
    """eps=None is finfo(dtype).eps for float32/float64 and float32's eps for float16.

    torch 2.13's kernel computes half in float32 and takes float32's epsilon (1.2e-7), not
    finfo(float16).eps as its documentation says; we follow what torch does, so that a model
    moved from torch.nn gives the same outputs.
    """
    compute = np.float32 if dtype is np.float16 else dtype
    # mean(x^2) is ~10x the compute dtype's eps: a wrong default changes y by >= 5%
    scale = {np.float16: 1e-3, np.float32: 1e-3, np.float64: 3e-8}[dtype]
    x = (_rng("rms-eps", dtype).normal(size=(4, 9)) * scale).astype(dtype)
    assert np.abs(R.rms_norm_forward(x, 9, eps=1e-30)[0] - R.rms_norm_forward(x, 9)[0]).max() > 0.05
    y, cache = R.rms_norm_forward(x, 9)
    assert cache["eps"] == float(np.finfo(compute).eps)
    # torch's formula in float64 on the same values, with that eps
    expected = F.rms_norm(torch.tensor(x.astype(np.float64)), (9,), eps=float(np.finfo(compute).eps))
    assert_close(y, expected.numpy(), "y")
    # and torch's own eps=None on the input dtype agrees to that dtype's precision
    in_dtype = F.rms_norm(torch.tensor(x), (9,), eps=None).double().numpy()
    np.testing.assert_allclose(y, in_dtype, rtol=0,
                               atol={np.float16: 2e-3, np.float32: 1e-5, np.float64: 1e-12}[dtype])


def _torch_renorm(x, w, b, running_mean, running_var, r_max, d_max, eps):
    """Batch Renorm (Ioffe, 2017) in torch, channels-first, with r and d detached."""
    dims = [0] + list(range(2, x.ndim))
    view = (1, -1) + (1,) * (x.ndim - 2)
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    sigma_b = torch.sqrt(var + eps)
    sigma_r = torch.sqrt(torch.as_tensor(running_var).view(view) + eps)
    r = (sigma_b / sigma_r).clamp(1.0 / r_max, r_max).detach()
    d = ((mean - torch.as_tensor(running_mean).view(view)) / sigma_r).clamp(-d_max, d_max).detach()
    y = (x - mean) / sigma_b * r + d
    if w is not None:
        y = y * w.view(view)
    if b is not None:
        y = y + b.view(view)
    return y, r.reshape(-1), d.reshape(-1)


@layouts
@affines
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("regime", ["mixed", "unclipped"])
def test_batch_renorm_matches_torch_formula_with_r_d_detached(regime, shape, affine, cl):
    x, w, b, _, dy = _data(shape, cl, affine, "brn", regime)
    rng = _rng(shape, "brn-running", regime)
    C = shape[1]
    if regime == "mixed":       # some channels clipped on r and/or d, others not
        running_mean = rng.normal(0.5, 8.0, size=C)
        running_var = rng.choice([0.05, 1.0, 4.0, 60.0], size=C)
        r_max, d_max = 2.0, 1.0
    else:
        running_mean = rng.normal(0.5, 0.5, size=C)
        running_var = rng.uniform(2.0, 6.0, size=C)
        # r >= sqrt(eps / 6.1) > 1e-3 and |d| < 20 on these data: nothing is clipped
        r_max, d_max = 1e3, 1e3
    ref = lambda: R.batch_renorm_forward(x, running_mean, running_var, w, b, r_max=r_max,  # noqa: E731
                                         d_max=d_max, eps=EPS, channels_last=cl)
    _, cache = ref()
    _, tr, td = _torch_renorm(_t(np.moveaxis(x, -1, 1) if cl else x), None, None, running_mean,
                              running_var, r_max, d_max, EPS)
    assert_close(cache["r"], tr.numpy(), "r")
    assert_close(cache["d"], td.numpy(), "d")
    if regime == "unclipped":
        assert np.all((cache["r"] > 1 / r_max) & (cache["r"] < r_max))
        assert np.all(np.abs(cache["d"]) < d_max)
    assert_matches_torch(
        ref, R.batch_renorm_backward,
        lambda xt, wt, bt: _torch_cf(lambda v: _torch_renorm(v, wt, bt, running_mean, running_var,
                                                             r_max, d_max, EPS)[0], xt, cl),
        x, w, b, dy)


# ------------------------------------------------------------------------ forward only, many shapes


def _random_shapes(seed, count, min_spatial=0):
    rng = np.random.default_rng(seed)
    shapes = []
    for _ in range(count):
        n_spatial = int(rng.integers(min_spatial, 4))
        shape = (int(rng.integers(2, 9)), int(rng.choice([1, 2, 3, 5, 7, 16])))
        shapes.append(shape + tuple(int(s) for s in rng.choice([1, 2, 3, 5, 8, 13], size=n_spatial)))
    return shapes


FWD_SHAPES = _random_shapes(0, 24)
FWD_SPATIAL = [s for s in _random_shapes(1, 30, min_spatial=1) if np.prod(s[2:]) > 1][:20]


@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("shape", FWD_SHAPES, ids=["x".join(map(str, s)) for s in FWD_SHAPES])
def test_forward_matches_torch_on_random_shapes(shape, cl):
    x, w, b, stats, _ = _data(shape, cl, (True, True), "fwd")
    C = shape[1]
    xt = _t(x)
    cf = lambda fn: _torch_cf(fn, xt, cl).numpy()  # noqa: E731
    # batch norm, training and inference
    y, _ = R.batch_norm_forward(x, w, b, eps=EPS, channels_last=cl)
    assert_close(y, cf(lambda v: F.batch_norm(v, None, None, _t(w), _t(b), training=True, eps=EPS)), "bn train")
    y, _ = R.batch_norm_forward(x, w, b, eps=EPS, channels_last=cl, **stats)
    assert_close(y, cf(lambda v: F.batch_norm(v, _t(stats["mean"]), _t(stats["var"]), _t(w), _t(b),
                                              training=False, eps=EPS)), "bn eval")
    # group norm with every group count that divides C
    for g in [g for g in range(1, C + 1) if C % g == 0]:
        y, _ = R.group_norm_forward(x, g, w, b, eps=EPS, channels_last=cl)
        assert_close(y, cf(lambda v: F.group_norm(v, g, _t(w), _t(b), eps=EPS)), f"gn G={g}")
    # layer norm and rms norm over every suffix of the (channels-first or -last) shape
    for k in range(1, x.ndim + 1):
        ns = x.shape[x.ndim - k:]
        wk = _rng(shape, cl, k).normal(size=ns)
        y, _ = R.layer_norm_forward(x, ns, wk, None, eps=EPS)
        assert_close(y, F.layer_norm(xt, ns, _t(wk), None, eps=EPS).numpy(), f"ln k={k}")
        y, _ = R.rms_norm_forward(x, ns, wk)
        assert_close(y, F.rms_norm(xt, ns, _t(wk), eps=None).numpy(), f"rms k={k}")


@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("shape", FWD_SPATIAL, ids=["x".join(map(str, s)) for s in FWD_SPATIAL])
def test_instance_norm_forward_matches_torch_on_random_shapes(shape, cl):
    x, w, b, stats, _ = _data(shape, cl, (True, True), "in-fwd")
    y, _ = R.instance_norm_forward(x, w, b, eps=EPS, channels_last=cl)
    expected = _torch_cf(lambda v: F.instance_norm(v, None, None, _t(w), _t(b), eps=EPS), _t(x), cl)
    assert_close(y, expected.numpy(), "in")


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
def test_forward_eps_is_added_to_the_variance_as_torch_does(eps):
    # small-variance data, so that eps changes the output visibly
    x = _rng("eps", eps).normal(size=(6, 3, 4)) * 0.01
    xt = _t(x)
    assert_close(R.batch_norm_forward(x, eps=eps)[0],
                 F.batch_norm(xt, None, None, training=True, eps=eps).numpy(), "bn")
    assert_close(R.instance_norm_forward(x, eps=eps)[0], F.instance_norm(xt, eps=eps).numpy(), "in")
    assert_close(R.group_norm_forward(x, 3, eps=eps)[0], F.group_norm(xt, 3, eps=eps).numpy(), "gn")
    assert_close(R.layer_norm_forward(x, 4, eps=eps)[0], F.layer_norm(xt, (4,), eps=eps).numpy(), "ln")
    assert_close(R.rms_norm_forward(x, 4, eps=eps)[0], F.rms_norm(xt, (4,), eps=eps).numpy(), "rms")


# ------------------------------------------------------------------------ running statistics


@pytest.mark.parametrize("momentum", [0.1, 0.37, 0.0, 1.0])
@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 7), (3, 2, 5, 3)], ids=["5x3", "2x4x7", "3x2x5x3"])
def test_running_stats_update_matches_torch_batch_norm(shape, momentum):
    rng = _rng("running", shape, momentum)
    C = shape[1]
    x = rng.normal(2.0, 3.0, size=shape)
    running_mean, running_var = rng.normal(size=C), rng.uniform(0.5, 2.0, size=C)
    tm, tv = _t(running_mean), _t(running_var)
    F.batch_norm(_t(x), tm, tv, training=True, momentum=momentum, eps=EPS)   # updates tm, tv
    _, cache = R.batch_norm_forward(x, eps=EPS)
    new_mean, new_var = R.running_stats_update(running_mean, running_var, cache["mean"],
                                               cache["var"], cache["count"], momentum)
    assert cache["count"] == x.size // C
    assert_close(new_mean, tm.numpy(), "running_mean")
    assert_close(new_var, tv.numpy(), "running_var")
    # inputs are not modified: the update is a pure function
    assert not np.shares_memory(new_mean, running_mean)


def test_running_stats_update_cumulative_average_matches_torch_momentum_none():
    rng = _rng("cumulative")
    C = 3
    module = torch.nn.BatchNorm2d(C, momentum=None, eps=EPS, dtype=torch.float64)
    running_mean, running_var = np.zeros(C), np.ones(C)       # torch's initial values
    batch_means = []
    for step, n in enumerate([2, 5, 3, 4], start=1):
        x = rng.normal(step, 1.0 + step, size=(n, C, 3, 2))
        module.train()(_t(x))
        _, cache = R.batch_norm_forward(x, eps=EPS)
        running_mean, running_var = R.running_stats_update(
            running_mean, running_var, cache["mean"], cache["var"], cache["count"], None,
            num_batches_tracked=step)
        batch_means.append(cache["mean"])
        assert int(module.num_batches_tracked) == step
        assert_close(running_mean, module.running_mean.numpy(), f"running_mean after {step}")
        assert_close(running_var, module.running_var.numpy(), f"running_var after {step}")
    # the cumulative average really is the plain mean of the batch means (the initial 0 is dropped)
    assert_close(running_mean, np.mean(batch_means, axis=0), "mean of batch means")


# ------------------------------------------------------------------------ equivalences


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 5), (2, 7, 2, 3), (3, 2, 1, 3, 2), (2, 1, 5)],
                         ids=["3x4", "2x3x5", "2x7x2x3", "3x2x1x3x2", "2x1x5"])
def test_layer_norm_over_channels_and_spatial_equals_group_norm_with_one_group(shape):
    rng = _rng("ln=gn1", shape)
    x, dy = rng.normal(1.0, 2.0, size=shape), rng.normal(size=shape)
    ln_y, ln_cache = R.layer_norm_forward(x, shape[1:], eps=EPS)
    gn_y, gn_cache = R.group_norm_forward(x, 1, eps=EPS)
    assert_close(ln_y, gn_y, "y", rtol=1e-12)
    assert_close(R.layer_norm_backward(dy, ln_cache)[0], R.group_norm_backward(dy, gn_cache)[0],
                 "dx", rtol=1e-12)
    # with a per-channel affine broadcast to LayerNorm's (C, *spatial) parameters, dx still
    # agrees and LayerNorm's dweight / dbias summed over spatial are GroupNorm's
    w, b = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    full = lambda v: np.broadcast_to(v.reshape((-1,) + (1,) * (len(shape) - 2)), shape[1:]).copy()  # noqa: E731
    ln_y, ln_cache = R.layer_norm_forward(x, shape[1:], full(w), full(b), eps=EPS)
    gn_y, gn_cache = R.group_norm_forward(x, 1, w, b, eps=EPS)
    assert_close(ln_y, gn_y, "affine y", rtol=1e-12)
    ldx, ldw, ldb = R.layer_norm_backward(dy, ln_cache)
    gdx, gdw, gdb = R.group_norm_backward(dy, gn_cache)
    spatial = tuple(range(1, len(shape) - 1))
    assert_close(ldx, gdx, "affine dx", rtol=1e-12)
    assert_close(ldw.sum(axis=spatial), gdw, "dweight", rtol=1e-12)
    assert_close(ldb.sum(axis=spatial), gdb, "dbias", rtol=1e-12)


@layouts
@affines
@pytest.mark.parametrize("shape", SPATIAL_SHAPES, ids=SPATIAL_IDS)
def test_instance_norm_equals_group_norm_with_one_group_per_channel(shape, affine, cl):
    x, w, b, _, dy = _data(shape, cl, affine, "in=gnC")
    in_y, in_cache = R.instance_norm_forward(x, w, b, eps=EPS, channels_last=cl)
    gn_y, gn_cache = R.group_norm_forward(x, shape[1], w, b, eps=EPS, channels_last=cl)
    assert_close(in_y, gn_y, "y", rtol=1e-12)
    for name, a, g in zip(("dx", "dweight", "dbias"), R.instance_norm_backward(dy, in_cache),
                          R.group_norm_backward(dy, gn_cache)):
        if g is None:
            assert a is None, name
        else:
            assert_close(a, g, name, rtol=1e-12)


@layouts
@affines
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_batch_renorm_with_r_max_1_and_d_max_0_is_batch_norm(shape, affine, cl):
    x, w, b, _, dy = _data(shape, cl, affine, "brn=bn")
    rng = _rng("brn=bn running", shape)
    # running statistics far from the batch's: they must have no effect at all
    running_mean, running_var = rng.normal(10.0, 5.0, size=shape[1]), rng.uniform(20, 50, size=shape[1])
    rn_y, rn_cache = R.batch_renorm_forward(x, running_mean, running_var, w, b, r_max=1.0,
                                            d_max=0.0, eps=EPS, channels_last=cl)
    bn_y, bn_cache = R.batch_norm_forward(x, w, b, eps=EPS, channels_last=cl)
    np.testing.assert_array_equal(rn_cache["r"], 1.0)
    np.testing.assert_array_equal(rn_cache["d"], 0.0)
    assert_close(rn_y, bn_y, "y", rtol=1e-14)
    for name, a, g in zip(("dx", "dweight", "dbias"), R.batch_renorm_backward(dy, rn_cache),
                          R.batch_norm_backward(dy, bn_cache)):
        if g is None:
            assert a is None, name
        else:
            assert_close(a, g, name, rtol=1e-14)
    assert_close(rn_cache["mean"], bn_cache["mean"], "batch mean", rtol=0)
    assert_close(rn_cache["var"], bn_cache["var"], "batch var", rtol=0)


def _channel_methods(C):
    g = next(g for g in (3, 2, 1) if C % g == 0)
    rng = _rng("cl-stats", C)
    stats = dict(mean=rng.normal(size=C), var=rng.uniform(0.5, 2.0, size=C))
    rm, rv = rng.normal(size=C), rng.uniform(0.5, 2.0, size=C)
    return {
        "bn_train": (lambda x, w, b, cl: R.batch_norm_forward(x, w, b, channels_last=cl), R.batch_norm_backward),
        "bn_eval": (lambda x, w, b, cl: R.batch_norm_forward(x, w, b, channels_last=cl, **stats),
                    R.batch_norm_backward),
        "in_train": (lambda x, w, b, cl: R.instance_norm_forward(x, w, b, channels_last=cl),
                     R.instance_norm_backward),
        "in_eval": (lambda x, w, b, cl: R.instance_norm_forward(x, w, b, channels_last=cl, **stats),
                    R.instance_norm_backward),
        f"gn_G{g}": (lambda x, w, b, cl: R.group_norm_forward(x, g, w, b, channels_last=cl),
                     R.group_norm_backward),
        "brn": (lambda x, w, b, cl: R.batch_renorm_forward(x, rm, rv, w, b, r_max=1.5, d_max=0.5,
                                                           channels_last=cl),
                R.batch_renorm_backward),
    }


@pytest.mark.parametrize("method", ["bn_train", "bn_eval", "in_train", "in_eval", "gn", "brn"])
@pytest.mark.parametrize("shape", [(2, 3, 5), (3, 6, 2, 5), (2, 7, 2, 1, 3), (5, 3, 4, 1)],
                         ids=["2x3x5", "3x6x2x5", "2x7x2x1x3", "5x3x4x1"])
def test_channels_last_equals_channels_first_transposed(shape, method):
    rng = _rng("cl==cf", shape, method)
    C = shape[1]
    methods = _channel_methods(C)
    key = next(k for k in methods if k.startswith(method))
    forward, backward = methods[key]
    x, dy = rng.normal(0.5, 2.0, size=shape), rng.normal(size=shape)
    w, b = rng.normal(size=C), rng.normal(size=C)
    to_cl = lambda a: np.ascontiguousarray(np.moveaxis(a, 1, -1))  # noqa: E731
    y_cf, cache_cf = forward(x, w, b, False)
    y_cl, cache_cl = forward(to_cl(x), w, b, True)
    assert y_cl.shape == to_cl(x).shape
    assert_close(y_cl, to_cl(y_cf), "y", rtol=1e-12)
    dx_cf, dw_cf, db_cf = backward(dy, cache_cf)
    dx_cl, dw_cl, db_cl = backward(to_cl(dy), cache_cl)
    assert_close(dx_cl, to_cl(dx_cf), "dx", rtol=1e-12)
    assert_close(dw_cl, dw_cf, "dweight", rtol=1e-12)
    assert_close(db_cl, db_cf, "dbias", rtol=1e-12)
