"""normlab.kernels.triton_gpu: the Triton kernels against the float64 reference, on CPU tensors in
the Triton interpreter, and compiled for an H100 (sm_90) without a GPU.

Skipped when triton is not installed (it is in the ``test`` extra). The interpreter decides at
``triton.jit`` time, so this module sets ``TRITON_INTERPRET=1`` only while it imports (or, if
something imported it before, reloads) ``normlab.kernels.triton_gpu``, and restores the
environment: other test modules in the same process see the variable as they left it. The
kernels keep running interpreted (``triton_gpu.INTERPRET``). The interpreter runs every program
of a grid in Python: shapes are small, and ``small_blocks`` shrinks the block sizes and the
persistent grid so that the looped, multi-block and multi-program paths run on them.

Tolerances are per dtype: the reference is evaluated in float64 on the inputs as rounded to the
tested dtype, so the error is the output's rounding plus float32 accumulation.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from normlab import kernels  # noqa: E402
from normlab import reference as R  # noqa: E402


def _load_interpreted():
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mod = sys.modules.get("normlab.kernels.triton_gpu")
        if mod is None:
            mod = importlib.import_module("normlab.kernels.triton_gpu")
        elif not mod.INTERPRET:
            mod = importlib.reload(mod)
    finally:
        if prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = prev
    return mod


T = _load_interpreted()

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = [F32, F16, BF16]
IDS = ["f32", "f16", "bf16"]
#: relative tolerance per dtype (atol is this times max(1, max|expected|))
TOL = {F32: 1e-4, F16: 6e-3, BF16: 4e-2, F64: 1e-10}
EPS = 1e-5


def close(actual, expected, dtype, what):
    assert actual is not None, f"{what}: got None"
    a = actual.detach().double().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    tol = TOL[dtype]
    scale = max(1.0, float(np.abs(e).max())) if e.size else 1.0
    np.testing.assert_allclose(a, e, rtol=tol, atol=tol * scale, err_msg=what)


def rand(shape, dtype, seed, offset=0.0, scale=1.0):
    """A tensor of ``dtype`` and its float64 values (the reference's input)."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=F64) * scale + offset).to(dtype)
    return t, t.double().numpy()


def param(shape, dtype, seed, lo):
    g = torch.Generator().manual_seed(seed)
    t = (torch.rand(shape, generator=g, dtype=F64) + lo).to(dtype)
    return t, t.double().numpy()


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny blocks and grids: looped rows, several planes/row tiles/column blocks per kernel,
    several programs of the persistent grids (with an uneven last one)."""
    for name, value in (("ROW_BLOCK_MAX", 8), ("ROW_LOOP_BLOCK", 8), ("PLANE_BLOCK_R", 2),
                        ("PLANE_BLOCK_S", 8), ("PLANE_TILE", 16), ("COL_BLOCK_M", 4),
                        ("COL_BLOCK_K", 4), ("APPLY_BLOCK_R", 4), ("APPLY_BLOCK_C", 8),
                        ("APPLY_TILE", 32), ("FIN_TILE", 2), ("SUM_BLOCK", 4)):
        monkeypatch.setattr(T, name, value)
    monkeypatch.setattr(T, "programs", lambda work, device, per_sm=4: max(1, min(work, 12)))


@pytest.fixture(params=[False, True], ids=["onepass", "looped"])
def blocks(request, monkeypatch):
    if request.param:
        request.getfixturevalue("small_blocks")
    return request.param


# --- LayerNorm / RMSNorm ---------------------------------------------------------------------

ROW_CASES = [((5, 37), (37,)), ((1, 37), (37,)), ((2, 3, 4, 6), (4, 6))]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_layer_norm_matches_reference(dtype, affine, blocks):
    for i, (shape, ns) in enumerate(ROW_CASES):
        x, xn = rand(shape, dtype, i, offset=3.0, scale=2.0)
        dy, dyn = rand(shape, dtype, 10 + i)
        w, wn = param(ns, dtype, 20 + i, 0.5) if affine else (None, None)
        b, bn = param(ns, dtype, 30 + i, -0.5) if affine else (None, None)
        y, mean, rstd = T.layer_norm_forward(x, ns, w, b, EPS)
        yr, c = R.layer_norm_forward(xn, ns, wn, bn, eps=EPS)
        lead = shape[:len(shape) - len(ns)]
        assert y.dtype == dtype and mean.dtype == rstd.dtype == (F32 if dtype != F64 else F64)
        close(y, yr, dtype, f"y {shape}")
        close(mean, c["mean"].reshape(lead), F32, f"mean {shape}")
        close(rstd, c["rstd"].reshape(lead), F32, f"rstd {shape}")
        dx, dw, db = T.layer_norm_backward(dy, x, ns, w, mean, rstd)
        dxr, dwr, dbr = R.layer_norm_backward(dyn, c)
        close(dx, dxr, dtype, f"dx {shape}")
        if affine:
            assert dw.dtype == db.dtype == dtype
            close(dw, dwr, dtype, f"dweight {shape}")
            close(db, dbr, dtype, f"dbias {shape}")
        else:
            assert dw is None and db is None


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_rms_norm_matches_reference(dtype, affine, blocks):
    for i, (shape, ns) in enumerate(ROW_CASES):
        x, xn = rand(shape, dtype, i, offset=1.0, scale=2.0)
        dy, dyn = rand(shape, dtype, 10 + i)
        w, wn = param(ns, dtype, 20 + i, 0.5) if affine else (None, None)
        y, rstd = T.rms_norm_forward(x, ns, w, EPS)
        yr, c = R.rms_norm_forward(xn, ns, wn, eps=EPS)
        close(y, yr, dtype, f"y {shape}")
        close(rstd, c["rstd"].reshape(shape[:len(shape) - len(ns)]), F32, "rstd")
        dx, dw = T.rms_norm_backward(dy, x, ns, w, rstd)
        dxr, dwr, _ = R.rms_norm_backward(dyn, c)
        close(dx, dxr, dtype, f"dx {shape}")
        if affine:
            close(dw, dwr, dtype, f"dweight {shape}")
        else:
            assert dw is None


def test_rms_norm_eps_none_is_torchs():
    x, xn = rand((3, 10), F16, 0)
    _, rstd = T.rms_norm_forward(x, (10,), None, None)
    _, c = R.rms_norm_forward(xn, (10,), None, eps=float(torch.finfo(F32).eps))
    close(rstd, c["rstd"].reshape(3), F32, "rstd with float32's eps for float16 input")


@pytest.mark.parametrize("method", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_fused_residual_add_returns_the_sum_and_its_gradient(method, dtype, blocks):
    shape, ns = (4, 21), (21,)
    x, _ = rand(shape, dtype, 0, offset=1.0)
    res, _ = rand(shape, dtype, 1)
    dy, dyn = rand(shape, dtype, 2)
    dsum, dsumn = rand(shape, dtype, 3)
    w, wn = param(ns, dtype, 4, 0.5)
    s_exact = (x + res)                              # torch rounds the sum to dtype as well
    sn = s_exact.double().numpy()
    if method == "layer_norm":
        b, bn = param(ns, dtype, 5, -0.5)
        y, s, mean, rstd = T.add_layer_norm_forward(x, res, ns, w, b, EPS)
        yr, c = R.layer_norm_forward(sn, ns, wn, bn, eps=EPS)
        ds, dw, db = T.add_layer_norm_backward(dy, dsum, s, ns, w, mean, rstd)
        dxr, dwr, dbr = R.layer_norm_backward(dyn, c)
        close(db, dbr, dtype, "dbias")
    else:
        y, s, rstd = T.add_rms_norm_forward(x, res, ns, w, EPS)
        yr, c = R.rms_norm_forward(sn, ns, wn, eps=EPS)
        ds, dw = T.add_rms_norm_backward(dy, dsum, s, ns, w, rstd)
        dxr, dwr, _ = R.rms_norm_backward(dyn, c)
    close(s, sn, dtype, "sum")
    close(y, yr, dtype, "y")
    close(ds, dxr + dsumn, dtype, "gradient of the sum (from y and from the returned sum)")
    close(dw, dwr, dtype, "dweight")


def test_layer_norm_backward_refines_a_rounded_mean():
    x, xn = rand((3, 40), F32, 0, offset=1000.0)
    dy, dyn = rand((3, 40), F32, 1)
    y, mean, rstd = T.layer_norm_forward(x, (40,), None, None, EPS)
    _, c = R.layer_norm_forward(xn, (40,), eps=EPS)
    off = mean + 0.01                                 # a mean off by far more than rounding
    dx, _, _ = T.layer_norm_backward(dy, x, (40,), None, off, rstd)
    close(dx, R.layer_norm_backward(dyn, c)[0], F32, "dx from a perturbed mean")


# --- BatchNorm / GroupNorm / InstanceNorm ---------------------------------------------------

# (shape, channels_last): (N, C) is one layout; channels-last arrays are (N, *S, C)
CHANNEL_CASES = [((7, 3), False), ((1, 5), False), ((2, 4, 3, 5), False), ((2, 4, 3, 5), True),
                 ((3, 6, 11), False), ((3, 6, 11), True)]


def _channel_inputs(shape, cl, dtype, seed, offset=3.0):
    x, xn = rand(shape, dtype, seed, offset=offset, scale=2.0)
    dy, dyn = rand(shape, dtype, seed + 1)
    if cl:
        x, dy = x.movedim(1, -1).contiguous(), dy.movedim(1, -1).contiguous()
        xn, dyn = np.ascontiguousarray(np.moveaxis(xn, 1, -1)), np.ascontiguousarray(np.moveaxis(dyn, 1, -1))
    return x, xn, dy, dyn


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_batch_norm_matches_reference(dtype, training, small_blocks):
    for i, (shape, cl) in enumerate(CHANNEL_CASES):
        if training and shape[0] * int(np.prod(shape[2:])) < 2:
            continue                                   # one value per channel: not trainable
        x, xn, dy, dyn = _channel_inputs(shape, cl, dtype, i)
        C = shape[1]
        affine = i % 3 != 2
        w, wn = param((C,), dtype, 20 + i, 0.5) if affine else (None, None)
        b, bn = param((C,), dtype, 30 + i, -0.5) if affine else (None, None)
        stats, statsn = {}, {}
        if not training:
            m, mn = rand((C,), F32, 40 + i, offset=3.0)
            v, vn = param((C,), F32, 50 + i, 0.5)
            stats, statsn = dict(mean=m, var=v), dict(mean=mn, var=vn)
        tag = f"{shape} cl={cl} affine={affine}"
        y, mean, var, rstd = T.batch_norm_forward(x, w, b, EPS, channels_last=cl, **stats)
        yr, c = R.batch_norm_forward(xn, wn, bn, eps=EPS, channels_last=cl, **statsn)
        assert y.dtype == dtype and y.shape == x.shape
        close(y, yr, dtype, f"y {tag}")
        close(mean, c["mean"], F32, f"mean {tag}")
        close(var, c["var"], F32, f"var {tag}")
        close(rstd, 1 / np.sqrt(c["var"] + EPS), F32, f"rstd {tag}")
        dx, dw, db = T.batch_norm_backward(dy, x, w, mean, rstd, channels_last=cl,
                                           training=training)
        dxr, dwr, dbr = R.batch_norm_backward(dyn, c)
        close(dx, dxr, dtype, f"dx {tag}")
        if affine:
            close(dw, dwr, dtype, f"dweight {tag}")
            close(db, dbr, dtype, f"dbias {tag}")
        else:
            assert dw is None and db is None


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_group_norm_matches_reference(dtype, small_blocks):
    for i, (shape, cl) in enumerate(CHANNEL_CASES[2:] + [((5, 6), False), ((2, 6, 2, 3, 4), True)]):
        C = shape[1]
        for G in (1, 2, C):
            x, xn, dy, dyn = _channel_inputs(shape, cl, dtype, i + G)
            w, wn = param((C,), dtype, 20 + i, 0.5)
            b, bn = param((C,), dtype, 30 + i, -0.5)
            tag = f"{shape} cl={cl} G={G}"
            y, mean, rstd = T.group_norm_forward(x, G, w, b, EPS, channels_last=cl)
            yr, c = R.group_norm_forward(xn, G, wn, bn, eps=EPS, channels_last=cl)
            close(y, yr, dtype, f"y {tag}")
            close(mean, c["mean"], F32, f"mean {tag}")
            close(rstd, 1 / np.sqrt(c["var"] + EPS), F32, f"rstd {tag}")
            dx, dw, db = T.group_norm_backward(dy, x, G, w, mean, rstd, channels_last=cl)
            dxr, dwr, dbr = R.group_norm_backward(dyn, c)
            close(dx, dxr, dtype, f"dx {tag}")
            close(dw, dwr, dtype, f"dweight {tag}")
            close(db, dbr, dtype, f"dbias {tag}")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_instance_norm_matches_reference(dtype, affine, small_blocks):
    for i, (shape, cl) in enumerate(CHANNEL_CASES[2:]):
        x, xn, dy, dyn = _channel_inputs(shape, cl, dtype, i)
        C = shape[1]
        w, wn = param((C,), dtype, 20 + i, 0.5) if affine else (None, None)
        b, bn = param((C,), dtype, 30 + i, -0.5) if affine else (None, None)
        tag = f"{shape} cl={cl}"
        y, mean, var, rstd = T.instance_norm_forward(x, w, b, EPS, channels_last=cl)
        yr, c = R.instance_norm_forward(xn, wn, bn, eps=EPS, channels_last=cl)
        close(y, yr, dtype, f"y {tag}")
        close(mean, c["mean"], F32, f"mean {tag}")
        close(var, c["var"], F32, f"var {tag}")
        dx, dw, db = T.instance_norm_backward(dy, x, w, mean, rstd, channels_last=cl)
        dxr, dwr, dbr = R.instance_norm_backward(dyn, c)
        close(dx, dxr, dtype, f"dx {tag}")
        if affine:
            close(dw, dwr, dtype, f"dweight {tag}")
            close(db, dbr, dtype, f"dbias {tag}")


def test_float64_accumulates_in_float64(small_blocks):
    x, xn = rand((3, 4, 7), F64, 0, offset=5.0)
    y, mean, var, rstd = T.batch_norm_forward(x, None, None, EPS)
    yr, c = R.batch_norm_forward(xn, eps=EPS)
    assert y.dtype == mean.dtype == F64
    close(y, yr, F64, "y")
    y, mean, rstd = T.layer_norm_forward(x, (7,), None, None, EPS)
    close(y, R.layer_norm_forward(xn, (7,), eps=EPS)[0], F64, "layer_norm y")


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_float32_large_offset_keeps_accuracy(channels_last, small_blocks):
    """Per-tile two-pass moments and Chan merges: a mean of 1e4 costs no accuracy."""
    x, xn, _, _ = _channel_inputs((4, 3, 5, 6), channels_last, F32, 0, offset=1e4)
    y, mean, var, rstd = T.batch_norm_forward(x, None, None, EPS, channels_last=channels_last)
    yr, c = R.batch_norm_forward(xn, eps=EPS, channels_last=channels_last)
    np.testing.assert_allclose(var.double().numpy(), c["var"], rtol=1e-4)
    np.testing.assert_allclose(y.double().numpy(), yr, atol=2e-3)


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_a_non_finite_value_gives_the_references_statistics(channels_last, small_blocks):
    """A NaN or an infinity gives its channel (group, row) the reference's statistics: mean inf
    for one infinity, NaN for a NaN, a NaN variance and rstd; the others stay finite. Neither the
    clamp of a rounded-negative variance, nor the shifted sums' shift, nor Chan's merge of
    partial moments may turn them finite or NaN."""
    x = torch.ones(6, 4, 3, 5)
    x[4, 1, 2, 4] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    x[5, 3, 2, 2] = -float("inf")
    xx = x.movedim(1, -1).contiguous() if channels_last else x
    xn = xx.double().numpy()

    def same(actual, expected):
        np.testing.assert_array_equal(actual.double().numpy().ravel(), np.ravel(expected))

    _, mean, var, rstd = T.batch_norm_forward(xx, None, None, EPS, channels_last=channels_last)
    _, c = R.batch_norm_forward(xn, eps=EPS, channels_last=channels_last)
    same(mean, c["mean"])                                  # [1, nan, inf, -inf]
    assert torch.isnan(var).tolist() == torch.isnan(rstd).tolist() == [False, True, True, True]
    _, mean, rstd = T.group_norm_forward(xx, 2, None, None, EPS, channels_last=channels_last)
    _, c = R.group_norm_forward(xn, 2, eps=EPS, channels_last=channels_last)
    same(mean, c["mean"])
    assert torch.argwhere(torch.isnan(rstd)).tolist() == [[0, 1], [4, 0], [5, 1]]
    rows = torch.ones(3, 40)                             # looped rows (small blocks)
    rows[0, 20], rows[1, 3], rows[2, 30] = float("inf"), float("nan"), -float("inf")
    _, mean, rstd = T.layer_norm_forward(rows, (40,), None, None, EPS)
    same(mean, [float("inf"), float("nan"), -float("inf")])
    assert torch.isnan(rstd).all()


def test_channels_last_memory_is_processed_in_place_layout(small_blocks):
    x, xn, dy, dyn = _channel_inputs((2, 4, 3, 5), False, F32, 0)
    xm = x.contiguous(memory_format=torch.channels_last)
    y, mean, var, rstd = T.batch_norm_forward(xm, None, None, EPS)
    assert y.is_contiguous(memory_format=torch.channels_last)
    close(y, R.batch_norm_forward(xn, eps=EPS)[0], F32, "y")
    dx, _, _ = T.batch_norm_backward(dy, xm, None, mean, rstd)
    _, c = R.batch_norm_forward(xn, eps=EPS)
    close(dx, R.batch_norm_backward(dyn, c)[0], F32, "dx")


def test_empty_inputs_give_empty_outputs():
    y, mean, rstd = T.layer_norm_forward(torch.empty(0, 8), (8,), None, None, EPS)
    assert y.shape == (0, 8) and mean.shape == (0,)
    dx, dw, db = T.layer_norm_backward(torch.empty(0, 8), torch.empty(0, 8), (8,), torch.ones(8),
                                       mean, rstd)
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8)) and torch.equal(db, torch.zeros(8))
    y, mean, rstd = T.group_norm_forward(torch.empty(0, 4, 3), 2, None, None, EPS)
    assert y.shape == (0, 4, 3) and mean.shape == (0, 2)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="torch tensors.*numba"):
        T.layer_norm_forward(np.ones((2, 3), np.float32), (3,), None, None, EPS)
    with pytest.raises(TypeError, match="int64.*x.float"):
        T.layer_norm_forward(torch.ones(2, 3, dtype=torch.int64), (3,), None, None, EPS)
    with pytest.raises(ValueError, match="weight must have shape"):
        T.layer_norm_forward(torch.ones(2, 3), (3,), torch.ones(4), None, EPS)
    with pytest.raises(ValueError, match="num_groups|groups"):
        T.group_norm_forward(torch.ones(2, 6, 3), 4, None, None, EPS)
    with pytest.raises(ValueError, match="negative"):
        T.batch_norm_forward(torch.ones(2, 3), None, None, EPS, mean=torch.zeros(3),
                             var=-torch.ones(3))
    with pytest.raises(ValueError, match="dy must have the shape"):
        T.layer_norm_backward(torch.ones(2, 4), torch.ones(2, 3), (3,), None, torch.zeros(2),
                              torch.ones(2))
    with pytest.raises(ValueError, match="more than 1 spatial"):
        T.instance_norm_forward(torch.ones(2, 3, 1), None, None, EPS)


# --- the registry and the PyTorch front end --------------------------------------------------

@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def test_registry_triton_on_cpu_only_in_the_interpreter(env):
    with pytest.raises(ValueError, match=r"'triton'.*TRITON_INTERPRET is not set now"):
        get = kernels.get_backend("triton", device="cpu")
    assert kernels.get_backend(device="cpu").name == "numba"             # automatic: CPU default
    env.setenv("TRITON_INTERPRET", "1")
    get = kernels.get_backend("triton", device="cpu", dtype=torch.bfloat16)
    assert get.name == "triton" and get.layer_norm_forward is T.layer_norm_forward
    assert kernels.get_backend(device="cpu").name == "numba"             # never picked on CPU
    assert kernels.available_backends("cuda")["triton"]["default_for"] == ("cuda",)


def test_registry_cuda_default_is_triton_and_falls_back_without_cuda(env):
    # this process's kernels are interpreted, so triton cannot take CUDA tensors here: the
    # automatic choice for CUDA falls back, an explicit one raises naming the reason
    assert kernels._DEVICE_DEFAULTS["cuda"] == "triton"
    if not torch.cuda.is_available():
        assert kernels.get_backend(device="cuda").name == "numpy"
    with pytest.raises(ValueError, match=r"'triton'.*'cuda'.*interpreter"):
        kernels.get_backend("triton", device="cuda")
    env.setenv(kernels.ENV_VAR, "triton")
    with pytest.raises(ValueError, match=r"'triton'.*NORMLAB_BACKEND.*TRITON_INTERPRET"):
        kernels.get_backend(device="cpu")


def test_front_end_dispatches_to_triton_when_chosen(env, small_blocks):
    """NORMLAB_BACKEND=triton routes CPU tensors (in the interpreter) through the fused custom
    ops with the Triton kernels, as CUDA tensors are by default: bfloat16 included."""
    from normlab.nn import functional as F

    env.setenv("TRITON_INTERPRET", "1")
    env.setenv(kernels.ENV_VAR, "triton")
    calls = []
    real = T.layer_norm_backward
    env.setattr(T, "layer_norm_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, xn = rand((3, 10), BF16, 0, offset=2.0)
    x.requires_grad_(True)
    w, wn = param((10,), BF16, 1, 0.5)
    b, bn = param((10,), BF16, 2, -0.5)
    w.requires_grad_(True)
    y = F.layer_norm(x, (10,), w, b)
    assert "normlab_layer_norm" in type(y.grad_fn).__name__ and y.dtype == BF16
    yr, c = R.layer_norm_forward(xn, (10,), wn, bn, eps=1e-5)
    close(y, yr, BF16, "y")
    dy, dyn = rand((3, 10), BF16, 3)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    dxr, dwr, _ = R.layer_norm_backward(dyn, c)
    assert calls, "the Triton backward kernel did not run"
    close(gx, dxr, BF16, "dx")
    close(gw, dwr, BF16, "dweight")
    # batch norm in training: float32 statistics update bfloat16 running statistics
    xb, xbn = rand((4, 3, 5), BF16, 4, offset=1.0)
    rm, rv = torch.zeros(3, dtype=BF16), torch.ones(3, dtype=BF16)
    y = F.batch_norm(xb, rm, rv, None, None, training=True, momentum=1.0)
    yr, c = R.batch_norm_forward(xbn, eps=1e-5)
    close(y, yr, BF16, "batch_norm y")
    close(rm, c["mean"], BF16, "running_mean")
    close(rv, c["var"] * 20 / 19, BF16, "running_var (unbiased)")


def test_front_end_keeps_numba_on_cpu_by_default(env):
    from normlab.nn import _fused

    x = torch.randn(3, 8)
    assert _fused._backend(x).name == "numba"
    env.setenv("TRITON_INTERPRET", "1")
    assert _fused._backend(x).name == "numba"        # the interpreter alone changes nothing
    env.setenv(kernels.ENV_VAR, "triton")
    assert _fused._backend(x).name == "triton"


# --- the real compiler: every kernel variant builds for an H100 -----------------------------

_AOT = textwrap.dedent("""
    import itertools, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from normlab.kernels import triton_gpu as T
    assert not T.INTERPRET
    from normlab import kernels
    try:
        kernels.get_backend("triton", device="cuda")
    except ValueError as e:
        assert "CUDA is not available" in str(e), e
        print("explicit-without-cuda: ok")
    target = GPUTarget("cuda", 90, 32)
    n = 0
    def comp(fn, sig, consts):
        global n
        sig = dict(sig, **{k: "constexpr" for k in consts})
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)
        n += 1
    for dt, acc, sd in (("bf16", tl.float32, "fp32"), ("fp32", tl.float32, "fp32"),
                        ("fp64", tl.float64, "fp64")):
        p, a = "*" + dt, "*" + sd
        for looped, centered in itertools.product((False, True), (True, False)):
            comp(T._row_fwd, dict(X=p, RES=p, S=p, Y=p, W=p, B=p, MEAN=a, RSTD=a, L="i32",
                                  eps="fp32"),
                 dict(HAS_RES=looped, HAS_W=True, HAS_B=centered, CENTERED=centered,
                      LOOPED=looped, BLOCK=1024, ACC=acc))
            comp(T._row_bwd, dict(DY=p, X=p, W=p, MEAN=a, RSTD=a, DS=p, DX=p, DWP=a, DBP=a,
                                  R="i32", L="i32", rows_per_prog="i32"),
                 dict(HAS_W=True, HAS_DS=looped, CENTERED=centered, NEED_DW=True,
                      NEED_DB=centered, LOOPED=looped, BLOCK=1024, ACC=acc))
        comp(T._sum_partials, dict(DWP=a, DBP=a, DW=p, DB=p, P="i32", L="i32"),
             dict(NEED_DW=True, NEED_DB=True, BLOCK=256))
        for flag in (False, True):
            comp(T._finalize_fwd, dict(MEAN_P=a, M2_P=a, W=p, B=p, MEAN=a, VAR=a, RSTD=a, MU_C=a,
                                       A_C=a, C0_C=a, P="i32", C="i32", G="i32", gs="i32",
                                       per="i32", M="i32", eps="fp32"),
                 dict(HAS_W=True, HAS_B=flag, GIVEN=flag, BLOCK_G=8, BLOCK_J=32, ACC=acc))
            comp(T._finalize_bwd, dict(SDY_P=a, SDYXC_P=a, SXC_P=a, MEAN=a, RSTD=a, W=p, MU_C=a,
                                       A_C=a, D_C=a, C0_C=a, DW=p, DB=p, P="i32", C="i32",
                                       G="i32", gs="i32", M="i32"),
                 dict(HAS_W=flag, SUMS=True, TRAINING=flag, NEED_W=True, NEED_B=not flag,
                      BLOCK_G=8, BLOCK_J=32, ACC=acc))
        if dt != "fp32":
            continue
        comp(T._plane_moments, dict(X=p, MEAN=a, M2=a, R="i32", S="i32"),
             dict(BLOCK_R=4, BLOCK_S=1024, ACC=acc))
        comp(T._plane_sums, dict(DY=p, X=p, MEAN=a, SDY=a, SDYXC=a, SXC=a, R="i32", S="i32",
                                 C="i32", NS="i32", gs="i32"),
             dict(BLOCK_R=4, BLOCK_S=1024, ACC=acc))
        comp(T._col_moments, dict(X=p, MEAN_P=a, M2_P=a, M="i32", K="i32", rows_per_prog="i32",
                                  P="i32"), dict(BLOCK_M=32, BLOCK_K=64, ACC=acc))
        comp(T._col_sums, dict(DY=p, X=p, MEAN=a, SDY_P=a, SDYXC_P=a, SXC_P=a, M="i32", K="i32",
                               rows_per_prog="i32", P="i32", NS="i32", gs="i32"),
             dict(BLOCK_M=32, BLOCK_K=64, ACC=acc))
        for cl, hx in itertools.product((False, True), (True, False)):
            comp(T._apply, dict(X=p, DY=p, OUT=p, MU=a, A=a, D=a, C0=a, ROWS="i32", COLS="i32",
                                C="i32", S="i32", NS="i32"),
                 dict(HAS_X=hx, HAS_DY=not hx or cl, CL=cl, BLOCK_R=16, BLOCK_C=128, ACC=acc))
    print("compiled", n)
