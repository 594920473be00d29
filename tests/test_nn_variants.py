"""normlab.nn variants: BatchRenorm, GhostBatchNorm, FrozenBatchNorm against the reference and BN."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import normlab.nn as nl
from normlab import reference as ref


def _perturb(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
    return module


def _np(t):
    return t.detach().cpu().numpy()


# ------------------------------------------------------------------------------ BatchRenorm


@pytest.mark.parametrize("cls, shape", [(nl.BatchRenorm1d, (6, 3)), (nl.BatchRenorm1d, (4, 3, 5)),
                                        (nl.BatchRenorm2d, (3, 4, 5, 2)), (nl.BatchRenorm3d, (2, 2, 3, 2, 2))])
@pytest.mark.parametrize("momentum", [0.3, None])
def test_batch_renorm_matches_the_reference_over_steps(cls, shape, momentum):
    C = shape[1]
    m = cls(C, momentum=momentum, r_max=1.5, d_max=0.5, dtype=torch.float64)
    _perturb(m)
    with torch.no_grad():                      # running stats far enough from the data that r, d clip
        m.running_var.mul_(0.2)
        m.num_batches_tracked.zero_()
    g = torch.Generator().manual_seed(C)
    clipped = 0
    for step in range(4):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * (1 + step) + step
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        rm, rv = _np(m.running_mean).copy(), _np(m.running_var).copy()
        y_ref, cache = ref.batch_renorm_forward(_np(x), rm, rv, _np(m.weight), _np(m.bias),
                                                r_max=1.5, d_max=0.5, eps=m.eps)
        dx_ref, dw_ref, db_ref = ref.batch_renorm_backward(_np(dy), cache)
        clipped += int(np.sum(np.isclose(np.abs(cache["d"]), 0.5)) + np.sum(np.isclose(cache["r"], 1.5)))
        xt = x.clone().requires_grad_()
        m.weight.grad = m.bias.grad = None
        y = m(xt)
        y.backward(dy)
        np.testing.assert_allclose(_np(y), y_ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(_np(xt.grad), dx_ref, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(_np(m.weight.grad), dw_ref, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(_np(m.bias.grad), db_ref, rtol=1e-9, atol=1e-10)
        f = momentum if momentum is not None else 1.0 / (step + 1)
        new_rm, new_rv = ref.running_stats_update(rm, rv, cache["mean"], cache["var"], cache["count"], f)
        np.testing.assert_allclose(_np(m.running_mean), new_rm, rtol=1e-12)
        np.testing.assert_allclose(_np(m.running_var), new_rv, rtol=1e-12)
        assert int(m.num_batches_tracked) == step + 1
    assert clipped > 0, "the test should exercise the clipping of r and d"
    m.eval()
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y_ref, _ = ref.batch_norm_forward(_np(x), _np(m.weight), _np(m.bias), mean=_np(m.running_mean),
                                      var=_np(m.running_var), eps=m.eps)
    np.testing.assert_allclose(_np(m(x)), y_ref, rtol=1e-10, atol=1e-10)


def test_batch_renorm_with_r_max_1_d_max_0_is_batch_norm():
    a = _perturb(nl.BatchRenorm2d(3, r_max=1.0, d_max=0.0, momentum=0.2))
    b = nn.BatchNorm2d(3, momentum=0.2)
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5, generator=g) * 2 + 1
        dy = torch.randn(x.shape, generator=g)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a(xa), b(xb)
        torch.testing.assert_close(ya, yb, rtol=2e-5, atol=2e-5)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-4, atol=1e-4)
    for k, v in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    a.eval(), b.eval()
    x = torch.randn(4, 3, 5, 5, generator=g)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def test_batch_renorm_differs_from_batch_norm_when_the_limits_are_open():
    a = nl.BatchRenorm1d(2, r_max=3.0, d_max=5.0)
    b = nn.BatchNorm1d(2)
    x = torch.randn(8, 2) * 4 + 3          # running stats (0, 1) are far from the batch's
    assert (a(x) - b(x)).abs().max() > 1.0


def test_batch_renorm_schedule_warms_up_then_relaxes_linearly():
    m = nl.BatchRenorm1d(2, r_max=3.0, d_max=5.0, warmup_steps=2, ramp_steps=(4, 2))
    seen = []
    for _ in range(8):
        seen.append((m.current_r_max, m.current_d_max))
        m(torch.randn(5, 2))
    assert seen == [(1.0, 0.0), (1.0, 0.0), (1.0, 0.0), (1.5, 2.5), (2.0, 5.0), (2.5, 5.0), (3.0, 5.0), (3.0, 5.0)]
    # the schedule lives in num_batches_tracked, so it resumes from a checkpoint
    m2 = nl.BatchRenorm1d(2, r_max=3.0, d_max=5.0, warmup_steps=2, ramp_steps=(4, 2))
    m2.load_state_dict(m.state_dict())
    assert (m2.current_r_max, m2.current_d_max) == (3.0, 5.0)
    # during the warm-up the layer is batch norm
    w = nl.BatchRenorm1d(2, warmup_steps=10)
    x = torch.randn(6, 2) * 3 + 2
    torch.testing.assert_close(w(x), nn.BatchNorm1d(2)(x))


def test_batch_renorm_gradcheck_where_r_and_d_are_clipped():
    # With r and d clipped they are locally constant, so finite differences see the same function
    # as the analytic gradient (which treats r, d as constants by definition).
    m = nl.BatchRenorm1d(3, r_max=1.5, d_max=0.5, momentum=0.0, dtype=torch.float64)
    _perturb(m)
    with torch.no_grad():
        m.running_mean.fill_(10.0)
        m.running_var.fill_(0.01)
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: torch.func.functional_call(m, {"weight": w, "bias": b}, (x,)),
                                    (x, w, b))


@pytest.mark.parametrize("kw, match", [(dict(r_max=0.5), "r_max"), (dict(d_max=-1.0), "d_max"),
                                       (dict(r_max=float("inf")), "r_max"), (dict(warmup_steps=-1), "warmup_steps"),
                                       (dict(warmup_steps=1.5), "warmup_steps"), (dict(ramp_steps=(1, 2, 3)), "ramp_steps"),
                                       (dict(momentum=1.5), "momentum"), (dict(eps=0), "eps")])
def test_batch_renorm_rejects_bad_arguments(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        nl.BatchRenorm2d(4, **kw)


# ------------------------------------------------------------------------------ GhostBatchNorm


@pytest.mark.parametrize("cls, shape, vbs", [(nl.GhostBatchNorm1d, (10, 3), 4), (nl.GhostBatchNorm1d, (9, 2, 4), 3),
                                             (nl.GhostBatchNorm2d, (7, 3, 3, 2), 2), (nl.GhostBatchNorm3d, (5, 2, 2, 2, 3), 2)])
def test_ghost_matches_the_reference_over_steps(cls, shape, vbs):
    C = shape[1]
    m = _perturb(cls(C, virtual_batch_size=vbs, momentum=0.25, dtype=torch.float64))
    g = torch.Generator().manual_seed(C + vbs)
    for step in range(3):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * (1 + step) - step
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        rm, rv = _np(m.running_mean).copy(), _np(m.running_var).copy()
        y_ref, cache = ref.ghost_batch_norm_forward(_np(x), _np(m.weight), _np(m.bias), virtual_batch_size=vbs)
        dx_ref, dw_ref, db_ref = ref.ghost_batch_norm_backward(_np(dy), cache)
        xt = x.clone().requires_grad_()
        m.weight.grad = m.bias.grad = None
        y = m(xt)
        y.backward(dy)
        np.testing.assert_allclose(_np(y), y_ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(_np(xt.grad), dx_ref, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(_np(m.weight.grad), dw_ref, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(_np(m.bias.grad), db_ref, rtol=1e-9, atol=1e-10)
        new_rm, new_rv = ref.running_stats_update(rm, rv, cache["mean"], cache["var"], cache["count"], 0.25)
        np.testing.assert_allclose(_np(m.running_mean), new_rm, rtol=1e-12)
        np.testing.assert_allclose(_np(m.running_var), new_rv, rtol=1e-12)
    assert len(cache["slices"]) >= 2, "the test should use several virtual batches"


@pytest.mark.parametrize("vbs", [8, 64])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_with_virtual_batch_at_least_the_batch_is_batch_norm(vbs, momentum):
    a = _perturb(nl.GhostBatchNorm2d(3, virtual_batch_size=vbs, momentum=momentum))
    b = nn.BatchNorm2d(3, momentum=momentum)
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(vbs)
    for _ in range(3):
        x = torch.randn(8, 3, 4, 4, generator=g) * 3 + 1
        dy = torch.randn(x.shape, generator=g)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a(xa), b(xb)
        torch.testing.assert_close(ya, yb, rtol=2e-5, atol=2e-5)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.bias.grad, b.bias.grad, rtol=1e-4, atol=1e-4)
    for k, v in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def test_ghost_gradcheck_float64():
    m = _perturb(nl.GhostBatchNorm1d(2, virtual_batch_size=2, momentum=0.0, dtype=torch.float64))
    x = torch.randn(5, 2, 2, dtype=torch.float64, requires_grad=True)
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: torch.func.functional_call(m, {"weight": w, "bias": b}, (x,)),
                                    (x, w, b))
    assert torch.autograd.gradgradcheck(m, (torch.randn(5, 2, dtype=torch.float64, requires_grad=True),))


def test_ghost_rejects_a_single_sample_virtual_batch_and_bad_size():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nl.GhostBatchNorm1d(3, virtual_batch_size=1)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="virtual_batch_size"):
        nl.GhostBatchNorm1d(3, virtual_batch_size=0)


# ------------------------------------------------------------------------------ FrozenBatchNorm


def test_frozen_loads_a_batch_norm_checkpoint_and_matches_its_eval():
    bn = nn.BatchNorm2d(4)
    bn.train()
    for _ in range(3):
        bn(torch.randn(8, 4, 3, 3) * 2 + 1)
    _perturb(bn, 5)                                    # weight and bias non-default too
    buf = io.BytesIO()
    torch.save(bn.state_dict(), buf)
    buf.seek(0)
    fz = nl.FrozenBatchNorm2d(4)
    fz.load_state_dict(torch.load(buf))               # strict: num_batches_tracked is ignored
    bn.eval()
    x = torch.randn(5, 4, 6, 6)
    torch.testing.assert_close(fz(x), bn(x))
    fz.train()
    torch.testing.assert_close(fz(x), bn(x))          # train() changes nothing
    assert list(fz.parameters()) == []
    assert set(fz.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    torch.testing.assert_close(nl.FrozenBatchNorm.from_batchnorm(bn)(x), bn(x))


def test_frozen_gradient_reaches_the_input_only():
    fz = _perturb(nl.FrozenBatchNorm1d(3, dtype=torch.float64))
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fz, (x,))
    scale = fz.weight / torch.sqrt(fz.running_var + fz.eps)
    fz(x).sum().backward()
    torch.testing.assert_close(x.grad, scale.view(1, 3, 1).expand_as(x))


def test_frozen_refuses_a_bn_without_running_stats_and_bad_inputs():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        nl.FrozenBatchNorm.from_batchnorm(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="4-dimensional"):
        nl.FrozenBatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="num_features=3"):
        nl.FrozenBatchNorm2d(3)(torch.randn(2, 4, 2, 2))


# ------------------------------------------------------------------------------ shared


VARIANTS = [(lambda: nl.BatchRenorm2d(3, r_max=2.0), (4, 3, 3, 3)),
            (lambda: nl.GhostBatchNorm2d(3, virtual_batch_size=2), (4, 3, 3, 3)),
            (lambda: nl.BatchRenorm1d(3), (5, 3)), (lambda: nl.GhostBatchNorm1d(3, 2), (6, 3, 2))]


@pytest.mark.parametrize("make, shape", VARIANTS, ids=["brn2d", "gbn2d", "brn1d", "gbn1d"])
def test_variants_round_trip_state_with_batch_norm_and_pickle(make, shape):
    a = _perturb(make(), 2)
    a(torch.randn(shape))                                 # a real training step first
    twin = {2: nn.BatchNorm2d, 1: nn.BatchNorm1d}[a._dim](3)
    twin.load_state_dict(a.state_dict())
    c = make()
    c.load_state_dict(twin.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(v, c.state_dict()[k]), k
    for d in (pickle.loads(pickle.dumps(a)), copy.deepcopy(a)):
        assert type(d) is type(a) and repr(d) == repr(a)
        for k, v in a.state_dict().items():
            assert torch.equal(v, d.state_dict()[k]), k
    a.eval(), twin.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(a(x), twin(x))             # inference is BN with running stats
    assert not isinstance(a, nn.BatchNorm2d)               # not mistaken for plain BN by converters


@pytest.mark.parametrize("make, shape", VARIANTS, ids=["brn2d", "gbn2d", "brn1d", "gbn1d"])
def test_variants_check_input_rank_and_channels(make, shape):
    m = make()
    with pytest.raises(ValueError, match="dimensional"):
        m(torch.randn(2, 3, 2, 2, 2))
    bad = list(shape)
    bad[1] = 5
    with pytest.raises(ValueError, match="num_features=3"):
        m(torch.randn(bad))


def test_variants_keep_float16_output_dtype():
    for m in (nl.BatchRenorm2d(3), nl.GhostBatchNorm2d(3, 2), nl.FrozenBatchNorm2d(3)):
        x = torch.randn(4, 3, 2, 2).half()
        assert m.half()(x).dtype == torch.float16
