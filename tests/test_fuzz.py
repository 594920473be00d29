"""Property-based fuzzing of every front end against the float64 reference (normlab.reference).

Front ends: ``normlab.nn.functional``, the ``normlab.nn`` modules (BatchNorm1d/2d/3d,
InstanceNorm1d/2d/3d, LayerNorm, GroupNorm, RMSNorm, SyncBatchNorm, BatchRenorm, GhostBatchNorm,
FrozenBatchNorm), the NumPy layers (``normlab.layers``), the numba kernels called directly
(``normlab.kernels`` numba backend) and ``estimators.BatchNormalizer``.

Each example draws a method's shape (every size from {1, 2, 3, 5, 7, 11, 13}: 1 and primes, so
no kernel tile or chunk divides it evenly), float32 or float64, affine on/off, eps, momentum
(None = cumulative average, with a prior ``num_batches_tracked``), training or eval (random
running statistics), channels-first or channels-last (memory format for torch, physical
``(N, *S, C)`` for the layers and kernels), and data ``loc + scale * N(0, 1)`` with mean/std
ratios up to 1e4. The input is rounded to the dtype and the reference runs on exactly that
rounded input in float64. Compared: the forward output, every gradient (dx, dweight, dbias:
autograd for torch, ``backward`` for the layers and kernels), the running statistics and
``num_batches_tracked`` after a training step. A training batch with one value per statistic
must raise ValueError (the property there is the error).

Error metric: normwise, ``max|got - ref| / max|ref|``, at most ``TOL[dtype]`` (float32: 2e-5,
about 170 float32 roundings, float64: 1e-10).

Profiles (tests/conftest.py): ``ci`` (default) runs ``max_examples`` = 30 examples per test,
derandomized; ``--hypothesis-profile=long`` 800 per test with random draws. The count per test
and in total is in docs/reliability.md.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st

import normlab.nn as N
from normlab import layers as L
from normlab import reference as R
from normlab.estimators import BatchNormalizer
from normlab.kernels import get_backend
from normlab.nn import functional as F
from normlab.reference.rms_norm import resolve_rms_eps

TOL = {"float32": 2e-5, "float64": 1e-10}
SIZES = st.sampled_from([1, 2, 3, 5, 7, 11, 13])
MAX_ELEMS = 4000

METHODS = ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm")
# channels-last is a layout of (N, C, *spatial) methods
CL_METHODS = ("batch_norm", "instance_norm", "group_norm")


# ---------------------------------------------------------------------- drawing cases


@st.composite
def cases(draw, method, *, channels_last_ok=True, momentum_none_ok=True, min_spatial=None):
    c = {"method": method}
    c["dtype"] = draw(st.sampled_from(["float32", "float64"]))
    c["affine"] = draw(st.booleans())
    c["bias"] = draw(st.booleans()) if c["affine"] else False
    c["eps"] = draw(st.sampled_from([1e-5, 1e-3, 0.1, 1.0]))
    c["training"] = draw(st.booleans())
    c["seed"] = draw(st.integers(0, 2**32 - 1))
    c["loc"] = draw(st.sampled_from([0.0, 3.0, -50.0, 1e3]))
    c["scale"] = draw(st.sampled_from([0.1, 1.0, 100.0]))
    moms = [0.0, 0.1, 0.5, 1.0] + ([None] if momentum_none_ok else [])
    c["momentum"] = draw(st.sampled_from(moms))
    c["nbt0"] = draw(st.integers(0, 3))            # num_batches_tracked before the step
    N_ = draw(SIZES)
    if method in ("layer_norm", "rms_norm"):
        lead = draw(st.lists(SIZES, min_size=0, max_size=2))
        norm = draw(st.lists(SIZES, min_size=1, max_size=2))
        shape = tuple([N_] + lead + norm)
        c["normalized_shape"] = tuple(norm)
        if method == "rms_norm":
            c["eps"] = draw(st.sampled_from([None, 1e-6, 1e-3, 0.1]))
    else:
        lo = 1 if min_spatial is None else min_spatial
        lo = max(lo, 1 if method == "instance_norm" else 0)
        spatial = draw(st.lists(SIZES, min_size=lo, max_size=3))
        if method == "group_norm":
            G = draw(st.sampled_from([1, 2, 3]))
            C = G * draw(st.sampled_from([1, 2, 3]))
            c["num_groups"] = G
        else:
            C = draw(st.sampled_from([1, 2, 3, 5]))
        shape = (N_, C, *spatial)
        c["channels_last"] = channels_last_ok and method in CL_METHODS and draw(st.booleans())
    assume(math.prod(shape) <= MAX_ELEMS)
    c["shape"] = shape
    note(repr(c))
    return c


def _channels(c):
    return c["shape"][1] if c["method"] not in ("layer_norm", "rms_norm") else None


def make_data(c):
    """x, dy (rounded to the dtype), weight, bias (parameter shape), running stats (float64)."""
    g = np.random.default_rng(c["seed"])
    dt = np.dtype(c["dtype"])
    x = (c["loc"] + c["scale"] * g.standard_normal(c["shape"])).astype(dt)
    dy = g.standard_normal(c["shape"]).astype(dt)
    pshape = c.get("normalized_shape") or (_channels(c),)
    w = g.uniform(0.5, 1.5, pshape).astype(dt) if c["affine"] else None
    b = g.standard_normal(pshape).astype(dt) if c["bias"] else None
    C = _channels(c)
    rm = (c["loc"] + c["scale"] * g.standard_normal(C)).astype(dt) if C else None
    rv = (c["scale"] ** 2 * g.uniform(0.5, 2.0, C)).astype(dt) if C else None
    return x, dy, w, b, rm, rv


def single_value_stats(c) -> bool:
    """A training batch whose statistics would come from one value (an error by contract)."""
    shape = c["shape"]
    if c["method"] == "batch_norm":
        return math.prod(shape) // shape[1] <= 1
    if c["method"] == "instance_norm":
        return math.prod(shape[2:]) <= 1
    return False


# ---------------------------------------------------------------------- the reference


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def reference(c, x, dy, w, b, rm, rv, *, use_batch_stats=None):
    """Float64 expectations: y, dx, dweight, dbias, and running_mean/var after the step."""
    m, eps = c["method"], c["eps"]
    x64, dy64, w64, b64 = _f64(x), _f64(dy), _f64(w), _f64(b)
    batch = c["training"] if use_batch_stats is None else use_batch_stats
    out = {}
    if m == "batch_norm":
        if batch:
            y, cache = R.batch_norm_forward(x64, w64, b64, eps=eps)
        else:
            y, cache = R.batch_norm_forward(x64, w64, b64, mean=_f64(rm), var=_f64(rv), eps=eps)
        grads = R.batch_norm_backward(dy64, cache)
        if c["training"] and rm is not None:
            nbt = c["nbt0"] + 1
            out["running_mean"], out["running_var"] = R.running_stats_update(
                _f64(rm), _f64(rv), cache["mean"], cache["var"], cache["count"], c["momentum"],
                num_batches_tracked=nbt)
            out["num_batches_tracked"] = nbt
    elif m == "instance_norm":
        if batch:
            y, cache = R.instance_norm_forward(x64, w64, b64, eps=eps)
        else:
            y, cache = R.instance_norm_forward(x64, w64, b64, mean=_f64(rm), var=_f64(rv), eps=eps)
        grads = R.instance_norm_backward(dy64, cache)
        if c["training"] and rm is not None:
            # torch.nn: the mean over the N instances of their updates; momentum None -> 0
            f = 0.0 if c["momentum"] is None else c["momentum"]
            L_ = math.prod(c["shape"][2:])
            mean_n = x64.mean(axis=tuple(range(2, x64.ndim)))
            var_n = x64.var(axis=tuple(range(2, x64.ndim)))
            out["running_mean"] = (1 - f) * _f64(rm) + f * mean_n.mean(0)
            out["running_var"] = (1 - f) * _f64(rv) + f * (var_n * L_ / (L_ - 1)).mean(0)
    elif m == "group_norm":
        y, cache = R.group_norm_forward(x64, c["num_groups"], w64, b64, eps=eps)
        grads = R.group_norm_backward(dy64, cache)
    elif m == "layer_norm":
        y, cache = R.layer_norm_forward(x64, c["normalized_shape"], w64, b64, eps=eps)
        grads = R.layer_norm_backward(dy64, cache)
    else:
        y, cache = R.rms_norm_forward(x64, c["normalized_shape"], w64,
                                      eps=resolve_rms_eps(eps, np.dtype(c["dtype"])))
        grads = R.rms_norm_backward(dy64, cache) + (None,)
    backward = {"batch_norm": R.batch_norm_backward, "instance_norm": R.instance_norm_backward,
                "group_norm": R.group_norm_backward, "layer_norm": R.layer_norm_backward,
                "rms_norm": R.rms_norm_backward}[m]
    out["y"], out["dx"], out["dweight"], out["dbias"] = (y,) + tuple(grads[:3])
    out["_floor"] = {"dx": dx_scale(cache["rstd"], dy64, w64), **sum_floors(backward, dy64, cache)}
    return out


def sum_floors(backward, dy64, cache) -> dict:
    """dweight = sum(dy * xhat) and dbias = sum(dy) are sums that may cancel: their error is
    measured against sum(|dy * xhat|) and sum(|dy|) (the reference backward run on |dy| and
    |xhat|), the scale of a rounding error of the sum."""
    def absolute(k):
        k = dict(k, xhat=np.abs(k["xhat"]))
        if "caches" in k:
            k["caches"] = [dict(v, xhat=np.abs(v["xhat"])) for v in k["caches"]]
        return k
    if "xhat" not in cache and "caches" in cache:
        cache = dict(cache, xhat=np.zeros(1))
    grads = backward(np.abs(dy64), absolute(cache))
    return {k: float(np.max(g, initial=0.0)) for k, g in zip(("dweight", "dbias"), grads[1:3])
            if g is not None}


def dx_scale(rstd, dy64, w64, r=1.0):
    """The size of the terms that dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) cancels:
    where dx itself is ~0 (one value per statistic) its error is measured against these."""
    g = np.max(np.abs(dy64), initial=0.0) * (1.0 if w64 is None else np.max(np.abs(w64), initial=0.0))
    return float(np.max(rstd, initial=0.0) * g * np.max(r, initial=1.0))


def compare(got: dict, want: dict, c, keys=None):
    tol = TOL[c["dtype"]]
    floors = want.get("_floor", {})
    checked = []
    for k in (keys or want):
        if k not in got or k.startswith("_"):
            continue
        g, w = got[k], want[k]
        if w is None:
            assert g is None, f"{k}: expected None (no such parameter), got a value"
            continue
        if k == "num_batches_tracked":
            assert int(g) == int(w), (k, g, w)
            continue
        g = np.asarray(g, dtype=np.float64)
        assert g.shape == np.shape(w), f"{k}: shape {g.shape} != reference {np.shape(w)}"
        assert np.all(np.isfinite(g)), f"{k}: non-finite output"
        scale = max(float(np.max(np.abs(w))) if np.size(w) else 0.0, floors.get(k, 0.0))
        err = float(np.max(np.abs(g - w))) / scale if scale > 0 else float(np.max(np.abs(g), initial=0))
        assert err <= tol, f"{k}: normwise error {err:.3g} > {tol:g} ({c['dtype']})"
        checked.append(k)
    return checked


# ---------------------------------------------------------------------- torch helpers


def _t(a, requires_grad=False):
    if a is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(requires_grad)


def _layout(xt, c):
    if c.get("channels_last"):
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(xt.dim())
        if fmt is not None:
            return xt.detach().contiguous(memory_format=fmt).requires_grad_(xt.requires_grad)
    return xt


def _grads(y, xt, dy, params):
    """Autograd: dx and the parameter gradients (None for absent parameters)."""
    leaves = [xt] + [p for p in params if p is not None]
    gs = torch.autograd.grad(y, leaves, _t(dy), allow_unused=True)
    out, it = [gs[0]], iter(gs[1:])
    for p in params:
        out.append(None if p is None else next(it))
    return [None if g is None else g.detach().numpy() for g in out]


# ---------------------------------------------------------------------- nn.functional


@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
def test_functional_vs_reference(method, data):
    c = data.draw(cases(method, momentum_none_ok=False))
    x, dy, w, b, rm, rv = make_data(c)
    xt = _layout(_t(x, True), c)
    wt, bt = _t(w, True), _t(b, True)
    rmt, rvt = _t(None if rm is None else rm.copy()), _t(None if rv is None else rv.copy())
    if c["training"] and single_value_stats(c):
        with pytest.raises(ValueError):
            _run_functional(c, xt, wt, bt, rmt, rvt)
        return
    y = _run_functional(c, xt, wt, bt, rmt, rvt)
    assert y.dtype == xt.dtype and y.shape == xt.shape
    got = {"y": y.detach().numpy()}
    got["dx"], got["dweight"], got["dbias"] = _grads(y, xt, dy, [wt, bt])
    if method in ("batch_norm", "instance_norm") and c["training"]:
        got["running_mean"], got["running_var"] = rmt.numpy(), rvt.numpy()
    compare(got, reference(c, x, dy, w, b, rm, rv), c)


def _run_functional(c, xt, wt, bt, rmt, rvt):
    m, eps = c["method"], c["eps"]
    if m == "batch_norm":
        return F.batch_norm(xt, rmt, rvt, wt, bt, c["training"], c["momentum"], eps)
    if m == "instance_norm":
        if c["training"]:
            return F.instance_norm(xt, rmt, rvt, wt, bt, True, c["momentum"], eps)
        return F.instance_norm(xt, rmt, rvt, wt, bt, False, c["momentum"], eps)
    if m == "group_norm":
        return F.group_norm(xt, c["num_groups"], wt, bt, eps)
    if m == "layer_norm":
        return F.layer_norm(xt, c["normalized_shape"], wt, bt, eps)
    return F.rms_norm(xt, c["normalized_shape"], wt, eps)


# ---------------------------------------------------------------------- nn modules


def _module(c):
    m, C, eps, ndim = c["method"], _channels(c), c["eps"], len(c["shape"])
    kw = dict(dtype=getattr(torch, c["dtype"]))
    if m == "batch_norm":
        cls = {2: N.BatchNorm1d, 3: N.BatchNorm1d, 4: N.BatchNorm2d, 5: N.BatchNorm3d}.get(ndim)
        if cls is None or c.get("sync"):
            cls = N.SyncBatchNorm
        mod = cls(C, eps=eps, momentum=c["momentum"], affine=c["affine"], **kw)
    elif m == "instance_norm":
        cls = {3: N.InstanceNorm1d, 4: N.InstanceNorm2d, 5: N.InstanceNorm3d}[ndim]
        mod = cls(C, eps=eps, momentum=c["momentum"], affine=c["affine"],
                  track_running_stats=True, **kw)
    elif m == "group_norm":
        mod = N.GroupNorm(c["num_groups"], C, eps=eps, affine=c["affine"], **kw)
    elif m == "layer_norm":
        mod = N.LayerNorm(c["normalized_shape"], eps=eps, elementwise_affine=c["affine"],
                          bias=c["bias"], **kw)
    else:
        mod = N.RMSNorm(c["normalized_shape"], eps=eps, elementwise_affine=c["affine"], **kw)
    return mod


def _module_case(c):
    """Modules tie bias to affine except LayerNorm (torch's constructors)."""
    if c["method"] not in ("layer_norm", "rms_norm"):
        c["bias"] = c["affine"]
    if c["method"] == "rms_norm":
        c["bias"] = False
    if c["method"] == "instance_norm":
        assume(len(c["shape"]) <= 5)
    if c["method"] == "batch_norm":
        # BatchNorm1d/2d/3d take 2-5 dims; other ranks go to SyncBatchNorm (any rank)
        c["sync"] = len(c["shape"]) > 5
    return c


def _set_params(mod, w, b, rm, rv, nbt0):
    with torch.no_grad():
        if getattr(mod, "weight", None) is not None:
            mod.weight.copy_(_t(w))
        if getattr(mod, "bias", None) is not None:
            mod.bias.copy_(_t(b))
        if getattr(mod, "running_mean", None) is not None:
            mod.running_mean.copy_(_t(rm))
            mod.running_var.copy_(_t(rv))
        if getattr(mod, "num_batches_tracked", None) is not None:
            mod.num_batches_tracked.fill_(nbt0)


def _module_outputs(mod, c, x, dy):
    xt = _layout(_t(x, True), c)
    y = mod(xt)
    assert y.dtype == xt.dtype and y.shape == xt.shape
    got = {"y": y.detach().numpy()}
    params = [getattr(mod, "weight", None), getattr(mod, "bias", None)]
    params = [p if isinstance(p, torch.nn.Parameter) else None for p in params]
    got["dx"], got["dweight"], got["dbias"] = _grads(y, xt, dy, params)
    if getattr(mod, "running_mean", None) is not None and c["training"]:
        got["running_mean"] = mod.running_mean.numpy()
        got["running_var"] = mod.running_var.numpy()
        if getattr(mod, "num_batches_tracked", None) is not None and c["method"] == "batch_norm":
            got["num_batches_tracked"] = mod.num_batches_tracked
    return got


@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
def test_modules_vs_reference(method, data):
    c = _module_case(data.draw(cases(method)))
    x, dy, w, b, rm, rv = make_data(c)
    mod = _module(c)
    _set_params(mod, w, b, rm, rv, c["nbt0"])
    mod.train(c["training"])
    if c["training"] and single_value_stats(c):
        with pytest.raises(ValueError):
            mod(_t(x))
        return
    compare(_module_outputs(mod, c, x, dy), reference(c, x, dy, w, b, rm, rv), c)


@pytest.mark.parametrize("variant", ["BatchRenorm", "GhostBatchNorm", "FrozenBatchNorm", "SyncBatchNorm"])
@given(data=st.data())
def test_variant_modules_vs_reference(variant, data):
    c = data.draw(cases("batch_norm", min_spatial=0))
    c["bias"] = c["affine"]
    assume(len(c["shape"]) <= 5)
    ndim = len(c["shape"])
    dim = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}[ndim]
    x, dy, w, b, rm, rv = make_data(c)
    C, eps, kw = c["shape"][1], c["eps"], dict(dtype=getattr(torch, c["dtype"]))
    x64, dy64, w64, b64 = _f64(x), _f64(dy), _f64(w), _f64(b)
    want = None
    if variant == "BatchRenorm":
        r_max = data.draw(st.sampled_from([1.0, 1.5, 3.0]), "r_max")
        d_max = data.draw(st.sampled_from([0.0, 0.5, 5.0]), "d_max")
        mod = getattr(N, f"BatchRenorm{dim}")(C, eps=eps, momentum=c["momentum"], r_max=r_max,
                                              d_max=d_max, affine=c["affine"], **kw)
        if c["training"]:
            if single_value_stats(c):
                return
            y, cache = R.batch_renorm_forward(x64, _f64(rm), _f64(rv), w64, b64, r_max=r_max,
                                              d_max=d_max, eps=eps)
            dx, dw, db = R.batch_renorm_backward(dy64, cache)
            nbt = c["nbt0"] + 1
            rmn, rvn = R.running_stats_update(_f64(rm), _f64(rv), cache["batch_mean"] if
                                              "batch_mean" in cache else cache["mean"],
                                              cache["batch_var"] if "batch_var" in cache else cache["var"],
                                              math.prod(c["shape"]) // C, c["momentum"],
                                              num_batches_tracked=nbt)
            want = dict(y=y, dx=dx, dweight=dw, dbias=db, running_mean=rmn, running_var=rvn,
                        num_batches_tracked=nbt,
                        _floor={"dx": dx_scale(cache["rstd"], dy64, w64, cache["r"]),
                                **sum_floors(R.batch_renorm_backward, dy64, cache)})
    elif variant == "GhostBatchNorm":
        vbs = data.draw(st.sampled_from([1, 2, 3, 5]), "virtual_batch_size")
        mod = getattr(N, f"GhostBatchNorm{dim}")(C, virtual_batch_size=vbs, eps=eps,
                                                 momentum=c["momentum"], affine=c["affine"], **kw)
        if c["training"]:
            from normlab.reference import virtual_batch_slices
            slices = virtual_batch_slices(c["shape"][0], vbs)
            if any(math.prod(x[s].shape) // C <= 1 for s in slices):
                mod.train()
                _set_params(mod, w, b, rm, rv, c["nbt0"])
                with pytest.raises(ValueError):
                    mod(_t(x))
                return
            y, cache = R.ghost_batch_norm_forward(x64, w64, b64, virtual_batch_size=vbs, eps=eps)
            dx, dw, db = R.ghost_batch_norm_backward(dy64, cache)
            axes = (0,) + tuple(range(2, ndim))
            nbt = c["nbt0"] + 1
            rmn, rvn = R.running_stats_update(_f64(rm), _f64(rv), x64.mean(axis=axes),
                                              x64.var(axis=axes), math.prod(c["shape"]) // C,
                                              c["momentum"], num_batches_tracked=nbt)
            want = dict(y=y, dx=dx, dweight=dw, dbias=db, running_mean=rmn, running_var=rvn,
                        num_batches_tracked=nbt,
                        _floor={"dx": max(dx_scale(k["rstd"], dy64, w64) for k in cache["caches"]),
                                **sum_floors(R.ghost_batch_norm_backward, dy64, cache)})
    elif variant == "FrozenBatchNorm":
        mod = getattr(N, f"FrozenBatchNorm{dim}")(C, eps=eps, **kw)
        c["affine"] = c["bias"] = True        # buffers, always applied; no parameter gradients
        x, dy, w, b, rm, rv = make_data(c)
        y, cache = R.batch_norm_forward(_f64(x), _f64(w), _f64(b), mean=_f64(rm), var=_f64(rv),
                                        eps=eps)
        dx = R.batch_norm_backward(_f64(dy), cache)[0]
        want = dict(y=y, dx=dx)
    else:   # SyncBatchNorm without a process group: batch norm, any rank
        c["sync"] = True
        mod = _module(c)
    _set_params(mod, w, b, rm, rv, c["nbt0"])
    mod.train(c["training"])
    if want is None:
        if c["training"] and single_value_stats(c):
            with pytest.raises(ValueError):
                mod(_t(x))
            return
        want = reference(c, x, dy, w, b, rm, rv)
    got = _module_outputs(mod, c, x, dy)
    if variant == "FrozenBatchNorm":
        got = {k: got[k] for k in ("y", "dx")}
    compare(got, want, c)


# ---------------------------------------------------------------------- NumPy layers


def _layer(c):
    m, C, eps = c["method"], _channels(c), c["eps"]
    kw = dict(dtype=np.dtype(c["dtype"]))
    cl = dict(channels_last=bool(c.get("channels_last")))
    if m == "batch_norm":
        return L.BatchNorm(C, eps=eps, momentum=c["momentum"], affine=c["affine"], **cl, **kw)
    if m == "instance_norm":
        return L.InstanceNorm(C, eps=eps, momentum=c["momentum"], affine=c["affine"],
                              track_running_stats=True, **cl, **kw)
    if m == "group_norm":
        return L.GroupNorm(c["num_groups"], C, eps=eps, affine=c["affine"], bias=c["bias"], **cl, **kw)
    if m == "layer_norm":
        return L.LayerNorm(c["normalized_shape"], eps=eps, elementwise_affine=c["affine"],
                           bias=c["bias"], **kw)
    return L.RMSNorm(c["normalized_shape"], eps=eps, elementwise_affine=c["affine"], **kw)


def _to_cl(a, c):
    """(N, C, *S) -> (N, *S, C) when the case is channels-last (physical layout)."""
    if a is None or not c.get("channels_last"):
        return a
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
def test_layers_vs_reference(method, data):
    c = data.draw(cases(method))
    if method in ("batch_norm", "instance_norm"):
        c["bias"] = c["affine"]
    if method == "rms_norm":
        c["bias"] = False
    x, dy, w, b, rm, rv = make_data(c)
    layer = _layer(c)
    if layer.weight is not None:
        layer.weight[...] = w
    if layer.bias is not None:
        layer.bias[...] = b
    if layer.running_mean is not None:
        layer.running_mean[...] = rm
        layer.running_var[...] = rv
        layer.num_batches_tracked[...] = c["nbt0"]
    if c["training"] and single_value_stats(c):
        with pytest.raises(ValueError):
            layer.forward(_to_cl(x, c), training=True)
        return
    y = layer.forward(_to_cl(x, c), training=c["training"])
    dx = layer.backward(_to_cl(dy, c))
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    back = (lambda a: a) if not c.get("channels_last") else (lambda a: np.moveaxis(a, -1, 1))
    got = {"y": back(y), "dx": back(dx), "dweight": layer.dweight, "dbias": layer.dbias}
    if layer.running_mean is not None and c["training"]:
        got["running_mean"], got["running_var"] = layer.running_mean, layer.running_var
        if method == "batch_norm":
            got["num_batches_tracked"] = layer.num_batches_tracked
    compare(got, reference(c, x, dy, w, b, rm, rv), c)


@given(data=st.data())
def test_batch_renorm_layer_vs_reference(data):
    c = data.draw(cases("batch_norm"))
    c["bias"] = c["affine"]
    assume(not single_value_stats(c))
    r_max = data.draw(st.sampled_from([1.0, 1.5, 3.0]), "r_max")
    d_max = data.draw(st.sampled_from([0.0, 0.5, 5.0]), "d_max")
    x, dy, w, b, rm, rv = make_data(c)
    layer = L.BatchRenorm(c["shape"][1], eps=c["eps"], momentum=c["momentum"], affine=c["affine"],
                          r_max=r_max, d_max=d_max, channels_last=bool(c.get("channels_last")),
                          dtype=np.dtype(c["dtype"]))
    if layer.weight is not None:
        layer.weight[...], layer.bias[...] = w, b
    layer.running_mean[...], layer.running_var[...] = rm, rv
    layer.num_batches_tracked[...] = c["nbt0"]
    y = layer.forward(_to_cl(x, c), training=c["training"])
    dx = layer.backward(_to_cl(dy, c))
    back = (lambda a: a) if not c.get("channels_last") else (lambda a: np.moveaxis(a, -1, 1))
    got = {"y": back(y), "dx": back(dx), "dweight": layer.dweight, "dbias": layer.dbias}
    if c["training"]:
        ref_y, cache = R.batch_renorm_forward(_f64(x), _f64(rm), _f64(rv), _f64(w), _f64(b),
                                              r_max=r_max, d_max=d_max, eps=c["eps"])
        dxr, dwr, dbr = R.batch_renorm_backward(_f64(dy), cache)
        want = dict(y=ref_y, dx=dxr, dweight=dwr, dbias=dbr,
                    _floor={"dx": dx_scale(cache["rstd"], _f64(dy), _f64(w), cache["r"]),
                            **sum_floors(R.batch_renorm_backward, _f64(dy), cache)})
    else:
        want = reference(c, x, dy, w, b, rm, rv)
        want.pop("running_mean", None)
    compare(got, want, c)


# ---------------------------------------------------------------------- numba kernels


@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
def test_numba_kernels_vs_reference(method, data):
    c = data.draw(cases(method))
    if method == "rms_norm":
        c["bias"] = False
    if method in ("batch_norm", "instance_norm"):
        c["bias"] = c["affine"] and c["bias"]
    c["training"] = c["training"] or method != "batch_norm"     # only BN takes given statistics
    assume(not (c["training"] and single_value_stats(c)))
    x, dy, w, b, rm, rv = make_data(c)
    be = get_backend("numba", dtype=x.dtype)
    xk, dyk, cl = _to_cl(x, c), _to_cl(dy, c), bool(c.get("channels_last"))
    need_w = w is not None
    if method == "batch_norm":
        if c["training"]:
            y, mean, var, rstd = be.batch_norm_forward(xk, w, b, c["eps"], channels_last=cl)
        else:
            y, mean, var, rstd = be.batch_norm_forward(xk, w, b, c["eps"], channels_last=cl,
                                                       mean=rm, var=rv)
        dx, dw, db = be.batch_norm_backward(dyk, xk, w, mean, rstd, channels_last=cl,
                                            training=c["training"], need_weight_grad=need_w,
                                            need_bias_grad=b is not None)
    elif method == "instance_norm":
        y, mean, var, rstd = be.instance_norm_forward(xk, w, b, c["eps"], channels_last=cl)
        dx, dw, db = be.instance_norm_backward(dyk, xk, w, mean, rstd, channels_last=cl,
                                               need_weight_grad=need_w, need_bias_grad=b is not None)
    elif method == "group_norm":
        y, mean, rstd = be.group_norm_forward(xk, c["num_groups"], w, b, c["eps"], channels_last=cl)
        dx, dw, db = be.group_norm_backward(dyk, xk, c["num_groups"], w, mean, rstd,
                                            channels_last=cl, need_weight_grad=need_w,
                                            need_bias_grad=b is not None)
    elif method == "layer_norm":
        y, mean, rstd = be.layer_norm_forward(x, c["normalized_shape"], w, b, c["eps"])
        dx, dw, db = be.layer_norm_backward(dy, x, c["normalized_shape"], w, mean, rstd,
                                            need_weight_grad=need_w, need_bias_grad=b is not None)
    else:
        y, rstd = be.rms_norm_forward(x, c["normalized_shape"], w, c["eps"])
        dx, dw = be.rms_norm_backward(dy, x, c["normalized_shape"], w, rstd,
                                      need_weight_grad=need_w)
        db = None
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    back = (lambda a: a) if not cl else (lambda a: np.moveaxis(a, -1, 1))
    got = {"y": back(y), "dx": back(dx), "dweight": dw, "dbias": db}
    want = reference(c, x, dy, w, b, rm, rv)
    compare(got, want, c, keys=("y", "dx", "dweight", "dbias"))
    if method in ("batch_norm", "instance_norm") and c["training"]:
        # the statistics the kernel returns: biased var of the batch (instance), in x's dtype
        axes = (0,) + tuple(range(2, x.ndim)) if method == "batch_norm" else tuple(range(2, x.ndim))
        compare({"mean": mean, "var": var},
                {"mean": _f64(x).mean(axis=axes), "var": _f64(x).var(axis=axes)}, c)


# ---------------------------------------------------------------------- estimator


@given(seed=st.integers(0, 2**32 - 1), n=SIZES, f=SIZES, batches=st.integers(1, 4),
       momentum=st.sampled_from([None, 0.1, 0.5, 1.0]), eps=st.sampled_from([1e-5, 1e-3, 1.0]),
       loc=st.sampled_from([0.0, 3.0, 1e3]), scale=st.sampled_from([0.1, 1.0, 100.0]),
       dtype=st.sampled_from(["float32", "float64"]), affine=st.booleans())
def test_batch_normalizer_vs_reference(seed, n, f, batches, momentum, eps, loc, scale, dtype, affine):
    g = np.random.default_rng(seed)
    parts = [(loc + scale * g.standard_normal((n, f))).astype(dtype) for _ in range(batches)]
    gamma = g.uniform(0.5, 1.5, f) if affine else 1.0
    beta = g.standard_normal(f) if affine else 0.0
    est = BatchNormalizer(eps=eps, momentum=momentum, gamma=gamma, beta=beta)
    for p in parts:
        est.partial_fit(p)
    # reference statistics: exact over all rows, or torch.nn's EMA of batch statistics
    p64 = [_f64(p) for p in parts]
    if momentum is None:
        allx = np.concatenate(p64)
        mean, var = allx.mean(0), allx.var(0)
    else:
        mean, var = p64[0].mean(0), p64[0].var(0)
        for p in p64[1:]:
            mean = (1 - momentum) * mean + momentum * p.mean(0)
            var = (1 - momentum) * var + momentum * p.var(0)
    c = {"dtype": "float64"}      # the estimator's statistics are float64 whatever X's dtype
    compare({"mean": est.mean_, "var": est.var_}, {"mean": mean, "var": var}, c)
    xt = (loc + scale * g.standard_normal((n, f))).astype(dtype)
    y, _ = R.batch_norm_forward(_f64(xt), np.broadcast_to(gamma, (f,)), np.broadcast_to(beta, (f,)),
                                mean=mean, var=var, eps=eps)
    out = est.transform(xt)
    assert out.dtype == xt.dtype                   # float32 stays float32
    compare({"y": out}, {"y": y}, {"dtype": dtype})
    back = est.inverse_transform(out)
    compare({"x": back}, {"x": _f64(xt)}, {"dtype": "float32"})


# ---------------------------------------------------------------------- regressions
# Found by the long profile (BatchRenorm) and by extending its float32 offset cases to
# SyncBatchNorm's multi-rank path: statistics computed outside the fused kernels in float32.


@pytest.mark.parametrize("loc", [1e3, 1e4])
def test_batch_renorm_module_float32_large_offset(loc):
    """r and d from float32 statistics were off by half an ulp of the mean over sigma (8.5e-5
    normwise at mean/std = 1e4); they are now accumulated in float64 on CPU."""
    c = dict(method="batch_norm", dtype="float32", affine=False, bias=False, eps=1e-5,
             training=True, seed=0, loc=loc, scale=0.1 if loc == 1e3 else 1.0, momentum=0.1,
             nbt0=0, shape=(2, 2))
    for shape in [(2, 2), (8, 3, 5)]:
        c["shape"] = shape
        x, dy, _, _, rm, rv = make_data(c)
        mod = N.BatchRenorm1d(shape[1], r_max=3.0, d_max=5.0, affine=False)
        _set_params(mod, None, None, rm, rv, 0)
        y, cache = R.batch_renorm_forward(_f64(x), _f64(rm), _f64(rv), r_max=3.0, d_max=5.0,
                                          eps=1e-5)
        dx = R.batch_renorm_backward(_f64(dy), cache)[0]
        want = dict(y=y, dx=dx, _floor={"dx": dx_scale(cache["rstd"], _f64(dy), None, cache["r"])})
        compare(_module_outputs(mod.train(), c, x, dy), want, c, keys=("y", "dx"))


def _fake_two_ranks(monkeypatch):
    """Two ranks holding the same batch: the global batch is it twice (same mean and var)."""
    import normlab.nn.sync_batch_norm as sbn

    monkeypatch.setattr(sbn, "_group_size", lambda pg: 2)

    def all_gather(out, local, group=None):
        for o in out:
            o.copy_(local)

    monkeypatch.setattr(sbn.dist, "all_gather", all_gather)
    monkeypatch.setattr(sbn.dist, "all_reduce", lambda t, group=None: t.mul_(2))


@pytest.mark.parametrize("loc,scale", [(1e3, 0.1), (1e4, 1.0), (1e5, 1.0)])
def test_sync_batch_norm_ranks_float32_large_offset(monkeypatch, loc, scale):
    """The merged float64 mean rounded to float32 cost up to half an ulp of the mean over sigma
    (6e-5 normwise at 1e3 / 0.1, 1e-3 at 1e5 / 1); the rounding residual is now folded into
    the shift, so the multi-rank path is as accurate as single-process batch norm."""
    _fake_two_ranks(monkeypatch)
    c = dict(method="batch_norm", dtype="float32", affine=True, bias=True, eps=1e-5,
             training=True, seed=1, loc=loc, scale=scale, momentum=0.1, nbt0=0, shape=(16, 3, 8))
    x, dy, w, b, rm, rv = make_data(c)
    mod = N.SyncBatchNorm(3)
    _set_params(mod, w, b, rm, rv, 0)
    got = _module_outputs(mod.train(), c, x, dy)
    want = reference(c, x, dy, w, b, rm, rv)
    # the global batch is the local one twice: same statistics, twice the count
    M = math.prod(c["shape"]) // 3
    want["running_var"] = (1 - 0.1) * _f64(rv) + 0.1 * _f64(x).var(axis=(0, 2)) * (2 * M) / (2 * M - 1)
    compare(got, want, c, keys=("y", "dx", "dweight", "dbias", "running_mean", "running_var"))
