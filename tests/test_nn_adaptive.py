"""normlab.nn.adaptive: SwitchableNorm, AdaIN, ConditionalBatchNorm2d, FiLM, FRN + TLU, EvoNorm
B0/S0 and WSConv2d against the float64 reference (forward and hand-derived backward)."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import normlab
import normlab.nn as nl
from normlab import reference as ref
from normlab.nn import adaptive as A


def _np(t):
    return t.detach().cpu().numpy()


def _randomize(module, seed=0, skip=()):
    """Random parameters (not near-degenerate) so that every term of the math is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name not in skip:
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
    return module


def _close(a, b, tol=1e-10):
    np.testing.assert_allclose(_np(a) if isinstance(a, torch.Tensor) else a, b, rtol=tol, atol=tol)


def _grads(module, x, dy, *extra):
    xt = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(xt, *extra)
    y.backward(dy)
    return y, xt.grad


# ============================================================================ Switchable Norm

SN_CASES = [(nl.SwitchableNorm1d, (6, 3)), (nl.SwitchableNorm1d, (4, 3, 5)),
            (nl.SwitchableNorm2d, (3, 4, 3, 2)), (nl.SwitchableNorm3d, (2, 2, 3, 2, 2))]


@pytest.mark.parametrize("cls, shape", SN_CASES)
@pytest.mark.parametrize("momentum", [0.3, None])
def test_switchable_norm_matches_the_reference_in_training_and_eval(cls, shape, momentum):
    C = shape[1]
    m = _randomize(cls(C, momentum=momentum, dtype=torch.float64))
    with torch.no_grad():
        m.mean_weight.copy_(torch.tensor([0.3, -0.5, 0.9], dtype=torch.float64))
        m.var_weight.copy_(torch.tensor([-0.2, 0.7, 0.1], dtype=torch.float64))
    g = torch.Generator().manual_seed(C)
    for step in range(3):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * (1 + step) + step
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        rm, rv = _np(m.running_mean).copy(), _np(m.running_var).copy()
        y_ref, cache = ref.switchable_norm_forward(_np(x), _np(m.mean_weight), _np(m.var_weight),
                                                   _np(m.weight), _np(m.bias), eps=m.eps)
        dx_ref, dmw, dvw, dw, db = ref.switchable_norm_backward(_np(dy), cache)
        y, dx = _grads(m, x, dy)
        _close(y, y_ref)
        _close(dx, dx_ref, 1e-9)
        _close(m.mean_weight.grad, dmw, 1e-9)
        _close(m.var_weight.grad, dvw, 1e-9)
        _close(m.weight.grad, dw, 1e-9)
        _close(m.bias.grad, db, 1e-9)
        if len(shape) == 2:
            assert m.mean_weight.grad[0] == 0 and m.var_weight.grad[0] == 0   # no IN term on (N, C)
        f = momentum if momentum is not None else 1.0 / (step + 1)
        new_rm, new_rv = ref.running_stats_update(rm, rv, cache["bn_mean"], cache["bn_var"], cache["count"], f)
        _close(m.running_mean, new_rm, 1e-12)
        _close(m.running_var, new_rv, 1e-12)
        assert int(m.num_batches_tracked) == step + 1
    m.eval()
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    y_ref, cache = ref.switchable_norm_forward(_np(x), _np(m.mean_weight), _np(m.var_weight), _np(m.weight),
                                               _np(m.bias), running_mean=_np(m.running_mean),
                                               running_var=_np(m.running_var), eps=m.eps)
    dx_ref, dmw, dvw, dw, db = ref.switchable_norm_backward(_np(dy), cache)
    y, dx = _grads(m, x, dy)
    _close(y, y_ref)
    _close(dx, dx_ref, 1e-9)
    _close(m.mean_weight.grad, dmw, 1e-9)
    _close(m.var_weight.grad, dvw, 1e-9)
    for k, v in m.state_dict().items():               # eval changes no state
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("which, twin", [
    (0, lambda C: nn.InstanceNorm2d(C, affine=True, eps=1e-5)),
    (1, lambda C: nn.GroupNorm(1, C, eps=1e-5)),
    (2, lambda C: nn.BatchNorm2d(C, eps=1e-5, momentum=0.2)),
])
def test_switchable_norm_with_one_hot_weights_is_in_ln_or_bn(which, twin):
    C = 3
    m = _randomize(nl.SwitchableNorm2d(C, momentum=0.2, dtype=torch.float64), skip=("mean_weight", "var_weight"))
    t = twin(C).double()
    with torch.no_grad():
        m.mean_weight.fill_(-60.0)[which] = 60.0        # softmax = one-hot up to e^-120
        m.var_weight.fill_(-60.0)[which] = 60.0
        t.weight.copy_(m.weight)
        t.bias.copy_(m.bias)
    x = torch.randn(4, C, 5, 3, dtype=torch.float64) * 2 + 1
    torch.testing.assert_close(m(x), t(x), rtol=1e-10, atol=1e-10)
    if which == 2:                                       # BN: the same running statistics and eval
        torch.testing.assert_close(m.running_mean, t.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.running_var, t.running_var, rtol=1e-12, atol=1e-12)
        m.eval(), t.eval()
        torch.testing.assert_close(m(x), t(x), rtol=1e-10, atol=1e-10)


