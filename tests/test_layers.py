"""normlab.layers: the NumPy layers against the float64 reference and against their torch.nn twins.

Sections: parity with the reference (every output and gradient, both dtypes, both layouts, odd
shapes); parity with torch.nn over several training steps then eval (outputs, autograd
gradients, running statistics); Batch Renorm against a hand-written torch formula; dtype
policy; state_dict; errors; structure (one compute pair) and docstring examples.
"""

from __future__ import annotations

import doctest
import pickle
import zlib

import numpy as np
import pytest
import torch

import normlab.layers
from normlab import reference
from normlab.layers import (BatchNorm, BatchRenorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm,
                            _ops)
from normlab.layers import batch_norm as batch_norm_module
from normlab.layers import group_norm as group_norm_module
from normlab.layers import instance_norm as instance_norm_module
from normlab.layers import layer_norm as layer_norm_module

F32, F64 = np.float32, np.float64

# The layers accumulate in float64 and round once, so against the float64 reference computed from
# the same (upcast) input the float32 error is a few ulps of the output.
REF_TOL = {F64: dict(rtol=1e-12, atol=1e-12), F32: dict(rtol=1e-5, atol=1e-5)}
# torch computes float32 in float32 (its own summation order): looser.
TORCH_TOL = {F64: dict(rtol=1e-9, atol=1e-9), F32: dict(rtol=1e-4, atol=2e-5)}

TORCH_DTYPE = {F32: torch.float32, F64: torch.float64}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tensors here are tiny: torch's thread pool only adds contention (30x slower on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def to_layout(a, channels_last):
    """Channels-first array -> the layer's layout."""
    return np.moveaxis(a, 1, -1) if channels_last else a


def from_layout(a, channels_last):
    return np.moveaxis(a, -1, 1) if channels_last else a


def f64(a):
    return None if a is None else np.asarray(a, dtype=F64)


def sample(rng, shape, dtype, step=0):
    """Data whose mean and scale differ per channel and per step (so running stats move)."""
    x = rng.normal(size=shape) * (0.5 + step) + (1.5 * step - 1.0)
    if len(shape) >= 2:
        x = x + 2.0 * rng.normal(size=shape[:2] + (1,) * (len(shape) - 2))
    return x.astype(dtype)


def randomize(layer, rng):
    """Random parameters and running statistics, so that none of them is a no-op."""
    for name in ("weight", "bias"):
        p = getattr(layer, name)
        if p is not None:
            p[...] = rng.normal(size=p.shape) + (1.0 if name == "weight" else 0.0)
    if layer.running_mean is not None:
        layer.running_mean[...] = rng.normal(size=layer.running_mean.shape)
        layer.running_var[...] = rng.uniform(0.5, 2.0, size=layer.running_var.shape)
        layer.num_batches_tracked[...] = 4
    return layer


def assert_close_or_none(got, want, tol, what):
    assert (got is None) == (want is None), f"{what}: got {got!r}, want {want!r}"
    if got is not None:
        np.testing.assert_allclose(np.asarray(got, F64), np.asarray(want, F64), err_msg=what, **tol)


