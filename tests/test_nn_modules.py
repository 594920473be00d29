"""normlab.nn modules: one battery over every module, then parity with the torch.nn twins."""

from __future__ import annotations

import copy
import io
import pickle

import numba
import pytest
import torch
from torch import nn

import normlab.nn as nl


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: thread pools only add contention on a small shared machine (see
    test_nn_fused.one_thread); the kernels' results do not depend on the thread count."""
    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])

# (normlab class, torch.nn twin, constructor args, input shape)
MODULES = [
    (nl.BatchNorm1d, nn.BatchNorm1d, (3,), (5, 3)),
    (nl.BatchNorm1d, nn.BatchNorm1d, (3,), (5, 3, 7)),
    (nl.BatchNorm2d, nn.BatchNorm2d, (3,), (4, 3, 5, 6)),
    (nl.BatchNorm3d, nn.BatchNorm3d, (2,), (3, 2, 3, 4, 5)),
    (nl.LayerNorm, nn.LayerNorm, ((4, 5),), (3, 4, 5)),
    (nl.GroupNorm, nn.GroupNorm, (2, 6), (3, 6, 5)),
    (nl.InstanceNorm1d, nn.InstanceNorm1d, (3,), (4, 3, 9)),
    (nl.InstanceNorm2d, nn.InstanceNorm2d, (3,), (2, 3, 4, 5)),
    (nl.InstanceNorm3d, nn.InstanceNorm3d, (2,), (2, 2, 3, 3, 4)),
    (nl.RMSNorm, nn.RMSNorm, (7,), (3, 5, 7)),
]
IDS = [f"{m[0].__name__}-{len(m[3])}d" for m in MODULES]


