"""normlab.nn's fused path: custom ops over the fused kernels, autograd, dispatch, torch.compile.

Every parity test also asserts that the fused custom ops ran (``_record``), so none of these
can pass on the torch composite by accident.
"""

from __future__ import annotations

import contextlib
import copy

import numba
import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import normlab.nn as nl
import normlab.nn.functional as NF
from normlab.kernels import numba_cpu
from normlab.nn import _fused


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: thread pools only add contention on a small shared machine.

    Measured on the 2-core development machine under load: every parallel numba region then
    waits ~16 ms for its second thread, which turns a 0.1 ms BatchNorm into 16 ms. The kernels'
    results do not depend on the thread count (their contract), so one thread tests the same math.
    """
    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])


@pytest.fixture(autouse=True)
def automatic_backend(monkeypatch):
    monkeypatch.delenv("NORMLAB_BACKEND", raising=False)


class _record_ops(TorchDispatchMode):
    """Records the names of the ``normlab::`` custom ops dispatched inside the block (a dispatch
    mode is active, so the ops run instead of the eager fast path)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "normlab":
            self.ops.append(func._opname)
        return func(*args, **(kwargs or {}))


class _record:
    """Records which fused kernels ran inside the block, on either path (the eager fast path
    or the custom ops): ``<method>`` for a forward, ``<method>_backward`` for a backward.
    Nothing is recorded when the torch composite runs instead."""

    def __enter__(self):
        self.ops = []
        self._saved = _fused._run_forward, _fused._run_backward
        fwd, bwd = self._saved

        def run_forward(method, *args, **kwargs):
            self.ops.append(method.name)
            return fwd(method, *args, **kwargs)

        def run_backward(method, *args, **kwargs):
            self.ops.append(method.name + "_backward")
            return bwd(method, *args, **kwargs)

        _fused._run_forward, _fused._run_backward = run_forward, run_backward
        return self

    def __exit__(self, *exc):
        _fused._run_forward, _fused._run_backward = self._saved


# ---------------------------------------------------------------------------------------------
# parity with torch.nn.functional over many configurations
# ---------------------------------------------------------------------------------------------

def _layout(t, layout):
    """The same values as ``t`` (N, C, *S) in the memory layout named ``layout``."""
    if layout == "cf":
        return t.contiguous()
    if layout == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "cl3d":
        return t.contiguous(memory_format=torch.channels_last_3d)
    if layout == "seq":             # (N, C, L) viewing (N, L, C) memory, as a transposed sequence
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":         # neither layout: the op makes one contiguous copy
        big = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    raise AssertionError(layout)