def snapshot(layer):
    return {k: (None if getattr(layer, k) is None else np.array(getattr(layer, k)))
            for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def assert_same_state(layer, snap):
    for k, v in snap.items():
        got = getattr(layer, k)
        assert (got is None) == (v is None), k
        if v is not None:
            np.testing.assert_array_equal(got, v, err_msg=k)


# ----------------------------------------------------------------------------------------------
# 1. parity with the float64 reference
# ----------------------------------------------------------------------------------------------
def _ref_batch_norm(layer, x, training, dtype):
    kw = {}
    if not (training or not layer.track_running_stats):
        kw = dict(mean=f64(layer.running_mean), var=f64(layer.running_var))
    y, cache = reference.batch_norm_forward(x, f64(layer.weight), f64(layer.bias), eps=layer.eps, **kw)
    return y, cache, reference.batch_norm_backward


def _ref_batch_renorm(layer, x, training, dtype):
    if not training:
        y, cache = reference.batch_norm_forward(x, f64(layer.weight), f64(layer.bias),
                                                mean=f64(layer.running_mean),
                                                var=f64(layer.running_var), eps=layer.eps)
        return y, cache, reference.batch_norm_backward
    y, cache = reference.batch_renorm_forward(x, f64(layer.running_mean), f64(layer.running_var),
                                              f64(layer.weight), f64(layer.bias), r_max=layer.r_max,
                                              d_max=layer.d_max, eps=layer.eps)
    return y, cache, reference.batch_renorm_backward


def _ref_instance_norm(layer, x, training, dtype):
    kw = {}
    if not (training or not layer.track_running_stats):
        kw = dict(mean=f64(layer.running_mean), var=f64(layer.running_var))
    y, cache = reference.instance_norm_forward(x, f64(layer.weight), f64(layer.bias), eps=layer.eps,
                                               **kw)
    return y, cache, reference.instance_norm_backward


def _ref_group_norm(layer, x, training, dtype):
    y, cache = reference.group_norm_forward(x, layer.num_groups, f64(layer.weight), f64(layer.bias),
                                            eps=layer.eps)
    return y, cache, reference.group_norm_backward


def _ref_layer_norm(layer, x, training, dtype):
    y, cache = reference.layer_norm_forward(x, layer.normalized_shape, f64(layer.weight),
                                            f64(layer.bias), eps=layer.eps)
    return y, cache, reference.layer_norm_backward


def _ref_rms_norm(layer, x, training, dtype):
    eps = layer.eps if layer.eps is not None else float(np.finfo(dtype).eps)  # torch: input's eps
    y, cache = reference.rms_norm_forward(x, layer.normalized_shape, f64(layer.weight), eps=eps)
    return y, cache, reference.rms_norm_backward


class RefCase:
    """A layer configuration and the reference it must match. ``shape`` is channels-first."""

    def __init__(self, name, cls, args, shape, ref, **kwargs):
        self.name, self.cls, self.args, self.shape = name, cls, args, shape
        self.ref, self.kwargs = ref, kwargs
        self.channel_layer = cls in (BatchNorm, BatchRenorm, InstanceNorm, GroupNorm)

    def make(self, dtype, channels_last):
        if self.channel_layer:
            return self.cls(*self.args, channels_last=channels_last, dtype=dtype, **self.kwargs)
        return self.cls(*self.args, dtype=dtype, **self.kwargs)


REF_CASES = [
    RefCase("bn-N2-C1", BatchNorm, (1,), (2, 1), _ref_batch_norm),
    RefCase("bn-N7-C3", BatchNorm, (3,), (7, 3), _ref_batch_norm),
    RefCase("bn-N1-C3-L5", BatchNorm, (3,), (1, 3, 5), _ref_batch_norm),
    RefCase("bn-C5-L1", BatchNorm, (5,), (3, 5, 1), _ref_batch_norm, eps=1e-3),
    RefCase("bn-2d-noaffine", BatchNorm, (2,), (3, 2, 5, 7), _ref_batch_norm, affine=False),
    RefCase("bn-3d-untracked", BatchNorm, (3,), (2, 3, 2, 3, 5), _ref_batch_norm,
            track_running_stats=False),
    RefCase("brn-N11-C3", BatchRenorm, (3,), (11, 3), _ref_batch_renorm, r_max=1.5, d_max=0.5),
    RefCase("brn-2d-noaffine", BatchRenorm, (2,), (2, 2, 3, 5), _ref_batch_renorm, affine=False,
            r_max=1.2, d_max=0.3),
    RefCase("in-N1-C3-L5", InstanceNorm, (3,), (1, 3, 5), _ref_instance_norm, affine=True),
    RefCase("in-C1-L7-tracked", InstanceNorm, (1,), (2, 1, 7), _ref_instance_norm, affine=True,
            track_running_stats=True),
    RefCase("in-2d-tracked", InstanceNorm, (2,), (3, 2, 5, 3), _ref_instance_norm,
            track_running_stats=True),
    RefCase("gn-G1-C3", GroupNorm, (1, 3), (2, 3, 5), _ref_group_norm),
    RefCase("gn-G3-C3", GroupNorm, (3, 3), (1, 3, 7), _ref_group_norm),
    RefCase("gn-G2-C6-nospatial", GroupNorm, (2, 6), (5, 6), _ref_group_norm),
    RefCase("gn-G3-C6-2d-noaffine", GroupNorm, (3, 6), (2, 6, 5, 1), _ref_group_norm, affine=False),
    RefCase("ln-7", LayerNorm, (7,), (3, 5, 7), _ref_layer_norm),
    RefCase("ln-1", LayerNorm, (1,), (5, 1), _ref_layer_norm),
    RefCase("ln-5x7-nolead", LayerNorm, ((5, 7),), (5, 7), _ref_layer_norm),
    RefCase("ln-3x2-nobias", LayerNorm, ((3, 2),), (2, 5, 3, 2), _ref_layer_norm, bias=False),
    RefCase("ln-noaffine", LayerNorm, (13,), (2, 13), _ref_layer_norm, elementwise_affine=False),
    RefCase("rms-13-epsNone", RMSNorm, (13,), (3, 13), _ref_rms_norm),
    RefCase("rms-1", RMSNorm, (1,), (7, 1), _ref_rms_norm, eps=1e-6),
    RefCase("rms-3x5-noaffine", RMSNorm, ((3, 5),), (2, 3, 5), _ref_rms_norm, elementwise_affine=False),
]


def _ref_params():
    for case in REF_CASES:
        for cl in ((False, True) if case.channel_layer else (False,)):
            for training in (True, False):
                for dtype in (F64, F32):
                    mode = "train" if training else "eval"
                    tag = f"{case.name}-{'cl' if cl else 'cf'}-{mode}-{np.dtype(dtype).name}"
                    yield pytest.param(case, cl, training, dtype, id=tag)


@pytest.mark.parametrize("case,channels_last,training,dtype", list(_ref_params()))
def test_layer_matches_reference(case, channels_last, training, dtype):
    shape = case.shape
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    layer = randomize(case.make(dtype, channels_last), rng)
    x = sample(rng, shape, dtype)
    dy = rng.normal(size=shape).astype(dtype)
    before = snapshot(layer)

    # the reference sees the running statistics from before the forward's update
    y_ref, cache, ref_backward = case.ref(layer, f64(x), training, dtype)
    dx_ref, dw_ref, db_ref = ref_backward(f64(dy), cache)

    y = layer.forward(to_layout(x, channels_last), training=training)
    dx = layer.backward(to_layout(dy, channels_last))
    tol = REF_TOL[dtype]
    assert y.dtype == dtype and dx.dtype == dtype
    assert y.shape == to_layout(x, channels_last).shape
    assert_close_or_none(from_layout(y, channels_last), y_ref, tol, "y")
    assert_close_or_none(from_layout(dx, channels_last), dx_ref, tol, "dx")
    assert_close_or_none(layer.dweight, dw_ref, tol, "dweight")
    assert_close_or_none(layer.dbias, db_ref, tol, "dbias")

    if layer.track_running_stats and training:
        C = before["running_mean"].shape[0]
        mean = np.asarray(cache["mean"]).reshape(-1, C).mean(axis=0)   # IN: average over samples
        var = np.asarray(cache["var"]).reshape(-1, C).mean(axis=0)
        want_mean, want_var = reference.running_stats_update(
            before["running_mean"], before["running_var"], mean, var, cache["count"], layer.momentum)
        np.testing.assert_allclose(layer.running_mean, want_mean, **tol)
        np.testing.assert_allclose(layer.running_var, want_var, **tol)
        assert layer.running_mean.dtype == dtype
    else:
        assert_same_state(layer, before)   # eval, and per-sample layers, change no state


# ----------------------------------------------------------------------------------------------
# 2. parity with torch.nn over training steps, then eval
# ----------------------------------------------------------------------------------------------
def _t(a):
    return torch.tensor(np.ascontiguousarray(a))


def copy_params_into_twin(ours, twin):
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(ours, name)
            tp = getattr(twin, name, None)
            assert (p is None) == (tp is None), name
            if p is not None:
                tp.copy_(_t(p))


def compare_step(ours, twin, x, dy, channels_last, training, dtype):
    """One forward + backward through both; compares outputs, gradients and buffers."""
    tol = TORCH_TOL[dtype]
    twin.train(training)
    xt = _t(x).requires_grad_(True)
    yt = twin(xt)
    yt.backward(_t(dy))
    y = ours.forward(to_layout(x, channels_last), training=training)
    dx = ours.backward(to_layout(dy, channels_last))
    assert y.dtype == dtype and dx.dtype == dtype
    np.testing.assert_allclose(from_layout(y, channels_last), yt.detach().numpy(), err_msg="y", **tol)
    np.testing.assert_allclose(from_layout(dx, channels_last), xt.grad.numpy(), err_msg="dx", **tol)
    for name in ("weight", "bias"):
        tp = getattr(twin, name, None)
        assert_close_or_none(getattr(ours, "d" + name), None if tp is None else tp.grad.numpy(),
                             tol, "d" + name)
    for name in ("running_mean", "running_var"):
        tb = getattr(twin, name, None)
        assert_close_or_none(getattr(ours, name), None if tb is None else tb.numpy(), tol, name)
    tn = getattr(twin, "num_batches_tracked", None)
    if tn is None:
        assert ours.num_batches_tracked is None
    else:
        assert int(ours.num_batches_tracked) == int(tn)
    twin.zero_grad(set_to_none=False)


def run_steps_vs_torch(ours, twin, shape, channels_last, dtype, seed, steps=3):
    rng = np.random.default_rng(seed)
    randomize(ours, rng)
    if ours.running_mean is not None:      # start both from the same non-trivial buffers
        ours.num_batches_tracked[...] = 0
        with torch.no_grad():
            twin.running_mean.copy_(_t(ours.running_mean))
            twin.running_var.copy_(_t(ours.running_var))
    copy_params_into_twin(ours, twin)
    for step in range(steps):
        compare_step(ours, twin, sample(rng, shape, dtype, step),
                     rng.normal(size=shape).astype(dtype), channels_last, True, dtype)
    compare_step(ours, twin, sample(rng, shape, dtype, steps), rng.normal(size=shape).astype(dtype),
                 channels_last, False, dtype)


BN_SHAPES = [((6, 4), torch.nn.BatchNorm1d), ((5, 4, 7), torch.nn.BatchNorm1d),
             ((3, 4, 5, 3), torch.nn.BatchNorm2d), ((2, 4, 3, 2, 3), torch.nn.BatchNorm3d)]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("shape,twin_cls", BN_SHAPES, ids=["N,C", "1d", "2d", "3d"])
def test_batch_norm_matches_torch_over_steps(shape, twin_cls, momentum, affine, track,
                                             channels_last, dtype):
    C = shape[1]
    ours = BatchNorm(C, eps=1e-4, momentum=momentum, affine=affine, track_running_stats=track,
                     channels_last=channels_last, dtype=dtype)
    twin = twin_cls(C, eps=1e-4, momentum=momentum, affine=affine, track_running_stats=track,
                    dtype=TORCH_DTYPE[dtype])
    run_steps_vs_torch(ours, twin, shape, channels_last, dtype, seed=len(shape))


IN_SHAPES = [((3, 4, 7), torch.nn.InstanceNorm1d), ((2, 4, 5, 3), torch.nn.InstanceNorm2d),
             ((2, 4, 3, 2, 3), torch.nn.InstanceNorm3d)]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("shape,twin_cls", IN_SHAPES, ids=["1d", "2d", "3d"])
def test_instance_norm_matches_torch_over_steps(shape, twin_cls, momentum, affine, track,
                                                channels_last, dtype):
    C = shape[1]
    ours = InstanceNorm(C, eps=1e-4, momentum=momentum, affine=affine, track_running_stats=track,
                        channels_last=channels_last, dtype=dtype)
    twin = twin_cls(C, eps=1e-4, momentum=momentum, affine=affine, track_running_stats=track,
                    dtype=TORCH_DTYPE[dtype])
    run_steps_vs_torch(ours, twin, shape, channels_last, dtype, seed=10 + len(shape))


def test_instance_norm_running_stats_average_the_per_instance_updates():
    """The rule written in the docstring, by hand (torch.nn.InstanceNorm's behaviour)."""
    rng = np.random.default_rng(3)
    x = sample(rng, (4, 2, 6), F64)
    norm = InstanceNorm(2, momentum=0.25, track_running_stats=True, dtype=F64)
    norm.forward(x)
    S = x.shape[2]
    per_instance_mean = x.mean(axis=2)                   # (N, C)
    per_instance_var = x.var(axis=2) * S / (S - 1)       # unbiased, (N, C)
    np.testing.assert_allclose(norm.running_mean, (0.75 * 0 + 0.25 * per_instance_mean).mean(axis=0))
    np.testing.assert_allclose(norm.running_var, (0.75 * 1 + 0.25 * per_instance_var).mean(axis=0))
    assert int(norm.num_batches_tracked) == 0


GN_CASES = [(1, 6, (3, 6, 5)), (2, 6, (3, 6)), (3, 6, (2, 6, 4, 3)), (6, 6, (2, 6, 5)),
            (1, 1, (2, 1, 7))]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)],
                         ids=["affine", "nobias", "noaffine"])