""")


def test_every_kernel_compiles_for_sm90_with_the_real_compiler():
    """The interpreter is lenient about types; the real compiler is not. Build each kernel
    variant to a cubin for sm_90 (no GPU needed: ptxas ships with triton), in a fresh process
    where the kernels are not interpreted."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compiled 47" in out.stdout, out.stdout
    if not torch.cuda.is_available():
        assert "explicit-without-cuda: ok" in out.stdout


# --- the GPU bench's plumbing, on CPU tensors in the interpreter ------------------------------

@pytest.mark.parametrize("case", [
    dict(method="layer_norm", shape=(6, 40)),
    dict(method="rms_norm", shape=(3, 24), dtype="float32"),
    dict(method="batch_norm", shape=(4, 3, 5, 6), channels_last=True),
    dict(method="group_norm", shape=(2, 6, 4, 5), groups=3),
    dict(method="instance_norm", shape=(2, 3, 4, 2, 3), channels_last=True),
], ids=lambda c: c["method"])
def test_gpu_bench_case_runs_its_parity_check_and_every_mode(case, env, small_blocks):
    """run_case with a timer that calls each implementation once and times nothing (1 s): the
    parity check against float64 torch, our kernels and autograd path, eager torch's calls and
    the record; the GB/s columns below are therefore the byte model at 1 s, not a measurement."""
    from normlab import bench_gpu as G

    env.setenv("TRITON_INTERPRET", "1")
    env.setenv(kernels.ENV_VAR, "triton")
    called = []

    def once(fn, repeat, min_time):
        fn()
        called.append(fn)
        return {"median_s": 1.0}

    c = G.GpuCase(**{"dtype": "bfloat16", **case})
    be = kernels.get_backend("triton", device="cpu")
    rec = G.run_case(c, be, repeat=1, min_time=0.0, copy_GBps=1.0, log=lambda s: None,
                     device="cpu", timer=once, peers=("eager",))
    assert rec["parity_ok"], rec["parity"]
    assert "errors" not in rec, rec["errors"]
    assert tuple(rec["modes"]) == c.modes
    assert len(called) == 2 * len(c.modes)              # ours and eager, every mode
    for mode, r in rec["modes"].items():
        assert r["GBps"] == G.UNITS[mode] * c.nbytes / 1e9 and r["x"] == {"eager": 1.0}