# (id, method, shape, layout, options)
CASES = [
    ("bn-2d", "bn", (5, 3), "cf", {}),
    ("bn-1d", "bn", (4, 3, 7), "cf", {}),
    ("bn-1d-seq", "bn", (4, 3, 7), "seq", {}),
    ("bn-2d-big-plane", "bn", (3, 4, 9, 11), "cf", {}),
    ("bn-2d-cl", "bn", (4, 5, 3, 6), "cl", {}),
    ("bn-2d-odd-cl", "bn", (2, 7, 33, 1), "cl", {}),
    ("bn-2d-1x1", "bn", (6, 5, 1, 1), "cf", {}),
    ("bn-2d-strided", "bn", (3, 4, 5, 6), "strided", {}),
    ("bn-3d", "bn", (2, 3, 3, 4, 5), "cf", {}),
    ("bn-3d-cl", "bn", (2, 3, 3, 4, 5), "cl3d", {}),
    ("bn-noaffine", "bn", (4, 3, 5, 6), "cl", {"affine": False}),
    ("bn-eval", "bn", (4, 3, 5, 6), "cf", {"training": False}),
    ("bn-eval-cl", "bn", (4, 6, 5, 3), "cl", {"training": False}),
    ("bn-eval-noaffine", "bn", (5, 3), "cf", {"training": False, "affine": False}),
    ("bn-no-running", "bn", (4, 3, 5), "cf", {"running": False}),
    ("in-1d", "in", (3, 4, 13), "cf", {}),
    ("in-2d-cl", "in", (2, 3, 5, 5), "cl", {}),
    ("in-3d-cl", "in", (2, 3, 2, 3, 4), "cl3d", {}),
    ("in-running", "in", (3, 4, 6, 5), "cf", {"running": True}),
    ("in-eval", "in", (3, 4, 6, 5), "cl", {"running": True, "training": False}),
    ("gn", "gn", (4, 6, 5, 3), "cf", {"groups": 3}),
    ("gn-cl", "gn", (4, 6, 5, 3), "cl", {"groups": 2}),
    ("gn-2d-input", "gn", (3, 8), "cf", {"groups": 4}),
    ("gn-instance-3d-cl", "gn", (2, 6, 3, 2, 2), "cl3d", {"groups": 6}),
    ("gn-noaffine", "gn", (3, 4, 7), "seq", {"groups": 1, "affine": False}),
    ("ln", "ln", (3, 2, 5, 7), "cf", {"shape": (5, 7)}),
    ("ln-odd", "ln", (4, 33), "cf", {"shape": (33,)}),
    ("ln-one-row", "ln", (7,), "cf", {"shape": (7,)}),
    ("ln-nobias", "ln", (2, 3, 17), "cf", {"shape": (17,), "bias": False}),
    ("ln-noaffine", "ln", (2, 3, 4), "strided", {"shape": (3, 4), "affine": False}),
    ("rms", "rms", (4, 3, 11), "cf", {"shape": (11,)}),
    ("rms-eps", "rms", (4, 3, 2, 5), "cf", {"shape": (2, 5), "eps": 1e-3}),
    ("rms-noaffine", "rms", (5, 64), "cf", {"shape": (64,), "affine": False}),
]

_OP_OF = {"bn": "batch_norm_train", "in": "instance_norm", "gn": "group_norm", "ln": "layer_norm",
          "rms": "rms_norm"}


def _expected_op(method, opts):
    if method in ("bn", "in") and not opts.get("training", True) and opts.get("running", True):
        return "batch_norm_eval"
    return _OP_OF[method]


def _make(method, shape, opts, dtype, g):
    """Parameters and a call ``f(F, x, params) -> y`` valid for both functional APIs."""
    C = shape[1] if len(shape) > 1 else None
    pshape = opts.get("shape", (C,))
    affine = opts.get("affine", True)
    params = {}
    if affine:
        params["weight"] = torch.rand(pshape, generator=g, dtype=dtype) + 0.5
        if opts.get("bias", True):
            params["bias"] = torch.randn(pshape, generator=g, dtype=dtype)
    training = opts.get("training", True)
    running = opts.get("running", method == "bn")
    if running:
        params["running_mean"] = torch.randn(C, generator=g, dtype=dtype)
        params["running_var"] = torch.rand(C, generator=g, dtype=dtype) + 0.5
    eps = opts.get("eps", 1e-5)

    def call(F, x, p):
        w, b = p.get("weight"), p.get("bias")
        rm, rv = p.get("running_mean"), p.get("running_var")
        if method == "bn":
            return F.batch_norm(x, rm, rv, w, b, training, 0.3, eps)
        if method == "in":
            return F.instance_norm(x, rm, rv, w, b, training, 0.3, eps)
        if method == "gn":
            return F.group_norm(x, opts["groups"], w, b, eps)
        if method == "ln":
            return F.layer_norm(x, opts["shape"], w, b, eps)
        return F.rms_norm(x, opts["shape"], w, opts.get("eps"))

    return params, call