@pytest.mark.parametrize("G,C,shape", GN_CASES, ids=[f"G{g}-C{c}-{len(s)}d" for g, c, s in GN_CASES])
def test_group_norm_matches_torch_over_steps(G, C, shape, affine, bias, channels_last, dtype):
    ours = GroupNorm(G, C, eps=1e-4, affine=affine, bias=bias, channels_last=channels_last, dtype=dtype)
    twin = torch.nn.GroupNorm(G, C, eps=1e-4, affine=affine, bias=bias, dtype=TORCH_DTYPE[dtype])
    run_steps_vs_torch(ours, twin, shape, channels_last, dtype, seed=20 + G)


# With D = 1, xhat is 0 up to torch's float32 rounding of x * rstd - mean * rstd, which
# rstd = 1/sqrt(eps) amplifies: a larger eps keeps that noise below the float32 tolerance.
LN_CASES = [(7, (3, 5, 7), 1e-4), ((5, 7), (3, 5, 7), 1e-4), ((2, 3), (2, 3), 1e-4), (1, (4, 1), 0.1)]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)],
                         ids=["affine", "nobias", "noaffine"])
@pytest.mark.parametrize("normalized_shape,shape,eps", LN_CASES, ids=["7", "5x7", "2x3-nolead", "1"])
def test_layer_norm_matches_torch_over_steps(normalized_shape, shape, eps, affine, bias, dtype):
    ours = LayerNorm(normalized_shape, eps=eps, elementwise_affine=affine, bias=bias, dtype=dtype)
    twin = torch.nn.LayerNorm(normalized_shape, eps=eps, elementwise_affine=affine, bias=bias,
                              dtype=TORCH_DTYPE[dtype])
    run_steps_vs_torch(ours, twin, shape, False, dtype, seed=30)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("eps", [None, 1e-6], ids=["epsNone", "eps1e-6"])