@pytest.mark.parametrize("method", ["add_layer_norm", "add_rms_norm"])
def test_front_end_fused_residual_add(method, env, blocks):
    """normlab.nn.functional.add_layer_norm / add_rms_norm: one custom op on the Triton backend,
    gradients of x, residual, weight, bias against the float64 reference."""
    from normlab.nn import functional as F

    env.setenv("TRITON_INTERPRET", "1")
    env.setenv(kernels.ENV_VAR, "triton")
    x, xn = rand((3, 12), BF16, 0, offset=1.0)
    r, rn = rand((3, 12), BF16, 1)
    w, wn = param((12,), BF16, 2, 0.5)
    b, bn = param((12,), BF16, 3, -0.5)
    leaves = [t.requires_grad_(True) for t in (x, r, w, b)]
    centered = method == "add_layer_norm"
    if centered:
        y, s = F.add_layer_norm(x, r, (12,), w, b)
    else:
        y, s = F.add_rms_norm(x, r, (12,), w, 1e-5)
    assert "normlab_add_norm" in type(y.grad_fn).__name__
    sn = (x.detach() + r.detach()).double().numpy()          # the sum, rounded to bfloat16
    close(s, sn, BF16, "sum")
    if centered:
        yr, c = R.layer_norm_forward(sn, (12,), wn, bn, eps=1e-5)
    else:
        yr, c = R.rms_norm_forward(sn, (12,), wn, eps=1e-5)
    close(y, yr, BF16, "y")
    dy, dyn = rand((3, 12), BF16, 4)
    ds, dsn = rand((3, 12), BF16, 5)
    grads = torch.autograd.grad((y, s), leaves if centered else leaves[:3], (dy, ds))
    ref = (R.layer_norm_backward if centered else R.rms_norm_backward)(dyn, c)
    close(grads[0], ref[0] + dsn, BF16, "dx = d(sum) from y and from the sum")
    close(grads[1], ref[0] + dsn, BF16, "dresidual")
    close(grads[2], ref[1], BF16, "dweight")
    if centered:
        close(grads[3], ref[2], BF16, "dbias")