def _perturb(module, seed=0):
    """Give every parameter and buffer a non-default value so round trips are meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return module


@pytest.mark.parametrize("ours, twin, args, shape", MODULES, ids=IDS)
class TestBattery:
    def test_is_a_drop_in_subclass_with_the_same_repr(self, ours, twin, args, shape):
        a, b = ours(*args), twin(*args)
        assert isinstance(a, twin)
        assert repr(a) == repr(b)

    def test_pickle_and_deepcopy_keep_state(self, ours, twin, args, shape):
        a = _perturb(ours(*args))
        for c in (pickle.loads(pickle.dumps(a)), copy.deepcopy(a)):
            assert type(c) is ours
            for (k1, v1), (k2, v2) in zip(a.state_dict().items(), c.state_dict().items()):
                assert k1 == k2 and torch.equal(v1, v2)

    def test_state_dict_round_trips_with_torch_both_ways(self, ours, twin, args, shape):
        a, b = _perturb(ours(*args), 1), twin(*args)
        b.load_state_dict(a.state_dict())
        c = ours(*args)
        c.load_state_dict(b.state_dict())
        assert list(a.state_dict()) == list(b.state_dict()) == list(c.state_dict())
        for k, v in a.state_dict().items():
            assert torch.equal(v, c.state_dict()[k]), k
        buf = io.BytesIO()
        torch.save(b.state_dict(), buf)
        buf.seek(0)
        d = ours(*args)
        d.load_state_dict(torch.load(buf))
        for k, v in a.state_dict().items():
            assert torch.equal(v, d.state_dict()[k]), k

    def test_to_dtype_and_train_eval_switching(self, ours, twin, args, shape):
        a, b = ours(*args).double(), twin(*args).double()
        b.load_state_dict(a.state_dict())
        x = torch.randn(shape, dtype=torch.float64)
        for mode in ("train", "eval", "train"):
            getattr(a, mode)()
            getattr(b, mode)()
            ya, yb = a(x), b(x)
            assert ya.dtype == torch.float64
            torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
        for k, v in b.state_dict().items():
            torch.testing.assert_close(a.state_dict()[k], v, rtol=1e-10, atol=1e-12)

    def test_zero_size_batch_where_torch_allows_it(self, ours, twin, args, shape):
        x = torch.randn((0,) + tuple(shape[1:]))
        try:
            expected = twin(*args)(x)
        except (RuntimeError, ValueError):
            pytest.skip("torch.nn rejects an empty batch here too")
        got = ours(*args)(x)
        assert got.shape == expected.shape


def _copy_params(a, b):
    b.load_state_dict(a.state_dict())


CONFIGS = []
for affine in (True, False):
    for track in (True, False):
        for momentum in (0.1, None, 0.5):
            CONFIGS.append((affine, track, momentum))


@pytest.mark.parametrize("affine, track, momentum", CONFIGS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-10)], ids=["f32", "f64"])
@pytest.mark.parametrize("kind, shape", [
    ("bn1d", (7, 3)), ("bn1d", (5, 4, 11)), ("bn2d", (4, 3, 5, 7)), ("bn2d-cl", (3, 5, 4, 6)),
    ("bn3d", (2, 3, 3, 4, 5)), ("in1d", (3, 4, 13)), ("in2d", (2, 3, 5, 5)),
])
def test_running_stat_norms_match_torch_over_steps(kind, shape, affine, track, momentum, dtype, tol):
    cls = {"bn1d": "BatchNorm1d", "bn2d": "BatchNorm2d", "bn2d-cl": "BatchNorm2d",
           "bn3d": "BatchNorm3d", "in1d": "InstanceNorm1d", "in2d": "InstanceNorm2d"}[kind]
    C = shape[1]
    a = getattr(nl, cls)(C, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    b = getattr(nn, cls)(C, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    _perturb(a, 3) if affine else None
    _copy_params(a, b)
    g = torch.Generator().manual_seed(hash((kind, affine, track, str(momentum))) % 2**31)
    for step in range(3):
        x = (torch.randn(shape, generator=g, dtype=dtype) * (step + 1) + step)
        if kind.endswith("-cl"):
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(shape, generator=g, dtype=dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a(xa), b(xb)
        torch.testing.assert_close(ya, yb, rtol=tol, atol=tol)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=tol * 10, atol=tol * 10)
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=tol * 10, atol=tol * 10)
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(va, vb, rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")
    a.eval()
    b.eval()
    x = torch.randn(shape, generator=g, dtype=dtype)
    torch.testing.assert_close(a(x), b(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-10)], ids=["f32", "f64"])
@pytest.mark.parametrize("case", ["ln", "ln-noaffine", "ln-nobias", "gn", "gn-noaffine", "gn-cl", "rms", "rms-noaffine", "rms-eps"])
def test_per_sample_norms_match_torch(case, dtype, tol):
    g = torch.Generator().manual_seed(len(case))
    if case.startswith("ln"):
        kw = dict(elementwise_affine=case != "ln-noaffine", bias=case != "ln-nobias")
        a, b = nl.LayerNorm((5, 7), **kw, dtype=dtype), nn.LayerNorm((5, 7), **kw, dtype=dtype)
        shape = (3, 2, 5, 7)
    elif case.startswith("gn"):
        a = nl.GroupNorm(3, 6, affine=case != "gn-noaffine", dtype=dtype)
        b = nn.GroupNorm(3, 6, affine=case != "gn-noaffine", dtype=dtype)
        shape = (4, 6, 5, 3)
    else:
        kw = dict(elementwise_affine=case != "rms-noaffine", eps=1e-3 if case == "rms-eps" else None)
        a, b = nl.RMSNorm(11, **kw, dtype=dtype), nn.RMSNorm(11, **kw, dtype=dtype)
        shape = (4, 3, 11)
    _perturb(a)
    _copy_params(a, b)
    x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 1
    if case.endswith("-cl"):
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    torch.testing.assert_close(ya, yb, rtol=tol, atol=tol)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=tol * 10, atol=tol * 10)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=tol * 10, atol=tol * 10)


def test_old_checkpoint_without_num_batches_tracked_loads():
    b = nn.BatchNorm2d(4)
    sd = {k: v for k, v in _perturb(b).state_dict().items() if k != "num_batches_tracked"}
    a = nl.BatchNorm2d(4)
    a.load_state_dict(sd, strict=False)
    torch.testing.assert_close(a.running_mean, b.running_mean)


def test_checkpoint_of_a_model_loads_both_ways():
    def make(mod):
        return nn.Sequential(nn.Conv2d(3, 8, 3), mod.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                             mod.GroupNorm(2, 8), nn.Flatten(), nn.LayerNorm(8 * 4 * 4))
    torch.manual_seed(0)
    ref = make(nn)
    x = torch.randn(2, 3, 8, 8)
    ref.train()(x)
    ours = make(nl)
    ours.load_state_dict(ref.state_dict())
    back = make(nn)
    back.load_state_dict(ours.state_dict())
    ref.eval(), ours.eval(), back.eval()
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(back(x), ref(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
def test_running_statistics_on_host_views_equal_the_torch_operations(monkeypatch, dtype, momentum):
    """In plain eager CPU code the running statistics are folded on NumPy views of the buffers
    (functional._fold_on_host); inside a dispatch mode as torch operations, which the mode sees.
    Both agree to rounding over several steps, and both bump the buffers' version counters."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    from normlab.nn import functional as NF

    folded = []
    real = NF._fold_on_host
    monkeypatch.setattr(NF, "_fold_on_host", lambda *a: folded.append(real(*a)) or folded[-1])
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(6, 5, 3, generator=g, dtype=dtype) * 2 + 1 for _ in range(4)]
    host, ops = (nl.BatchNorm1d(5, momentum=momentum).to(dtype) for _ in range(2))
    versions = host.running_mean._version, host.running_var._version
    for x in xs:
        host(x)
        with Seen() as seen:
            ops(x)
        assert any("mul_" in op for op in seen.ops) and any("add_" in op for op in seen.ops)
    assert folded == [True, False] * len(xs)          # host views, then (in the mode) torch ops
    assert host.running_mean._version == versions[0] + len(xs)
    assert host.running_var._version == versions[1] + len(xs)
    assert int(host.num_batches_tracked) == int(ops.num_batches_tracked) == len(xs)
    ulp = torch.finfo(dtype).eps
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(host, name), getattr(ops, name), rtol=4 * ulp,
                                   atol=4 * ulp, msg=name)