def _forward_backward(F, call, x, params, dy):
    x = x.detach().clone().requires_grad_()            # clone keeps the memory format
    p = {k: (v.detach().clone().requires_grad_() if not k.startswith("running") else v.clone())
         for k, v in params.items()}
    y = call(F, x, p)
    y.backward(dy)
    return y, x.grad, p


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 3e-5), (torch.float64, 1e-10)], ids=["f32", "f64"])
@pytest.mark.parametrize("case, method, shape, layout, opts", CASES, ids=[c[0] for c in CASES])
def test_fused_path_matches_torch(case, method, shape, layout, opts, dtype, tol):
    g = torch.Generator().manual_seed(len(case) * 7 + len(shape))
    params, call = _make(method, shape, opts, dtype, g)
    x = _layout(torch.randn(shape, generator=g, dtype=dtype) * 3 + 2, layout)
    dy = torch.randn(shape, generator=g, dtype=dtype)
    with _record() as rec:
        y, dx, p = _forward_backward(NF, call, x, params, dy)
    op = _expected_op(method, opts)
    assert rec.ops == [op, op + "_backward"], rec.ops
    y_t, dx_t, p_t = _forward_backward(TF, call, x, params, dy)
    torch.testing.assert_close(y, y_t, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, dx_t, rtol=10 * tol, atol=10 * tol)
    for k in p:
        got, want = (p[k], p_t[k]) if k.startswith("running") else (p[k].grad, p_t[k].grad)
        torch.testing.assert_close(got, want, rtol=10 * tol, atol=10 * tol, msg=lambda m: f"{k}: {m}")
    if layout in ("cl", "cl3d", "seq") and method != "ln":     # the output keeps x's memory format
        assert y.stride() == x.stride() and dx.stride() == x.stride(), (y.stride(), x.stride())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case, method, shape, layout, opts", CASES, ids=[c[0] for c in CASES])
def test_eager_path_equals_the_custom_ops(monkeypatch, case, method, shape, layout, opts, dtype):
    """The eager fast path (the default outside compile and dispatch modes) and the custom ops
    give bit-identical outputs and gradients; each path is the one taken. The running
    statistics agree to rounding: the ops run inside a dispatch mode here (``_record_ops``),
    where the running-statistics update is torch operations (for the mode to see them), while
    in plain eager code it runs on NumPy views (``functional._fold_on_host``); torch's
    ``add_(alpha=)`` may fuse a multiply-add that NumPy rounds twice."""
    def run(eager):
        monkeypatch.setattr(_fused, "EAGER", eager)
        g = torch.Generator().manual_seed(len(case))
        params, call = _make(method, shape, opts, dtype, g)
        x = _layout(torch.randn(shape, generator=g, dtype=dtype) * 3 + 2, layout)
        dy = torch.randn(shape, generator=g, dtype=dtype)
        with _record() as rec, _record_ops() if not eager else contextlib.nullcontext() as ops:
            y, dx, p = _forward_backward(NF, call, x, params, dy)
        op = _expected_op(method, opts)
        assert rec.ops == [op, op + "_backward"], rec.ops
        if eager:
            assert type(y.grad_fn).__name__ == f"normlab_{op}Backward"
        else:
            assert ops.ops == [op, op + "_backward"], ops.ops
        grads = {k: (v if k.startswith("running") else v.grad) for k, v in p.items()}
        return y, dx, grads

    y_e, dx_e, g_e = run(True)
    y_o, dx_o, g_o = run(False)
    assert torch.equal(y_e, y_o) and y_e.stride() == y_o.stride()
    assert torch.equal(dx_e, dx_o) and dx_e.stride() == dx_o.stride()
    for k in g_e:                    # None: a parameter the method does not take (rms bias)
        if g_e[k] is None or g_o[k] is None:
            assert g_e[k] is None and g_o[k] is None, k
        elif k.startswith("running"):
            ulp = torch.finfo(dtype).eps
            torch.testing.assert_close(g_e[k], g_o[k], rtol=2 * ulp, atol=2 * ulp, msg=k)
        else:
            assert torch.equal(g_e[k], g_o[k]), k