@pytest.mark.parametrize("normalized_shape,shape", [c[:2] for c in LN_CASES],
                         ids=["7", "5x7", "2x3-nolead", "1"])
def test_rms_norm_matches_torch_over_steps(normalized_shape, shape, eps, affine, dtype):
    ours = RMSNorm(normalized_shape, eps=eps, elementwise_affine=affine, dtype=dtype)
    twin = torch.nn.RMSNorm(normalized_shape, eps=eps, elementwise_affine=affine,
                            dtype=TORCH_DTYPE[dtype])
    run_steps_vs_torch(ours, twin, shape, False, dtype, seed=40)


def test_rms_norm_eps_none_is_the_input_dtypes_epsilon():
    """Tiny inputs make eps dominate mean(x^2), so the float32 and float64 epsilons differ."""
    x = np.full((1, 4), 1e-4)
    norm = RMSNorm(4, dtype=F64)
    y64 = norm.forward(x)
    y32 = norm.forward(x.astype(F32))
    np.testing.assert_allclose(y64, x / np.sqrt(1e-8 + np.finfo(F64).eps))
    np.testing.assert_allclose(y32, x / np.sqrt(1e-8 + np.finfo(F32).eps), rtol=1e-6)


# ---- Batch Renorm against a hand-written torch formula --------------------------------------
def torch_batch_renorm_step(x, weight, bias, state, *, r_max, d_max, eps, momentum):
    """Ioffe (2017), Algorithm 1, in torch autograd; updates ``state`` like torch.nn.BatchNorm."""
    C = x.shape[1]
    axes = [0] + list(range(2, x.dim()))
    bshape = [1, C] + [1] * (x.dim() - 2)
    mean = x.mean(dim=axes, keepdim=True)
    var = x.var(dim=axes, unbiased=False, keepdim=True)
    sigma_b = torch.sqrt(var + eps)
    sigma_r = torch.sqrt(state["running_var"].view(bshape) + eps)
    r = (sigma_b / sigma_r).detach().clamp(1.0 / r_max, r_max)
    d = ((mean - state["running_mean"].view(bshape)) / sigma_r).detach().clamp(-d_max, d_max)
    y = (x - mean) / sigma_b * r + d
    if weight is not None:
        y = y * weight.view(bshape) + bias.view(bshape)
    state["num_batches_tracked"] += 1
    f = momentum if momentum is not None else 1.0 / state["num_batches_tracked"]
    M = x.numel() // C
    state["running_mean"] = (1 - f) * state["running_mean"] + f * mean.detach().flatten()
    state["running_var"] = (1 - f) * state["running_var"] + f * var.detach().flatten() * M / (M - 1)
    return y, r.flatten(), d.flatten()


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("shape", [(16, 3), (4, 3, 5, 2)], ids=["N,C", "2d"])
def test_batch_renorm_matches_torch_formula_over_steps(shape, momentum, affine, channels_last, dtype):
    rng = np.random.default_rng(50)
    C, tol, tdt = shape[1], TORCH_TOL[dtype], TORCH_DTYPE[dtype]
    r_max, d_max, eps = 1.5, 0.5, 1e-4
    ours = BatchRenorm(C, eps=eps, momentum=momentum, affine=affine, r_max=r_max, d_max=d_max,
                       channels_last=channels_last, dtype=dtype)
    randomize(ours, rng)
    ours.running_mean[...] = 0.0
    ours.running_var[...] = 1.0
    ours.num_batches_tracked[...] = 0
    w = None if ours.weight is None else _t(ours.weight).requires_grad_(True)
    b = None if ours.bias is None else _t(ours.bias).requires_grad_(True)
    state = dict(running_mean=torch.zeros(C, dtype=tdt), running_var=torch.ones(C, dtype=tdt),
                 num_batches_tracked=0)
    clipped_r = clipped_d = unclipped = False
    for step in range(4):
        # per-channel scales around 1 and means around 0 so that some channels clip, some do not
        scale = np.array([0.9, 4.0, 1.2])[: C].reshape((1, C) + (1,) * (len(shape) - 2))
        shift = np.array([0.1, 3.0, -0.2])[: C].reshape(scale.shape)
        x = (rng.normal(size=shape) * scale * (1 + 0.2 * step) + shift).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        xt = _t(x).requires_grad_(True)
        yt, r, d = torch_batch_renorm_step(xt, w, b, state, r_max=r_max, d_max=d_max, eps=eps,
                                           momentum=momentum)
        yt.backward(_t(dy))
        y = ours.forward(to_layout(x, channels_last))
        dx = ours.backward(to_layout(dy, channels_last))
        assert y.dtype == dtype and dx.dtype == dtype
        np.testing.assert_allclose(from_layout(y, channels_last), yt.detach().numpy(), **tol)
        np.testing.assert_allclose(from_layout(dx, channels_last), xt.grad.numpy(), **tol)
        if affine:
            np.testing.assert_allclose(ours.dweight, w.grad.numpy(), **tol)
            np.testing.assert_allclose(ours.dbias, b.grad.numpy(), **tol)
            w.grad = b.grad = None
        else:
            assert ours.dweight is None and ours.dbias is None
        np.testing.assert_allclose(ours.running_mean, state["running_mean"].numpy(), **tol)
        np.testing.assert_allclose(ours.running_var, state["running_var"].numpy(), **tol)
        assert int(ours.num_batches_tracked) == state["num_batches_tracked"]
        r, d = r.numpy(), d.numpy()
        clipped_r |= bool(np.any(np.isclose(r, r_max) | np.isclose(r, 1 / r_max)))
        clipped_d |= bool(np.any(np.isclose(np.abs(d), d_max)))
        unclipped |= bool(np.any((np.abs(d) < d_max) & (r < r_max) & (r > 1 / r_max)))
    assert clipped_r and clipped_d and unclipped, "the data must exercise both clipped and free r, d"

    # eval: batch norm with the running statistics
    x = sample(rng, shape, dtype)
    bshape = [1, C] + [1] * (len(shape) - 2)
    sigma_r = torch.sqrt(state["running_var"].view(bshape) + eps)
    want = (_t(x) - state["running_mean"].view(bshape)) / sigma_r
    if affine:
        want = want * w.detach().view(bshape) + b.detach().view(bshape)
    y = ours.forward(to_layout(x, channels_last), training=False)
    np.testing.assert_allclose(from_layout(y, channels_last), want.numpy(), **tol)