def test_switchable_norm_gradcheck():
    m = _randomize(nl.SwitchableNorm2d(2, dtype=torch.float64))
    x = torch.randn(3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        m.mean_weight.copy_(torch.tensor([0.1, -0.4, 0.3]))
    assert torch.autograd.gradcheck(lambda x, *p: m(x), (x, m.mean_weight, m.var_weight, m.weight))
    m.eval()
    assert torch.autograd.gradcheck(lambda x, *p: m(x), (x, m.mean_weight, m.var_weight))


# ============================================================================ AdaIN


def test_adain_matches_the_reference_with_different_spatial_sizes():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) * 2 + 1
    s = torch.randn(3, 4, 3, 2, generator=g, dtype=torch.float64) * 3 - 2
    dy = torch.randn(c.shape, generator=g, dtype=torch.float64)
    y_ref, cache = ref.adain_forward(_np(c), _np(s), eps=1e-5)
    dc_ref, ds_ref = ref.adain_backward(_np(dy), cache)
    ct, st = c.clone().requires_grad_(), s.clone().requires_grad_()
    y = nl.AdaIN(eps=1e-5)(ct, st)
    y.backward(dy)
    _close(y, y_ref)
    _close(ct.grad, dc_ref, 1e-9)
    _close(st.grad, ds_ref, 1e-9)
    # what AdaIN is for: the output carries the style's per-(n, c) mean and (eps-shifted) std
    torch.testing.assert_close(y.mean(dim=(2, 3)), s.mean(dim=(2, 3)))
    s_std = torch.sqrt(s.var(dim=(2, 3), correction=0) + 1e-5)
    c_var = c.var(dim=(2, 3), correction=0)
    torch.testing.assert_close(y.std(dim=(2, 3), correction=0), s_std * torch.sqrt(c_var / (c_var + 1e-5)))


def test_adain_gradcheck_and_float32():
    c = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(nl.AdaIN(), (c, s))
    y = nl.AdaIN()(c.detach().float(), s.detach().float())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), nl.AdaIN()(c, s).detach(), rtol=1e-5, atol=1e-5)


# ============================================================================ Conditional BN