def test_eager_path_without_grad_and_under_a_dispatch_mode():
    x = torch.randn(4, 6, 5)
    w = torch.rand(6, requires_grad=True)
    with torch.no_grad(), _record() as rec:                    # no autograd node at all
        y = NF.group_norm(x, 3, w)
    assert rec.ops == ["group_norm"] and y.grad_fn is None
    with _record_ops() as ops:                                 # a dispatch mode sees the ops
        y2 = NF.group_norm(x, 3, w)
        y2.sum().backward()
    assert ops.ops == ["group_norm", "group_norm_backward"]
    assert torch.equal(y, y2.detach())


@pytest.mark.parametrize("method", ["bn", "in", "gn", "ln", "rms"])
def test_eager_path_takes_strided_parameters_and_an_expanded_grad(method):
    """The eager path hands the kernels NumPy views without re-validating: a weight and bias
    that are strided views (copied once, never read out of bounds) and the stride-0 ``dy`` of
    ``y.sum().backward()`` give torch's values and gradients, on the fused path (``_record``)."""
    g = torch.Generator().manual_seed(3)
    C = 5 if method in ("ln", "rms") else 6
    calls = {
        "bn": lambda F, x, w, b: F.batch_norm(x, None, None, w, b, True),
        "in": lambda F, x, w, b: F.instance_norm(x, None, None, w, b),
        "gn": lambda F, x, w, b: F.group_norm(x, 3, w, b),
        "ln": lambda F, x, w, b: F.layer_norm(x, (C,), w, b),
        "rms": lambda F, x, w, b: F.rms_norm(x, (C,), w, 1e-6),
    }
    x0 = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    p0 = torch.randn(C, 2, generator=g, dtype=torch.float64)

    def run(F):
        x, p = x0.clone().requires_grad_(), p0.clone().requires_grad_()
        w, b = p[:, 0], p[:, 1]                  # views with stride 2
        assert not w.is_contiguous()
        y = calls[method](F, x, w, b)
        y.sum().backward()                       # dy: an expanded (stride 0) tensor
        return y, x.grad, p.grad

    with _record() as rec:
        ours = run(NF)
    assert rec.ops == [_expected_op(method, {}), _expected_op(method, {}) + "_backward"], rec.ops
    for a, e in zip(ours, run(TF)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_batch_norm_module_trains_under_inference_mode():
    """Inference tensors reach the kernels through NumPy views too (running statistics updated)."""
    m, t = nl.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    with torch.inference_mode():
        y, yt = m(x), t(x)
    torch.testing.assert_close(y, yt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.running_var, t.running_var, rtol=1e-6, atol=1e-6)
    assert int(m.num_batches_tracked) == 1


def test_statistics_outputs_are_not_differentiable():
    x = torch.randn(4, 3, 5, requires_grad=True)
    y, mean, var = _fused.batch_norm_train(x, None, None, 1e-5)
    assert y.requires_grad and not mean.requires_grad and not var.requires_grad


# ---------------------------------------------------------------------------------------------
# zero copy, channels-last
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, shape", [("cl", (4, 6, 5, 3)), ("cl3d", (2, 4, 3, 2, 5)),
                                           ("seq", (3, 8, 10))])