def test_batch_renorm_with_r_max_1_and_d_max_0_is_batch_norm_over_steps():
    rng = np.random.default_rng(60)
    brn = randomize(BatchRenorm(3, momentum=None, r_max=1.0, d_max=0.0, dtype=F64), rng)
    bn = BatchNorm(3, momentum=None, dtype=F64)
    bn.load_state_dict(brn.state_dict())
    for step in range(3):
        x, dy = sample(rng, (8, 3, 4), F64, step), rng.normal(size=(8, 3, 4))
        np.testing.assert_allclose(brn.forward(x), bn.forward(x), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(brn.backward(dy), bn.backward(dy), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(brn.dweight, bn.dweight, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(brn.running_var, bn.running_var, rtol=1e-12)
    np.testing.assert_allclose(brn.forward(x, training=False), bn.forward(x, training=False))


def test_group_norm_with_one_group_per_channel_is_instance_norm():
    rng = np.random.default_rng(61)
    gn = randomize(GroupNorm(4, 4, dtype=F64), rng)
    inorm = InstanceNorm(4, affine=True, dtype=F64)
    inorm.load_state_dict(gn.state_dict())
    x, dy = sample(rng, (3, 4, 6), F64), rng.normal(size=(3, 4, 6))
    np.testing.assert_allclose(gn.forward(x), inorm.forward(x), atol=1e-12)
    np.testing.assert_allclose(gn.backward(dy), inorm.backward(dy), atol=1e-12)
    np.testing.assert_allclose(gn.dweight, inorm.dweight, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 3. dtype policy
# ----------------------------------------------------------------------------------------------
LAYERS = {
    "BatchNorm": lambda dt: BatchNorm(3, dtype=dt),
    "BatchNorm-untracked": lambda dt: BatchNorm(3, track_running_stats=False, dtype=dt),
    "BatchRenorm": lambda dt: BatchRenorm(3, dtype=dt),
    "InstanceNorm": lambda dt: InstanceNorm(3, affine=True, track_running_stats=True, dtype=dt),
    "GroupNorm": lambda dt: GroupNorm(3, 3, dtype=dt),
    "LayerNorm": lambda dt: LayerNorm((3, 5), dtype=dt),
    "RMSNorm": lambda dt: RMSNorm(5, dtype=dt),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("param_dtype", [F32, F64], ids=["params-f32", "params-f64"])
@pytest.mark.parametrize("x_dtype", [np.float16, F32, F64], ids=["x-f16", "x-f32", "x-f64"])
@pytest.mark.parametrize("make", list(LAYERS.values()), ids=list(LAYERS))
def test_output_has_input_dtype_and_gradients_have_parameter_dtype(make, x_dtype, param_dtype, training):
    layer = make(param_dtype)
    x = sample(np.random.default_rng(0), (4, 3, 5), x_dtype)
    y = layer.forward(x, training=training)
    dx = layer.backward(np.ones_like(y))
    assert y.dtype == x_dtype and dx.dtype == x_dtype
    assert y.shape == x.shape and dx.shape == x.shape
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    for name in ("dweight", "dbias", "weight", "running_mean", "running_var"):
        v = getattr(layer, name)
        if v is not None:
            assert v.dtype == param_dtype, name
    if layer.num_batches_tracked is not None:
        assert layer.num_batches_tracked.dtype == np.int64


def test_non_float_input_is_refused_not_promoted():
    with pytest.raises(TypeError, match="int64"):
        BatchNorm(3).forward(np.ones((4, 3), dtype=np.int64))
    layer = LayerNorm(3)
    layer.forward(np.ones((2, 3), F32))
    with pytest.raises(TypeError, match="dy.*int32"):
        layer.backward(np.ones((2, 3), dtype=np.int32))


@pytest.mark.parametrize("dtype", [np.int32, "bool", object])
def test_non_float_parameter_dtype_is_refused(dtype):
    with pytest.raises(TypeError, match="dtype"):
        BatchNorm(3, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# 4. state_dict
# ----------------------------------------------------------------------------------------------
TWINS = [
    ("bn1d", lambda: BatchNorm(4), lambda: torch.nn.BatchNorm1d(4), (5, 4, 3)),
    ("bn2d-noaffine", lambda: BatchNorm(4, affine=False), lambda: torch.nn.BatchNorm2d(4, affine=False),
     (3, 4, 2, 3)),
    ("bn3d-untracked", lambda: BatchNorm(4, track_running_stats=False),
     lambda: torch.nn.BatchNorm3d(4, track_running_stats=False), (2, 4, 2, 2, 3)),
    ("in2d-tracked", lambda: InstanceNorm(4, affine=True, track_running_stats=True),
     lambda: torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True), (3, 4, 5, 3)),
    ("in1d", lambda: InstanceNorm(4), lambda: torch.nn.InstanceNorm1d(4), (3, 4, 5)),
    ("gn", lambda: GroupNorm(2, 4), lambda: torch.nn.GroupNorm(2, 4), (3, 4, 5)),
    ("ln-nobias", lambda: LayerNorm((4, 5), bias=False), lambda: torch.nn.LayerNorm((4, 5), bias=False),
     (3, 4, 5)),
    ("rms", lambda: RMSNorm(5), lambda: torch.nn.RMSNorm(5), (3, 4, 5)),
]


@pytest.mark.parametrize("ours_factory,twin_factory,shape", [t[1:] for t in TWINS],
                         ids=[t[0] for t in TWINS])
def test_state_dict_keys_match_torch_and_checkpoints_move_both_ways(ours_factory, twin_factory, shape):
    rng = np.random.default_rng(70)
    twin = twin_factory()
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(torch.randn_like(p))
    for step in range(2):
        twin.train()(_t(sample(rng, shape, F32, step)))
    ours = ours_factory()
    assert list(ours.state_dict()) == list(twin.state_dict())

    # torch.nn -> ours (torch tensors straight in), then the same eval outputs
    ours.load_state_dict(twin.state_dict())
    for k, v in twin.state_dict().items():
        np.testing.assert_array_equal(getattr(ours, k), v.numpy(), err_msg=k)
    x = sample(rng, shape, F32, 3)
    twin.eval()
    np.testing.assert_allclose(ours.forward(x, training=False), twin(_t(x)).detach().numpy(),
                               **TORCH_TOL[F32])

    # ours -> torch.nn via torch.tensor, after our own training step changed everything
    randomize(ours, rng)
    ours.forward(x, training=True)
    twin2 = twin_factory()
    twin2.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()}, strict=True)
    for k, v in twin2.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), getattr(ours, k), err_msg=k)


def test_state_dict_round_trip_restores_a_trained_layer():
    rng = np.random.default_rng(71)
    a = randomize(BatchNorm(3, momentum=None, channels_last=True, dtype=F64), rng)
    for step in range(3):
        a.forward(sample(rng, (4, 3, 5), F64, step).transpose(0, 2, 1))
    sd = a.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    b = BatchNorm(3, momentum=None, channels_last=True, dtype=F64)
    result = b.load_state_dict(sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_same_state(b, snapshot(a))
    assert int(b.num_batches_tracked) == 4 + 3   # randomize() set 4
    x = rng.normal(size=(2, 5, 3))
    np.testing.assert_array_equal(a.forward(x, training=False), b.forward(x, training=False))
    # the dict holds copies: neither side sees the other's later changes
    sd["running_mean"][...] = 123.0
    assert not np.any(a.running_mean == 123.0) and not np.any(b.running_mean == 123.0)
    a.weight[...] = -7.0
    assert not np.any(sd["weight"] == -7.0) and not np.any(b.weight == -7.0)


def test_load_state_dict_copies_in_place_and_casts_to_the_parameter_dtype():
    layer = BatchNorm(3, dtype=F32)
    weight = layer.weight
    layer.load_state_dict({"weight": np.arange(3.0), "bias": np.zeros(3), "running_mean": np.ones(3),
                           "running_var": np.full(3, 2.0), "num_batches_tracked": np.int64(5)})
    assert layer.weight is weight                     # an optimizer's reference stays valid
    np.testing.assert_array_equal(weight, [0.0, 1.0, 2.0])
    assert layer.weight.dtype == F32 and layer.running_var.dtype == F32
    assert int(layer.num_batches_tracked) == 5


def test_loading_a_parameter_that_requires_grad_works():
    twin = torch.nn.LayerNorm(3)
    layer = LayerNorm(3)
    layer.load_state_dict({"weight": twin.weight * 2, "bias": twin.bias})   # grad-tracking tensors
    np.testing.assert_array_equal(layer.weight, [2.0, 2.0, 2.0])


def test_old_checkpoint_without_num_batches_tracked_loads_and_keeps_the_count():
    rng = np.random.default_rng(72)
    layer = BatchNorm(3)
    layer.forward(sample(rng, (4, 3), F32))
    old = {k: v for k, v in torch.nn.BatchNorm1d(3).state_dict().items() if k != "num_batches_tracked"}
    old["running_mean"] = torch.full((3,), 0.5)
    result = layer.load_state_dict(old)
    assert result.missing_keys == []
    np.testing.assert_array_equal(layer.running_mean, [0.5, 0.5, 0.5])
    assert int(layer.num_batches_tracked) == 1        # torch.nn keeps the current value too


def _good_sd(layer):
    return {k: np.array(v, dtype=F64) + 1.0 if k != "num_batches_tracked" else np.int64(9)
            for k, v in layer.state_dict().items()}


BAD_LOADS = [
    ("wrong-shape", lambda sd: sd.update(bias=np.zeros(4)), r"'bias' has shape \(4,\), expected shape \(3,\)"),
    ("wrong-shape-last", lambda sd: sd.update(running_var=np.ones((3, 1))),
     r"'running_var' has shape \(3, 1\), expected shape \(3,\)"),
    ("missing", lambda sd: sd.pop("running_var"), r"missing keys \['running_var'\]"),
    ("unexpected", lambda sd: sd.update(momentum=np.ones(1)), r"unexpected keys \['momentum'\]"),
    ("negative-var", lambda sd: sd.update(running_var=np.array([1.0, -0.5, 1.0])), "running_var.*negative"),
    ("float-count", lambda sd: sd.update(num_batches_tracked=np.float64(2.5)), "num_batches_tracked.*integer"),
    ("strings", lambda sd: sd.update(weight=np.array(["a", "b", "c"])), "'weight' must hold real numbers"),
]


@pytest.mark.parametrize("corrupt,match", [b[1:] for b in BAD_LOADS], ids=[b[0] for b in BAD_LOADS])
def test_failed_load_names_the_problem_and_leaves_the_layer_unchanged(corrupt, match):
    rng = np.random.default_rng(73)
    layer = randomize(BatchNorm(3), rng)
    before = snapshot(layer)
    sd = _good_sd(layer)        # valid and different everywhere: a partial write would show
    corrupt(sd)
    with pytest.raises(ValueError, match=match):
        layer.load_state_dict(sd)
    assert_same_state(layer, before)


def test_unexpected_running_stats_say_the_layer_does_not_track_them():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        InstanceNorm(3).load_state_dict(
            torch.nn.InstanceNorm1d(3, track_running_stats=True).state_dict())


def test_non_strict_load_skips_and_reports_keys_but_still_checks_shapes():
    layer = BatchNorm(3)
    result = layer.load_state_dict({"weight": np.full(3, 2.0), "extra": np.zeros(1)}, strict=False)
    assert result.missing_keys == ["bias", "running_mean", "running_var"]
    assert result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(layer.weight, [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(layer.bias, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"'weight' has shape \(2,\)"):
        layer.load_state_dict({"weight": np.ones(2)}, strict=False)


# ----------------------------------------------------------------------------------------------
# 5. errors
# ----------------------------------------------------------------------------------------------
CONSTRUCTION_ERRORS = [
    (lambda: BatchNorm(3, eps=0), ValueError, "eps=0"),
    (lambda: BatchNorm(3, eps=-1e-5), ValueError, r"eps=-1e-05"),
    (lambda: LayerNorm(3, eps=float("nan")), ValueError, "eps=nan"),
    (lambda: RMSNorm(3, eps=0.0), ValueError, r"eps=0\.0"),
    (lambda: GroupNorm(2, 4, eps=-1.0), ValueError, r"eps=-1\.0"),
    (lambda: BatchNorm(3, momentum=1.5), ValueError, r"momentum=1\.5"),
    (lambda: InstanceNorm(3, momentum=-0.1), ValueError, r"momentum=-0\.1"),
    (lambda: BatchRenorm(3, momentum=2), ValueError, "momentum=2"),
    (lambda: GroupNorm(4, 6), ValueError,
     r"num_groups=4 does not divide num_channels=6; choose one of \[1, 2, 3, 6\]"),
    (lambda: GroupNorm(0, 6), ValueError, "num_groups=0"),
    (lambda: BatchNorm(0), ValueError, "num_features=0"),
    (lambda: InstanceNorm(2.5), ValueError, r"num_features=2\.5"),
    (lambda: LayerNorm(()), ValueError, "normalized_shape"),
    (lambda: RMSNorm((3, 0)), ValueError, r"\(3, 0\)"),
    (lambda: BatchRenorm(3, r_max=0.5), ValueError, r"r_max=0\.5"),
    (lambda: BatchRenorm(3, d_max=-1.0), ValueError, r"d_max=-1\.0"),
]


@pytest.mark.parametrize("build,exc,match", CONSTRUCTION_ERRORS,
                         ids=[f"{i}-{m[:20]}" for i, (_, _, m) in enumerate(CONSTRUCTION_ERRORS)])
def test_bad_hyperparameters_fail_at_construction(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


INPUT_ERRORS = [
    ("bn-1d", lambda: BatchNorm(3), (4,), True, "at least 2 dimensions.*shape \\(4,\\)"),
    ("bn-channels", lambda: BatchNorm(3), (4, 5), True, "built for 3 channels.*shape \\(4, 5\\) has 5"),
    ("bn-channels-last", lambda: BatchNorm(3, channels_last=True), (4, 3, 5), True, "built for 3 channels.*has 5 on its last"),
    ("bn-one-value", lambda: BatchNorm(3), (1, 3), True, "more than 1 value per channel.*\\(1, 3\\)"),
    ("bn-untracked-eval-one-value", lambda: BatchNorm(3, track_running_stats=False), (1, 3), False,
     "more than 1 value per channel"),
    ("brn-one-value", lambda: BatchRenorm(3), (1, 3, 1), True, "more than 1 value per channel"),
    ("in-2d", lambda: InstanceNorm(3), (4, 3), True, "at least 3 dimensions.*\\(4, 3\\)"),
    ("in-one-spatial", lambda: InstanceNorm(3), (4, 3, 1), True, "more than 1 spatial value.*\\(4, 3, 1\\)"),
    ("in-channels", lambda: InstanceNorm(3), (4, 2, 5), True, "built for 3 channels"),
    ("gn-channels", lambda: GroupNorm(2, 4), (4, 6, 5), True, "built for 4 channels.*has 6"),
    ("ln-shape", lambda: LayerNorm((3, 4)), (2, 4, 3), True, "trailing dimensions \\(3, 4\\).*\\(2, 4, 3\\)"),
    ("rms-shape", lambda: RMSNorm(5), (2, 4), True, "trailing dimensions \\(5,\\).*\\(2, 4\\)"),
]


@pytest.mark.parametrize("build,shape,training,match", [e[1:] for e in INPUT_ERRORS],
                         ids=[e[0] for e in INPUT_ERRORS])
def test_bad_input_is_a_value_error_naming_the_shape_and_changes_nothing(build, shape, training, match):
    layer = build()
    before = snapshot(layer)
    with pytest.raises(ValueError, match=match):
        layer.forward(np.ones(shape, F32), training=training)
    assert_same_state(layer, before)


def test_one_value_per_channel_is_fine_with_running_statistics():
    layer = BatchNorm(3)
    y = layer.forward(np.ones((1, 3), F32), training=False)
    np.testing.assert_allclose(y, np.ones((1, 3)) / np.sqrt(1 + 1e-5), rtol=1e-6)
    inorm = InstanceNorm(3, track_running_stats=True)
    assert inorm.forward(np.ones((2, 3, 1), F32), training=False).shape == (2, 3, 1)


def test_training_flag_must_be_a_bool():
    with pytest.raises(TypeError, match="training='eval'"):
        BatchNorm(3).forward(np.ones((4, 3), F32), "eval")


def test_backward_uses_the_weight_of_its_forward_even_after_an_in_place_update():
    rng = np.random.default_rng(81)
    layer = randomize(LayerNorm(5, dtype=F64), rng)
    x, dy = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    layer.forward(x)
    want = layer.backward(dy)
    layer.forward(x)
    layer.weight -= 0.5           # e.g. an optimizer step between forward and backward
    np.testing.assert_array_equal(layer.backward(dy), want)


def test_backward_before_forward_is_a_clear_error():
    for make in LAYERS.values():
        with pytest.raises(RuntimeError, match="before forward"):
            make(F32).backward(np.ones((2, 3, 5), F32))


def test_backward_after_a_failed_forward_does_not_reuse_the_previous_forward():
    layer = BatchNorm(3)
    layer.forward(np.ones((4, 3), F32) * np.arange(4, dtype=F32)[:, None])
    with pytest.raises(ValueError):
        layer.forward(np.ones((4, 5), F32))
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((4, 3), F32))


def test_backward_with_dy_of_another_shape_is_refused():
    layer = BatchNorm(3)
    layer.forward(np.random.default_rng(0).normal(size=(4, 3)).astype(F32))
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(3, 4\)"):
        layer.backward(np.ones((3, 4), F32))


def test_non_finite_batch_statistics_do_not_corrupt_the_running_statistics():
    layer = BatchNorm(3)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(F32)
    x[2, 1] = np.nan
    before = snapshot(layer)
    # the non-finite policy (docs/reliability.md): "skip" by default, "raise" on request
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) \[1\].*not folded"):
        layer.forward(x)
    assert_same_state(layer, before)
    with pytest.raises(ValueError, match=r"channel\(s\) \[1\].*left unchanged"):
        layer.forward(x, nonfinite="raise")
    assert_same_state(layer, before)
    y = layer.forward(x, training=False)             # eval: normalized, NaN stays where it was
    assert np.isnan(y[2, 1]) and np.isfinite(np.delete(y.ravel(), 2 * 3 + 1)).all()


# ----------------------------------------------------------------------------------------------
# 6. structure, conveniences, docs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,training,method", [
    (LAYERS["BatchNorm"], True, "batch_norm"), (LAYERS["BatchNorm"], False, "batch_norm"),
    (LAYERS["BatchRenorm"], True, "batch_renorm"), (LAYERS["BatchRenorm"], False, "batch_norm"),
    (LAYERS["InstanceNorm"], True, "instance_norm"), (LAYERS["GroupNorm"], True, "group_norm"),
    (LAYERS["LayerNorm"], True, "layer_norm"), (LAYERS["RMSNorm"], True, "rms_norm"),
], ids=["bn-train", "bn-eval", "brn-train", "brn-eval", "in", "gn", "ln", "rms"])
def test_every_layer_computes_through_the_single_ops_pair(monkeypatch, make, training, method):
    """A fused backend replaces _ops entries; a layer computing elsewhere would bypass it."""
    calls = []
    real_forward, real_backward = _ops.forward, _ops.backward

    def spy_forward(name, *args, **kwargs):
        calls.append(("fwd", name))
        return real_forward(name, *args, **kwargs)

    def spy_backward(ctx, dy):
        calls.append(("bwd", ctx.method))
        return real_backward(ctx, dy)

    monkeypatch.setattr(_ops, "forward", spy_forward)
    monkeypatch.setattr(_ops, "backward", spy_backward)
    layer = make(F32)
    y = layer.forward(sample(np.random.default_rng(1), (4, 3, 5), F32), training=training)
    layer.backward(np.ones_like(y))
    assert calls == [("fwd", method), ("bwd", method)]


def test_reset_repr_and_pickle():
    rng = np.random.default_rng(80)
    layer = randomize(BatchNorm(3, momentum=None, channels_last=True), rng)
    layer.forward(sample(rng, (4, 5, 3), F32))
    clone = pickle.loads(pickle.dumps(layer))
    assert_same_state(clone, snapshot(layer))
    layer.reset_parameters()
    np.testing.assert_array_equal(layer.weight, 1.0)
    np.testing.assert_array_equal(layer.bias, 0.0)
    np.testing.assert_array_equal(layer.running_mean, 0.0)
    np.testing.assert_array_equal(layer.running_var, 1.0)
    assert int(layer.num_batches_tracked) == 0
    assert repr(layer) == ("BatchNorm(num_features=3, eps=1e-05, momentum=None, affine=True, "
                           "track_running_stats=True, channels_last=True, dtype=float32)")


@pytest.mark.parametrize("module", [batch_norm_module, instance_norm_module, group_norm_module,
                                    layer_norm_module, normlab.layers],
                         ids=["batch_norm", "instance_norm", "group_norm", "layer_norm", "package"])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------------------------
# backends: the layers run on normlab.kernels


LAYER_FACTORIES = [
    ("BatchNorm", lambda **kw: BatchNorm(3, **kw), (6, 3, 5)),
    ("InstanceNorm", lambda **kw: InstanceNorm(3, affine=True, **kw), (4, 3, 7)),
    ("GroupNorm", lambda **kw: GroupNorm(3, 6, **kw), (4, 6, 5)),
    ("LayerNorm", lambda **kw: LayerNorm((5,), **kw), (4, 3, 5)),
    ("RMSNorm", lambda **kw: RMSNorm((5,), **kw), (4, 3, 5)),
]


@pytest.mark.parametrize("name, make, shape", LAYER_FACTORIES, ids=[f[0] for f in LAYER_FACTORIES])
def test_float32_runs_on_the_numba_kernels_and_agrees_with_the_numpy_backend(name, make, shape):
    pytest.importorskip("numba")
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    x = sample(rng, shape, F32)
    dy = sample(rng, shape, F32, step=1)
    fast, slow = make(), make(backend="numpy")
    y_fast, y_slow = fast.forward(x), slow.forward(x)
    assert fast._ctx.backend == "numba" and slow._ctx.backend == "numpy"
    np.testing.assert_allclose(y_fast, y_slow, **REF_TOL[F32])
    np.testing.assert_allclose(fast.backward(dy), slow.backward(dy), **REF_TOL[F32])
    np.testing.assert_allclose(fast.dweight, slow.dweight, **REF_TOL[F32])


def test_float16_falls_back_to_the_numpy_backend_unless_numba_is_insisted_on():
    x = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float16)
    bn = BatchNorm(3)
    assert bn.forward(x).dtype == np.float16 and bn._ctx.backend == "numpy"
    with pytest.raises(ValueError, match="numba"):
        BatchNorm(3, backend="numba").forward(x)


def test_unknown_backend_is_refused_at_construction():
    with pytest.raises(ValueError, match="backend='cuda-magic'"):
        LayerNorm(4, backend="cuda-magic")