@pytest.mark.parametrize("momentum", [0.2, None])
def test_conditional_batch_norm_matches_the_reference_and_batch_norm(momentum):
    C, K = 3, 5
    m = nl.ConditionalBatchNorm2d(C, K, momentum=momentum, dtype=torch.float64)
    bn = nn.BatchNorm2d(C, momentum=momentum, affine=False).double()
    with torch.no_grad():
        m.gamma.weight.copy_(torch.rand(K, C, dtype=torch.float64) + 0.5)
        m.beta.weight.copy_(torch.randn(K, C, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([4, 0, 4, 2])                  # a repeated class and unused ones
    for step in range(3):
        x = torch.randn(4, C, 3, 5, generator=g, dtype=torch.float64) * (step + 1) - step
        dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
        y_ref, cache = ref.conditional_batch_norm_forward(_np(x), _np(labels), _np(m.gamma.weight),
                                                          _np(m.beta.weight), eps=m.eps)
        dx_ref, dg_ref, db_ref = ref.conditional_batch_norm_backward(_np(dy), cache)
        y, dx = _grads(m, x, dy, labels)
        bn(x)
        _close(y, y_ref)
        _close(dx, dx_ref, 1e-9)
        _close(m.gamma.weight.grad, dg_ref, 1e-9)
        _close(m.beta.weight.grad, db_ref, 1e-9)
        assert np.all(dg_ref[[1, 3]] == 0)                 # classes not in the batch get no gradient
        torch.testing.assert_close(m.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
        assert int(m.num_batches_tracked) == step + 1
    m.eval()
    x = torch.randn(4, C, 3, 5, generator=g, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    y_ref, cache = ref.conditional_batch_norm_forward(_np(x), _np(labels), _np(m.gamma.weight), _np(m.beta.weight),
                                                      mean=_np(m.running_mean), var=_np(m.running_var), eps=m.eps)
    y, dx = _grads(m, x, dy, labels)
    _close(y, y_ref)
    _close(dx, ref.conditional_batch_norm_backward(_np(dy), cache)[0], 1e-9)


def test_conditional_batch_norm_starts_as_batch_norm_and_loads_its_checkpoint():
    bn = nn.BatchNorm2d(4, affine=False)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.num_batches_tracked.fill_(7)
    m = nl.ConditionalBatchNorm2d(4, num_classes=3)
    result = m.load_state_dict(bn.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["beta.weight", "gamma.weight"] and not result.unexpected_keys
    x, labels = torch.randn(5, 4, 3, 3), torch.tensor([0, 1, 2, 1, 0])
    bn.eval(), m.eval()
    torch.testing.assert_close(m(x, labels), bn(x))
    bn.train(), m.train()
    torch.testing.assert_close(m(x, labels), bn(x))
    nt = nl.ConditionalBatchNorm2d(4, 3, track_running_stats=False).eval()   # batch statistics in eval
    assert nt.running_mean is None
    torch.testing.assert_close(nt(x, labels), nn.functional.batch_norm(x, None, None, training=True))


def test_conditional_batch_norm_gradcheck():
    m = nl.ConditionalBatchNorm2d(2, 3, dtype=torch.float64)
    with torch.no_grad():
        m.gamma.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([2, 0, 2])
    assert torch.autograd.gradcheck(lambda x, gw, bw: m(x, labels), (x, m.gamma.weight, m.beta.weight))


# ============================================================================ FiLM


def test_film_matches_the_reference_and_linear_film_conditions():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 2, 5, generator=g, dtype=torch.float64)
    gamma = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    y_ref, cache = ref.film_forward(_np(x), _np(gamma), _np(beta))
    dx_ref, dg_ref, db_ref = ref.film_backward(_np(dy), cache)
    xt = x.clone().requires_grad_()
    y = nl.FiLM()(xt, gamma, beta)
    y.backward(dy)
    _close(y, y_ref)
    _close(xt.grad, dx_ref)
    _close(gamma.grad, dg_ref)
    _close(beta.grad, db_ref)
    assert torch.autograd.gradcheck(nl.FiLM(), (xt.detach()[:2, :, :1].requires_grad_(),
                                                gamma.detach()[:2].requires_grad_(), beta.detach()[:2].requires_grad_()))
    # LinearFiLM: identity at zero init; otherwise gamma = 1 + W_g c + b_g, beta = W_b c + b_b
    lf = nl.LinearFiLM(6, 4, zero_init=True, dtype=torch.float64)
    cond = torch.randn(3, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(lf(x, cond), x)
    lf = nl.LinearFiLM(6, 4, dtype=torch.float64)
    out = lf.proj(cond)
    torch.testing.assert_close(lf(x, cond), nl.FiLM()(x, 1 + out[:, :4], out[:, 4:]))
    lf(x, cond).square().sum().backward()
    assert lf.proj.weight.grad.abs().sum() > 0


# ============================================================================ FRN + TLU


@pytest.mark.parametrize("cls, shape", [(nl.FilterResponseNorm2d, (3, 4, 3, 5)), (nl.FilterResponseNorm, (5, 3)),
                                        (nl.FilterResponseNorm, (2, 3, 4)), (nl.FilterResponseNorm, (2, 2, 2, 3, 2))])
@pytest.mark.parametrize("learnable_eps, tlu", [(False, True), (True, True), (True, False)])
def test_filter_response_norm_matches_the_reference(cls, shape, learnable_eps, tlu):
    C = shape[1]
    m = _randomize(cls(C, eps=1e-3, learnable_eps=learnable_eps, tlu=tlu, dtype=torch.float64))
    with torch.no_grad():
        if tlu:
            m.tau.copy_(torch.linspace(-0.3, 0.8, C))      # some outputs clip at tau, some do not
        if learnable_eps:
            m.eps_learned.fill_(-0.02)                     # negative: |.| matters
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    eps_eff = m.eps + (0.02 if learnable_eps else 0.0)
    y_ref, cache = ref.filter_response_norm_forward(_np(x), _np(m.weight), _np(m.bias),
                                                    None if not tlu else _np(m.tau), eps=eps_eff)
    dx_ref, dw, db, dtau, deps = ref.filter_response_norm_backward(_np(dy), cache)
    if tlu:
        assert 0.1 < np.mean(cache["mask"] == 0) < 0.9
    y, dx = _grads(m, x, dy)
    _close(y, y_ref)
    _close(dx, dx_ref, 1e-9)
    _close(m.weight.grad, dw, 1e-9)
    _close(m.bias.grad, db, 1e-9)
    if tlu:
        _close(m.tau.grad, dtau, 1e-9)
    if learnable_eps:
        _close(m.eps_learned.grad, [-deps], 1e-9)          # d|e|/de = sign(e) = -1
    m.eval()                                              # no state: eval is the same function
    torch.testing.assert_close(m(x), y.detach(), rtol=0, atol=0)


def test_filter_response_norm_gradcheck_and_tlu_module():
    m = _randomize(nl.FilterResponseNorm2d(2, learnable_eps=True, dtype=torch.float64))
    with torch.no_grad():
        m.tau.copy_(torch.tensor([0.2, -0.1]))
    x = torch.randn(2, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: m(x), (x, m.weight, m.bias, m.tau, m.eps_learned))
    # FRN + TLU == FRN(tlu=False) then TLU with the same tau; a fresh TLU is ReLU
    plain = nl.FilterResponseNorm2d(2, tlu=False, learnable_eps=True, dtype=torch.float64)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k != "tau"})
    tlu = nl.TLU(2, dtype=torch.float64)
    torch.testing.assert_close(nn.functional.relu(x), tlu(x))
    with torch.no_grad():
        tlu.tau.copy_(m.tau)
    torch.testing.assert_close(m(x), tlu(plain(x)))


# ============================================================================ EvoNorm


@pytest.mark.parametrize("cls, shape", [(nl.EvoNormB0_2d, (3, 4, 3, 5)), (nl.EvoNormB0, (6, 3)),
                                        (nl.EvoNormB0, (2, 3, 4)), (nl.EvoNormB0, (2, 2, 2, 3, 2))])
@pytest.mark.parametrize("momentum", [0.25, None])
def test_evonorm_b0_matches_the_reference_in_training_and_eval(cls, shape, momentum):
    C = shape[1]
    m = _randomize(cls(C, momentum=momentum, dtype=torch.float64))
    with torch.no_grad():
        m.v.copy_(torch.linspace(-0.5, 1.5, C))            # both sides of the max are taken
    g = torch.Generator().manual_seed(4)
    both = set()
    for step in range(3):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * (step + 1) + 0.5
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        rv = _np(m.running_var).copy()
        y_ref, cache = ref.evonorm_b0_forward(_np(x), _np(m.v), _np(m.weight), _np(m.bias), eps=m.eps)
        dx_ref, dv, dw, db = ref.evonorm_b0_backward(_np(dy), cache)
        both.update(np.unique(cache["L"] > cache["R"]).tolist())
        y, dx = _grads(m, x, dy)
        _close(y, y_ref)
        _close(dx, dx_ref, 1e-9)
        _close(m.v.grad, dv, 1e-9)
        _close(m.weight.grad, dw, 1e-9)
        _close(m.bias.grad, db, 1e-9)
        f = momentum if momentum is not None else 1.0 / (step + 1)
        _, new_rv = ref.running_stats_update(np.zeros(C), rv, cache["mean"], cache["var"], cache["count"], f)
        _close(m.running_var, new_rv, 1e-12)
        assert int(m.num_batches_tracked) == step + 1
    assert both == {True, False}, "the test should take both branches of the max"
    m.eval()
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    y_ref, cache = ref.evonorm_b0_forward(_np(x), _np(m.v), _np(m.weight), _np(m.bias),
                                          running_var=_np(m.running_var), eps=m.eps)
    rv = m.running_var.clone()
    y, dx = _grads(m, x, dy)
    _close(y, y_ref)
    _close(dx, ref.evonorm_b0_backward(_np(dy), cache)[0], 1e-9)
    assert torch.equal(m.running_var, rv)


@pytest.mark.parametrize("cls, shape, groups", [(nl.EvoNormS0_2d, (3, 6, 3, 5), 3), (nl.EvoNormS0, (4, 6), 2),
                                                (nl.EvoNormS0, (2, 4, 5), 1), (nl.EvoNormS0, (2, 4, 2, 3, 2), 4)])
def test_evonorm_s0_matches_the_reference(cls, shape, groups):
    C = shape[1]
    m = _randomize(cls(C, groups=groups, dtype=torch.float64))
    with torch.no_grad():
        m.v.copy_(torch.linspace(-1.0, 2.0, C))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.3
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    y_ref, cache = ref.evonorm_s0_forward(_np(x), _np(m.v), _np(m.weight), _np(m.bias), groups=groups, eps=m.eps)
    dx_ref, dv, dw, db = ref.evonorm_s0_backward(_np(dy), cache)
    y, dx = _grads(m, x, dy)
    _close(y, y_ref)
    _close(dx, dx_ref, 1e-9)
    _close(m.v.grad, dv, 1e-9)
    _close(m.weight.grad, dw, 1e-9)
    _close(m.bias.grad, db, 1e-9)
    m.eval()
    torch.testing.assert_close(m(x), y.detach(), rtol=0, atol=0)
    # S0's denominator is group norm's: with v = 0 the gate is 1/2 and S0 = x / 2 / group_std
    with torch.no_grad():
        m.v.zero_()
    gstd = torch.sqrt(x.reshape(shape[0], groups, -1).var(dim=2, correction=0) + m.eps)
    gstd = gstd.repeat_interleave(C // groups, dim=1).reshape(shape[:2] + (1,) * (len(shape) - 2))
    torch.testing.assert_close(m(x), (x / 2 / gstd) * m.weight.view((1, C) + (1,) * (len(shape) - 2))
                               + m.bias.view((1, C) + (1,) * (len(shape) - 2)))


def test_evonorm_gradcheck():
    x = torch.randn(3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    b0 = _randomize(nl.EvoNormB0_2d(2, dtype=torch.float64))
    with torch.no_grad():
        b0.v.copy_(torch.tensor([0.3, -0.6]))
    assert torch.autograd.gradcheck(lambda x, *p: b0(x), (x, b0.v, b0.weight))
    s0 = _randomize(nl.EvoNormS0_2d(2, groups=1, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x, *p: s0(x), (x, s0.v, s0.weight))


# ============================================================================ WSConv2d


def test_ws_conv_standardizes_the_weight_and_matches_the_reference():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    ws = nl.WSConv2d(4, 6, 3, padding=1, groups=2, eps=1e-5, dtype=torch.float64)
    ws.load_state_dict(conv.state_dict())                 # an nn.Conv2d checkpoint loads as is
    conv2 = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    conv2.load_state_dict(ws.state_dict())                # and back: the raw weight is stored
    assert torch.equal(conv2.weight, conv.weight)
    what = ws.standardized_weight()
    flat = what.reshape(6, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    raw_var = conv.weight.reshape(6, -1).var(1, correction=0)
    torch.testing.assert_close(flat.var(1, correction=0), raw_var / (raw_var + 1e-5))
    what_ref, cache = ref.weight_standardization_forward(_np(conv.weight), eps=1e-5)
    _close(what, what_ref, 1e-12)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    dy = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    y = ws(x)
    torch.testing.assert_close(y, nn.functional.conv2d(x, torch.from_numpy(what_ref), conv.bias, padding=1, groups=2))
    y.backward(dy)
    w_leaf = torch.from_numpy(what_ref).requires_grad_()   # dL/dWhat, then the reference backward
    nn.functional.conv2d(x, w_leaf, conv.bias, padding=1, groups=2).backward(dy)
    _close(ws.weight.grad, ref.weight_standardization_backward(_np(w_leaf.grad), cache), 1e-9)
    assert torch.autograd.gradcheck(lambda w: A.standardize_weight(w, 1e-5),
                                    (torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True),))
    # invariant to a per-output-channel shift of the raw weight, and (up to eps) to a scale
    with torch.no_grad():
        ws2 = copy.deepcopy(ws)
        ws2.weight.add_(torch.tensor([3.0, 0.5, -2, 1, 7, 4], dtype=torch.float64).view(6, 1, 1, 1))
    torch.testing.assert_close(ws2(x), ws(x), rtol=1e-9, atol=1e-9)
    ws.eps = ws2.eps = 1e-14
    with torch.no_grad():
        ws2.weight.mul_(torch.tensor([3.0, 0.5, 2, 1, 7, 4], dtype=torch.float64).view(6, 1, 1, 1))
    torch.testing.assert_close(ws2(x), ws(x), rtol=1e-9, atol=1e-9)


@pytest.fixture
def one_thread():
    """Tiny convolutions: one intra-op thread avoids thread contention on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_group_norm_with_ws_conv_trains_at_batch_size_2(one_thread):
    torch.manual_seed(0)
    net = nn.Sequential(nl.WSConv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
                        nl.WSConv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    g = torch.Generator().manual_seed(1)
    # two classes: a bright blob in the top-left or in the bottom-right quadrant
    X = torch.randn(64, 1, 8, 8, generator=g) * 0.3
    yl = torch.arange(64) % 2
    X[yl == 0, :, :4, :4] += 1.5
    X[yl == 1, :, 4:, 4:] += 1.5
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    def full_loss():
        with torch.no_grad():
            return nn.functional.cross_entropy(net(X), yl).item()

    start = full_loss()
    for epoch in range(3):
        for i in range(0, 64, 2):                          # batch size 2
            opt.zero_grad()
            nn.functional.cross_entropy(net(X[i:i + 2]), yl[i:i + 2]).backward()
            opt.step()
    end = full_loss()
    assert end < 0.5 * start, (start, end)


# ============================================================================ shared battery


def _builders():
    return {
        "SwitchableNorm2d": (lambda **kw: nl.SwitchableNorm2d(3, **kw), (4, 3, 3, 2), ()),
        "SwitchableNorm1d": (lambda **kw: nl.SwitchableNorm1d(3, **kw), (5, 3), ()),
        "FilterResponseNorm2d": (lambda **kw: nl.FilterResponseNorm2d(3, learnable_eps=True, **kw), (2, 3, 3, 2), ()),
        "EvoNormB0_2d": (lambda **kw: nl.EvoNormB0_2d(3, **kw), (4, 3, 3, 2), ()),
        "EvoNormS0_2d": (lambda **kw: nl.EvoNormS0_2d(4, groups=2, **kw), (2, 4, 3, 2), ()),
        "ConditionalBatchNorm2d": (lambda **kw: nl.ConditionalBatchNorm2d(3, 4, **kw), (4, 3, 3, 2),
                                   (torch.tensor([3, 0, 1, 3]),)),
        "AdaIN": (lambda **kw: nl.AdaIN(), (2, 3, 3, 2), ("style",)),
        "FiLM": (lambda **kw: nl.FiLM(), (2, 3, 3, 2), ("gamma", "beta")),
        "LinearFiLM": (lambda **kw: nl.LinearFiLM(5, 3, **kw), (2, 3, 3, 2), ("cond",)),
        "TLU": (lambda **kw: nl.TLU(3, **kw), (2, 3, 3, 2), ()),
        "WSConv2d": (lambda **kw: nl.WSConv2d(3, 4, 3, padding=1, **kw), (2, 3, 4, 4), ()),
    }


def _extra_args(extra, shape, dtype, g):
    out = []
    for e in extra:
        if isinstance(e, torch.Tensor):
            out.append(e)
        elif e == "style":
            out.append(torch.randn(shape[:2] + (4, 4), generator=g).to(dtype) * 3 + 1)
        elif e == "cond":
            out.append(torch.randn(shape[0], 5, generator=g).to(dtype))
        else:
            out.append(torch.randn(shape[:2], generator=g).to(dtype))
    return out


@pytest.mark.parametrize("name", sorted(_builders()))
def test_battery_state_dict_pickle_deepcopy_repr_dtype(name):
    build, shape, extra = _builders()[name]
    g = torch.Generator().manual_seed(6)
    m = build()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.rand(p.shape, generator=g) * 0.5)
    x = torch.randn(shape, generator=g) * 2 + 1
    args = _extra_args(extra, shape, torch.float32, g)
    m.train()
    for _ in range(2):                                    # moves running statistics where there are any
        m(x, *args)
    m.eval()
    y = m(x, *args)
    fresh = build()
    fresh.load_state_dict(m.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(x, *args), y, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    again = build()
    again.load_state_dict(torch.load(buf))
    torch.testing.assert_close(again.eval()(x, *args), y, rtol=0, atol=0)
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        torch.testing.assert_close(clone(x, *args), y, rtol=0, atol=0)
    assert type(m).__name__ in repr(m)
    # dtype: float64 parameters on request; float16 input -> float16 output, finite
    m64 = build(dtype=torch.float64) if name not in ("AdaIN", "FiLM") else build()
    for p in list(m64.parameters()) + [b for b in m64.buffers() if b.is_floating_point()]:
        assert p.dtype == torch.float64
    if name != "WSConv2d":
        # (LinearFiLM's cond stays float32: it feeds the float32 nn.Linear)
        half = [a.half() if a.is_floating_point() and name != "LinearFiLM" else a for a in args]
        y16 = m.eval()(x.half(), *half)
        assert y16.dtype == torch.float16 and torch.isfinite(y16).all()
        torch.testing.assert_close(y16.float(), y, rtol=2e-2, atol=2e-2)


# ============================================================================ registry


def test_registry_builds_the_channel_norms_and_convert_norms_uses_them():
    assert type(nl.create_norm("switchablenorm", 4, dim=2)) is nl.SwitchableNorm2d
    assert type(nl.create_norm("sn1d", 4)) is nl.SwitchableNorm1d
    assert type(nl.create_norm("frn", 4, dim=2)) is nl.FilterResponseNorm2d
    assert type(nl.create_norm("filter_response_norm", 4, dim=3)) is nl.FilterResponseNorm
    assert nl.create_norm("frn", 4, tlu=False, learnable_eps=True).eps_learned is not None
    assert type(nl.create_norm("EvoNorm_B0_2d", 4)) is nl.EvoNormB0_2d
    assert type(nl.create_norm("evonorm-s0", 64, dim=2)) is nl.EvoNormS0_2d
    assert nl.create_norm("evonorm_s0", 64, dim=2).groups == 32
    assert nl.create_norm("evonorm_s0", 12, groups=3).groups == 3
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['groups'\]"):
        nl.create_norm("evonorm_b0", 4, groups=2)
    with pytest.raises(ValueError, match="needs dim in"):
        nl.create_norm("switchablenorm", 4)
    for name in ("AdaIN", "FiLM", "conditionalbatchnorm"):      # need extra forward inputs: not registered
        with pytest.raises(ValueError, match="unknown norm"):
            nl.create_norm(name, 4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2)
    w = model[1].weight.clone()
    model, replaced = nl.convert_norms(model, "evonorm_s0")
    assert [r[2] for r in replaced] == ["EvoNormS0_2d", "EvoNormS0_2d"]
    torch.testing.assert_close(model[1].weight, w)           # the per-channel affine carried over
    assert model(torch.randn(2, 3, 7, 7)).shape == (2, 8, 3, 3)
    model, replaced = nl.convert_norms(model, "switchablenorm", of="evonorm_s0")
    assert [r[2] for r in replaced] == ["SwitchableNorm2d", "SwitchableNorm2d"]


# ============================================================================ errors


ERRORS = [
    (lambda: nl.SwitchableNorm2d(0), ValueError, r"num_features must be a positive integer, got num_features=0"),
    (lambda: nl.SwitchableNorm2d(3, eps=-1.0), ValueError, r"eps=-1.0; use a small positive value"),
    (lambda: nl.SwitchableNorm2d(3, momentum=1.5), ValueError, r"momentum=1.5"),
    (lambda: nl.SwitchableNorm2d(3, affine="yes"), TypeError, r"affine must be True or False, got affine='yes'"),
    (lambda: nl.SwitchableNorm2d(3)(torch.randn(2, 3, 4)), ValueError,
     r"4-dimensional input \(N, C, H, W\), got an input of shape \(2, 3, 4\).*reshape"),
    (lambda: nl.SwitchableNorm2d(3)(torch.randn(2, 5, 4, 4)), ValueError,
     r"num_features=3 but the input of shape \(2, 5, 4, 4\) has 5 channels.*num_features=5"),
    (lambda: nl.SwitchableNorm1d(3)(torch.randn(1, 3)), ValueError,
     r"more than 1 value per channel.*\(1, 3\).*at least 2 samples, or evaluation mode"),
    (lambda: nl.EvoNormB0_2d(3)(torch.randn(1, 3, 1, 1)), ValueError, r"more than 1 value per channel"),
    (lambda: nl.SwitchableNorm2d(3)(torch.ones(2, 3, 2, 2, dtype=torch.long)), TypeError, r"dtype torch.int64.*input.float\(\)"),
    (lambda: nl.AdaIN(eps=0)(torch.randn(1, 2, 3), torch.randn(1, 2, 3)), ValueError, r"eps=0"),
    (lambda: nl.AdaIN()(torch.randn(2, 3, 4), torch.randn(1, 3, 4)), ValueError,
     r"content \(2, 3, 4\) and style \(1, 3, 4\).*style.expand\(2, \*style.shape\[1:\]\)"),
    (lambda: nl.AdaIN()(torch.randn(2, 3), torch.randn(2, 3)), ValueError, r"shapes \(2, 3\) and \(2, 3\).*unsqueeze"),
    (lambda: nl.AdaIN()(torch.randn(2, 3, 4), torch.randn(2, 3, 4).double()), ValueError, r"torch.float32.*torch.float64.*\.to"),
    (lambda: nl.ConditionalBatchNorm2d(3, 0), ValueError, r"num_classes=0"),
    (lambda: nl.ConditionalBatchNorm2d(3, 4)(torch.randn(2, 3, 2, 2), torch.tensor([0, 4])), ValueError,
     r"num_classes=4 \(labels in \[0, 4\)\), got label 4; remap the labels or build it with num_classes=5"),
    (lambda: nl.ConditionalBatchNorm2d(3, 4)(torch.randn(2, 3, 2, 2), torch.tensor([-1, 0])), ValueError, r"got label -1"),
    (lambda: nl.ConditionalBatchNorm2d(3, 4)(torch.randn(2, 3, 2, 2), torch.tensor([0.0, 1.0])), TypeError,
     r"integer tensor.*torch.float32.*dtype=torch.long"),
    (lambda: nl.ConditionalBatchNorm2d(3, 4)(torch.randn(2, 3, 2, 2), torch.tensor([0, 1, 2])), ValueError,
     r"shape \(2,\), got labels of shape \(3,\)"),
    (lambda: nl.FiLM()(torch.randn(2, 3, 4), torch.randn(3), torch.randn(2, 3)), ValueError,
     r"gamma of shape \(N, C\) = \(2, 3\).*got shape \(3,\).*gamma.expand\(2, 3\)"),
    (lambda: nl.LinearFiLM(5, 3)(torch.randn(2, 3, 4), torch.randn(2, 4)), ValueError, r"\(2, 5\), got \(2, 4\)"),
    (lambda: nl.FilterResponseNorm2d(3, learnable_eps=True, learnable_eps_init=-1.0), ValueError,
     r"learnable_eps_init=-1.0; the paper starts it at 1e-4"),
    (lambda: nl.FilterResponseNorm2d(3, eps=0.0), ValueError, r"eps=0.0"),
    (lambda: nl.TLU(3)(torch.randn(2, 4)), ValueError, r"num_features=3.*\(2, 4\).*\(N, 3, \*spatial\)"),
    (lambda: nl.EvoNormS0_2d(6, groups=4), ValueError, r"num_groups=4 does not divide num_channels=6; choose one of \[1, 2, 3, 6\]"),
    (lambda: nl.EvoNormS0(6)(torch.randn(2)), ValueError, r"at least 2 dimensions.*add the missing"),
    (lambda: nl.EvoNormB0_2d(3, momentum=-0.1), ValueError, r"momentum=-0.1"),
    (lambda: nl.WSConv2d(3, 4, 3, eps=-1e-5), ValueError, r"eps=-1e-05"),
]


@pytest.mark.parametrize("i", range(len(ERRORS)))
def test_errors_name_the_value_and_the_fix(i):
    call, exc, pattern = ERRORS[i]
    with pytest.raises(exc, match=pattern):
        call()


def test_reference_errors_name_the_value():
    x = np.random.default_rng(0).normal(size=(2, 4, 3))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got values in \[0, 3\]"):
        ref.conditional_batch_norm_forward(x, [0, 3], np.ones((3, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"num_groups=3 does not divide num_channels=4"):
        ref.evonorm_s0_forward(x, np.ones(4), groups=3)
    with pytest.raises(ValueError, match=r"mean_weight must have shape \(3,\), got shape \(2,\)"):
        ref.switchable_norm_forward(x, np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match=r"gamma and beta of shape \(2, 4\)"):
        ref.film_forward(x, np.ones(4), np.zeros((2, 4)))


def test_docstring_examples_run():
    import doctest
    result = doctest.testmod(A, verbose=False)
    assert result.attempted >= 5 and result.failed == 0


@pytest.mark.parametrize("build, extra", [(lambda: nl.SwitchableNorm2d(3), ()), (lambda: nl.EvoNormB0_2d(3), ()),
                                          (lambda: nl.ConditionalBatchNorm2d(3, 2), (torch.tensor([0, 1]),))])
def test_a_non_finite_batch_leaves_the_running_statistics_alone(build, extra):
    m = build()
    m(torch.randn(2, 3, 2, 2) + 1, *extra)
    before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("running", "num_batches"))}
    x = torch.randn(2, 3, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    with pytest.warns(normlab.NonFiniteWarning, match=r"channel\(s\) \[1\]"):
        m(x, *extra)
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), k
    with normlab.nonfinite_policy("raise"), pytest.raises(normlab.NonFiniteError):
        m(x, *extra)