def test_channels_last_reaches_the_kernel_without_a_copy(monkeypatch, layout, shape):
    seen = []

    def spy(name):                   # the eager path's entries take NumPy views
        real = getattr(numba_cpu, name)

        def wrapper(*args, **kwargs):
            x, cl = args[1:3] if name.endswith("backward") else args[:2]
            seen.append((name, x.ctypes.data, x.shape, x.flags.c_contiguous, cl))
            return real(*args, **kwargs)
        monkeypatch.setattr(numba_cpu, name, wrapper)

    spy("direct_batch_norm_forward")
    spy("direct_batch_norm_backward")
    x = _layout(torch.randn(shape), layout).requires_grad_()
    C = shape[1]
    w = torch.rand(C, requires_grad=True)
    b = torch.randn(C, requires_grad=True)
    y = NF.batch_norm(x, None, None, w, b, True)
    dy = _layout(torch.randn(shape), layout)
    y.backward(dy)
    nhwc = (shape[0],) + shape[2:] + (C,)
    assert seen == [("direct_batch_norm_forward", x.data_ptr(), nhwc, True, True),
                    ("direct_batch_norm_backward", x.data_ptr(), nhwc, True, True)]
    assert y.stride() == x.stride() and x.grad.stride() == x.stride()
    torch.testing.assert_close(y, TF.batch_norm(x.detach(), None, None, w.detach(), b.detach(), True),
                               rtol=3e-5, atol=3e-5)


def test_contiguous_input_is_not_copied_either(monkeypatch):
    seen = []
    real = numba_cpu.direct_row_forward

    def wrapper(x, *args, **kwargs):
        seen.append(x.ctypes.data)
        return real(x, *args, **kwargs)
    monkeypatch.setattr(numba_cpu, "direct_row_forward", wrapper)
    x = torch.randn(3, 4, 8)
    NF.layer_norm(x, (8,))
    assert seen == [x.data_ptr()]


# ---------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck (float64) for every method, through the public functional API
# ---------------------------------------------------------------------------------------------

def _f64(*shape, lo=None):
    t = torch.randn(*shape, dtype=torch.float64)
    return (t.abs() + lo if lo is not None else t).requires_grad_()


GRAD_CASES = {
    "bn-train": lambda: (lambda x, w, b: NF.batch_norm(x, None, None, w, b, True),
                         _f64(3, 2, 4), _f64(2), _f64(2), "batch_norm_train"),
    "bn-train-cl": lambda: (lambda x, w, b: NF.batch_norm(x, None, None, w, b, True),
                            _layout(torch.randn(3, 3, 2, 2, dtype=torch.float64), "cl").requires_grad_(),
                            _f64(3), _f64(3), "batch_norm_train"),
    "bn-eval": lambda: (lambda x, w, b: NF.batch_norm(x, torch.tensor([0.3, -1.0], dtype=torch.float64),
                                                      torch.tensor([0.5, 2.0], dtype=torch.float64),
                                                      w, b, False),
                        _f64(3, 2, 4), _f64(2), _f64(2), "batch_norm_eval"),
    "in": lambda: (lambda x, w, b: NF.instance_norm(x, None, None, w, b),
                   _f64(2, 3, 5), _f64(3), _f64(3), "instance_norm"),
    "gn": lambda: (lambda x, w, b: NF.group_norm(x, 2, w, b),
                   _f64(2, 4, 3), _f64(4), _f64(4), "group_norm"),
    "gn-cl": lambda: (lambda x, w, b: NF.group_norm(x, 2, w, b),
                      _layout(torch.randn(2, 4, 2, 3, dtype=torch.float64), "cl").requires_grad_(),
                      _f64(4), _f64(4), "group_norm"),
    "ln": lambda: (lambda x, w, b: NF.layer_norm(x, (2, 3), w, b),
                   _f64(3, 2, 3), _f64(2, 3), _f64(2, 3), "layer_norm"),
    "rms": lambda: (lambda x, w, b: NF.rms_norm(x, (5,), w) + 0 * b.sum(),
                    _f64(3, 5), _f64(5), _f64(1), "rms_norm"),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradcheck_and_gradgradcheck_float64(case):
    torch.manual_seed(len(case))
    fn, x, w, b, op = GRAD_CASES[case]()
    with _record() as rec:
        fn(x, w, b).sum().backward()
    assert rec.ops == [op, op + "_backward"]
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_second_order_grads_match_torch():
    """A gradient penalty (double backward) through BatchNorm, against torch.nn.functional."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    b = torch.randn(3, dtype=torch.float64)
    out = []
    for F in (NF, TF):
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        y = F.batch_norm(xx, None, None, ww, bb, True)
        (gx,) = torch.autograd.grad((y ** 3).sum(), xx, create_graph=True)
        gx.square().sum().backward()
        out.append((xx.grad, ww.grad, bb.grad))
    for a, b_ in zip(*out):
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-9)


def test_opcheck_every_op():
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration, dispatch."""
    x = torch.randn(3, 4, 5, 2).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    samples = {
        "batch_norm_train": (x, w, b, None, None, [], 1e-5),
        "batch_norm_eval": (x, w, b, rm, rv, [], 1e-5),
        "instance_norm": (x, w, None, None, None, [], 1e-5),
        "group_norm": (x, None, b, None, None, [2], 1e-5),
        "layer_norm": (x, torch.rand(5, 2), torch.randn(5, 2), None, None, [5, 2], 1e-5),
        "rms_norm": (torch.randn(3, 7), torch.rand(7), None, None, None, [7], 1e-6),
    }
    assert set(samples) == set(_fused.OPS)
    for name, args in samples.items():
        args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a is not rm
                     and a is not rv else a for a in args)
        torch.library.opcheck(_fused.OPS[name][0], args)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_takes_the_composite(dtype):
    m = nl.BatchNorm2d(3).to(dtype)
    t = nn.BatchNorm2d(3).to(dtype)
    x = torch.randn(4, 3, 5, 5).to(dtype).requires_grad_()
    with _record() as rec:
        y = m(x)
        y.float().sum().backward()
    assert rec.ops == []
    assert y.dtype == dtype
    torch.testing.assert_close(y, t(x.detach()), rtol=2e-2, atol=2e-2)