def test_front_end_fused_residual_add_gradcheck_and_fallback(env):
    from normlab.nn import functional as F

    env.setenv("TRITON_INTERPRET", "1")
    env.setenv(kernels.ENV_VAR, "triton")
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(2, 5, generator=g, dtype=F64, requires_grad=True) for _ in range(2))
    w = (torch.rand(5, generator=g, dtype=F64) + 0.5).requires_grad_(True)
    b = torch.rand(5, generator=g, dtype=F64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: F.add_layer_norm(*a[:2], (5,), *a[2:]), (x, r, w, b))
    assert torch.autograd.gradgradcheck(lambda *a: F.add_rms_norm(*a[:2], (5,), a[2], 1e-5)[0],
                                        (x, r, w))
    env.delenv(kernels.ENV_VAR)                             # CPU default: an add, then the norm
    y, s = F.add_layer_norm(x, r, (5,), w, b)
    assert "add_norm" not in type(y.grad_fn).__name__
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + r, (5,), w, b))


def test_custom_ops_fake_and_real_agree_on_the_triton_backend(env):
    """torch.library.opcheck: the fake implementations (float32 statistics for bfloat16 input,
    channels-last outputs) match what the Triton kernels return."""
    from normlab.nn import _fused, _fused_add

    env.setenv("TRITON_INTERPRET", "1")
    env.setenv(kernels.ENV_VAR, "triton")
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    bf = dict(dtype=BF16)
    x = torch.randn(2, 4, 3, 3, **bf).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(4, **bf).requires_grad_(True), torch.rand(4, **bf).requires_grad_(True)
    x.requires_grad_(True)
    torch.library.opcheck(_fused.OPS["batch_norm_train"][0], (x, w, b, None, None, [], 1e-5),
                          test_utils=utils)
    torch.library.opcheck(_fused.OPS["group_norm"][0], (x, w, b, None, None, [2], 1e-5),
                          test_utils=utils)
    xr = torch.randn(3, 8, **bf).requires_grad_(True)
    wr = torch.rand(8, **bf).requires_grad_(True)
    torch.library.opcheck(_fused.OPS["layer_norm"][0], (xr, wr, None, None, None, [8], 1e-5),
                          test_utils=utils)
    torch.library.opcheck(_fused_add.add_norm, (xr, torch.randn(3, 8, **bf), wr, None, [8], 1e-5,
                                                True), test_utils=utils)