def test_numpy_backend_env_takes_the_composite(monkeypatch):
    monkeypatch.setenv("NORMLAB_BACKEND", "numpy")
    x = torch.randn(4, 6, 5)
    with _record() as rec:
        y = NF.group_norm(x, 3)
    assert rec.ops == []
    torch.testing.assert_close(y, TF.group_norm(x, 3), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    with _record() as rec:
        NF.group_norm(x, 3)
    assert rec.ops == ["group_norm"]


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    with pytest.raises(ValueError, match=r"'numba'.*NORMLAB_BACKEND.*float16"):
        NF.layer_norm(torch.randn(2, 4, dtype=torch.float16), (4,))
    monkeypatch.setenv("NORMLAB_BACKEND", "triton-please")
    with pytest.raises(ValueError, match=r"'triton-please'.*valid choices"):
        NF.layer_norm(torch.randn(2, 4), (4,))


def test_mixed_parameter_dtype_takes_the_composite():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    w = torch.rand(3)                                  # float32 weight with float64 input
    with _record() as rec:
        y = NF.batch_norm(x, None, None, w, None, True)
    assert rec.ops == []
    assert y.dtype == torch.float64


def test_empty_batch_keeps_running_stats_and_skips_the_ops():
    m = nl.BatchNorm2d(3)
    before = m.running_mean.clone(), m.running_var.clone()
    with _record() as rec:
        y = m(torch.randn(0, 3, 4, 4))
    assert rec.ops == [] and y.shape == (0, 3, 4, 4)
    assert torch.equal(m.running_mean, before[0]) and torch.equal(m.running_var, before[1])


@pytest.mark.parametrize("path", ["eager", "ops", "composite"])
@pytest.mark.parametrize("kind", ["batch", "instance"])
def test_running_statistics_stay_out_of_the_autograd_graph(monkeypatch, path, kind):
    """The running statistics never join the autograd graph, on any path, although the batch
    statistics come from inputs that require grad: the functional hands them to the update
    detached, and the update runs on host views (eager path) or as torch operations under
    ``torch.no_grad`` (ops, composite). Fails if both guards go (checked by mutation)."""
    monkeypatch.setattr(_fused, "EAGER", path != "ops")
    dtype = torch.bfloat16 if path == "composite" else torch.float64
    m = (nl.BatchNorm2d(3) if kind == "batch" else
         nl.InstanceNorm2d(3, affine=True, track_running_stats=True)).to(dtype)
    x = torch.randn(4, 3, 5, 5, dtype=dtype, requires_grad=True)
    with _record() as rec, _record_ops() if path == "ops" else contextlib.nullcontext():
        y = m(x)
    assert bool(rec.ops) == (path != "composite"), rec.ops
    for buf in (m.running_mean, m.running_var):
        assert not buf.requires_grad and buf.grad_fn is None
    assert not torch.equal(m.running_mean, torch.zeros(3, dtype=dtype))      # it was updated
    y.sum().backward()
    assert x.grad is not None and m.weight.grad is not None


def test_bad_input_error_names_the_value():
    with pytest.raises(ValueError, match=r"num_groups=4 does not divide num_channels=6"):
        NF.group_norm(torch.randn(2, 6, 3), 4)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 3\)"):
        NF.batch_norm(torch.randn(1, 3), None, None, training=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fused", "composite"])
def test_batch_statistics_of_one_value_raise_without_running_stats_too(dtype):
    """Evaluation mode without running statistics normalizes with the batch's: one value per
    channel would give zeros silently (torch raises too, 'running_mean must be defined')."""
    x = torch.randn(1, 3, dtype=dtype, requires_grad=True)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 3\)"):
        NF.batch_norm(x, None, None, training=False)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ---------------------------------------------------------------------------------------------

def _small_cnn(mod):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), mod.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3), mod.GroupNorm(2, 8), nn.ReLU(),
        mod.InstanceNorm2d(8, affine=True, track_running_stats=True),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 16), mod.BatchNorm1d(16), nn.Linear(16, 4))


class _Block(nn.Module):
    """A pre-norm transformer block: LayerNorm before attention, RMSNorm before the MLP."""

    def __init__(self, mod, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = mod.LayerNorm(d), mod.RMSNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.norm2(x))


def _recording_backend(graphs):
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop

    def compiler(kind):
        def compile_(gm, example_inputs):
            graphs.append((kind, {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}))
            return boxed_nop(gm, example_inputs)
        return compile_
    return aot_autograd(fw_compiler=compiler("fw"), bw_compiler=compiler("bw"))


def _compare_compiled(model, make_input, backend, tol):
    """Eager vs torch.compile(fullgraph=True): loss, parameter grads, buffers, eval output."""
    torch._dynamo.reset()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = make_input(g)
        model.zero_grad(), twin.zero_grad()
        loss_e = model(x).square().mean()
        loss_e.backward()
        loss_c = compiled(x).square().mean()
        loss_c.backward()
        torch.testing.assert_close(loss_c, loss_e, rtol=tol, atol=tol)
        for (name, pe), pc in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    for (name, be), bc in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(bc, be, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    model.eval(), twin.eval()
    x = make_input(g)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=tol, atol=tol)


MODELS = {
    "cnn": (lambda: _small_cnn(nl), lambda g: torch.randn(4, 3, 8, 8, generator=g),
            {"batch_norm_train", "group_norm", "instance_norm"}),
    "cnn-channels-last": (lambda: _small_cnn(nl).to(memory_format=torch.channels_last),
                          lambda g: torch.randn(4, 3, 8, 8, generator=g).contiguous(
                              memory_format=torch.channels_last),
                          {"batch_norm_train", "group_norm", "instance_norm"}),
    "transformer-block": (lambda: _Block(nl), lambda g: torch.randn(2, 5, 16, generator=g),
                          {"layer_norm", "rms_norm"}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_compile_fullgraph_matches_eager_and_keeps_the_fused_ops(name):
    """aot_eager: dynamo (fullgraph: no graph break allowed) + AOTAutograd over the fake kernels."""
    make_model, make_input, ops = MODELS[name]
    torch.manual_seed(0)
    graphs = []
    _compare_compiled(make_model(), make_input, _recording_backend(graphs), tol=1e-5)
    fw = set().union(*(t for kind, t in graphs if kind == "fw"))
    bw = set().union(*(t for kind, t in graphs if kind == "bw"))
    assert {f"normlab.{op}.default" for op in ops} <= fw, fw
    assert {f"normlab.{op}_backward.default" for op in ops} <= bw, bw


@pytest.mark.slow
def test_compile_inductor_cnn_and_block():
    """inductor on CPU (generates and builds C++: ~40 s with a cold cache, ~5 s warm)."""
    torch.manual_seed(0)
    for name in ("cnn", "transformer-block"):
        make_model, make_input, _ = MODELS[name]
        _compare_compiled(make_model(), make_input, "inductor", tol=1e-4)


# ---------------------------------------------------------------------------------------------
# ResNet-18 (torchvision's definition, written out; no download): normlab vs torch.nn
# ---------------------------------------------------------------------------------------------

class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, norm, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class _ResNet18(nn.Module):
    def __init__(self, norm, num_classes=10):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(norm, 64, 1)
        self.layer2 = self._layer(norm, 128, 2)
        self.layer3 = self._layer(norm, 256, 2)
        self.layer4 = self._layer(norm, 512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)       # not the default 1/0: a real affine
                nn.init.uniform_(m.bias, -0.5, 0.5)

    def _layer(self, norm, planes, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), norm(planes))
        layers = [_BasicBlock(norm, self.inplanes, planes, stride, downsample),
                  _BasicBlock(norm, planes, planes)]
        self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# float32 on 2x3x32x32 is ill-conditioned: layer4's BatchNorms see 2 values per channel, and
# torch's own float32 gradients then differ from float64 by ~1% (so do ours, by a similar
# amount, in other places). float32 uses 64x64 (8 values per channel there) for a tight check.
@pytest.mark.parametrize("dtype, tol, size", [(torch.float32, 1e-4, 64), (torch.float64, 1e-9, 32)],
                         ids=["f32", "f64"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_resnet18_matches_torch(dtype, tol, size, channels_last):
    """Train steps (with in-place ReLU after every norm), then eval: outputs, grads, buffers."""
    torch.manual_seed(0)
    ref = _ResNet18(nn.BatchNorm2d).to(dtype)
    ours = _ResNet18(nl.BatchNorm2d).to(dtype)
    ours.load_state_dict(ref.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref, ours = ref.to(memory_format=fmt), ours.to(memory_format=fmt)
    assert sum(isinstance(m, nl.BatchNorm2d) for m in ours.modules()) == 20
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randn(2, 3, size, size, generator=g, dtype=dtype).contiguous(memory_format=fmt)
        target = torch.randn(2, 10, generator=g, dtype=dtype)
        ref.zero_grad(), ours.zero_grad()
        with _record() as rec:
            out = ours(x)
            TF.mse_loss(out, target).backward()
        assert rec.ops.count("batch_norm_train") == 20 and rec.ops.count("batch_norm_train_backward") == 20
        out_ref = ref(x)
        TF.mse_loss(out_ref, target).backward()
        torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=10 * tol, atol=10 * tol,
                                       msg=lambda m: f"step {step} {name}: {m}")
    for (name, b), c in zip(ours.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, size, size, generator=g, dtype=dtype).contiguous(memory_format=fmt)
    with torch.no_grad(), _record() as rec:
        y = ours(x)
    assert rec.ops.count("batch_norm_eval") == 20
    torch.testing.assert_close(y, ref(x), rtol=tol, atol=tol)
