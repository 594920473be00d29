"""normlab.reference.ghost_batch_norm: against torch autograd, batch norm, and its own rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normlab.reference import (batch_norm_backward, batch_norm_forward, ghost_batch_norm_backward,
                               ghost_batch_norm_forward, virtual_batch_slices)


def _torch_ghost(x, w, b, vbs, eps):
    """Ghost BN written independently with torch ops (chunks of vbs, remainder merged)."""
    N = x.shape[0]
    k = max(N // vbs, 1)
    bounds = [i * vbs for i in range(k)] + [N]
    dims = [0] + list(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        xs = x[s:e]
        var, mean = torch.var_mean(xs, dim=dims, keepdim=True, correction=0)
        outs.append((xs - mean) / torch.sqrt(var + eps) * w.view(shape) + b.view(shape))
    return torch.cat(outs)


@pytest.mark.parametrize("n, vbs, expected", [
    (10, 4, [(0, 4), (4, 10)]), (8, 4, [(0, 4), (4, 8)]), (3, 8, [(0, 3)]), (9, 3, [(0, 3), (3, 6), (6, 9)]),
    (7, 1, [(i, i + 1) for i in range(6)] + [(6, 7)]), (0, 4, [(0, 0)]),
])
def test_virtual_batch_slices_merge_the_remainder(n, vbs, expected):
    got = [(s.start, s.stop) for s in virtual_batch_slices(n, vbs)]
    assert got == expected
    if n >= vbs:
        assert all(vbs <= e - s < 2 * vbs for s, e in got)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4"])
def test_virtual_batch_size_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="virtual_batch_size"):
        virtual_batch_slices(8, bad)


@pytest.mark.parametrize("shape, vbs", [((10, 3), 4), ((12, 2, 5), 3), ((7, 3, 2, 3), 2), ((6, 4), 6)])
def test_ghost_matches_torch_autograd(shape, vbs):
    rng = np.random.default_rng(sum(shape) + vbs)
    x = rng.normal(size=shape) * 3 + 1
    C = shape[1]
    w, b = rng.normal(size=C), rng.normal(size=C)
    dy = rng.normal(size=shape)
    y, cache = ghost_batch_norm_forward(x, w, b, virtual_batch_size=vbs, eps=1e-5)
    dx, dw, db = ghost_batch_norm_backward(dy, cache)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = _torch_ghost(xt, wt, bt, vbs, 1e-5)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-10, atol=1e-11)
    # running-statistics inputs describe the whole batch
    axes = (0,) + tuple(range(2, x.ndim))
    np.testing.assert_allclose(cache["mean"], x.mean(axis=axes), rtol=1e-12)
    np.testing.assert_allclose(cache["var"], x.var(axis=axes), rtol=1e-12)
    assert cache["count"] == x.size // C


def test_ghost_with_one_virtual_batch_is_batch_norm():
    rng = np.random.default_rng(1)
    x, dy = rng.normal(size=(6, 3, 4)), rng.normal(size=(6, 3, 4))
    w, b = rng.normal(size=3), rng.normal(size=3)
    for vbs in (6, 7, 100):
        yg, cg = ghost_batch_norm_forward(x, w, b, virtual_batch_size=vbs)
        yb, cb = batch_norm_forward(x, w, b)
        np.testing.assert_array_equal(yg, yb)
        for a, c in zip(ghost_batch_norm_backward(dy, cg), batch_norm_backward(dy, cb)):
            np.testing.assert_array_equal(a, c)


def test_each_virtual_batch_is_standardized_and_differs_from_batch_norm():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 2)) + np.arange(12)[:, None]      # virtual batches have different means
    y, _ = ghost_batch_norm_forward(x, virtual_batch_size=4)
    for s in range(0, 12, 4):
        np.testing.assert_allclose(y[s:s + 4].mean(axis=0), 0, atol=1e-12)
        np.testing.assert_allclose(y[s:s + 4].var(axis=0), 1, rtol=1e-4)
    y_bn, _ = batch_norm_forward(x)
    assert np.abs(y - y_bn).max() > 0.5


def test_channels_last_equals_channels_first():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(9, 3, 4, 5))
    dy = rng.normal(size=x.shape)
    y, c = ghost_batch_norm_forward(x, virtual_batch_size=4)
    y_cl, c_cl = ghost_batch_norm_forward(np.moveaxis(x, 1, -1), virtual_batch_size=4, channels_last=True)
    np.testing.assert_allclose(np.moveaxis(y_cl, -1, 1), y, rtol=1e-13, atol=1e-13)
    dx = ghost_batch_norm_backward(dy, c)[0]
    dx_cl = ghost_batch_norm_backward(np.moveaxis(dy, 1, -1), c_cl)[0]
    np.testing.assert_allclose(np.moveaxis(dx_cl, -1, 1), dx, rtol=1e-12, atol=1e-12)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        ghost_batch_norm_forward(np.zeros(5), virtual_batch_size=2)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        ghost_batch_norm_forward(np.zeros((4, 3)), np.ones(2), virtual_batch_size=2)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ghost_batch_norm_forward(np.zeros((4, 3)), virtual_batch_size=1)   # 1 sample per virtual batch
    with pytest.raises(ValueError, match="eps"):
        ghost_batch_norm_forward(np.zeros((4, 3)), virtual_batch_size=2, eps=0.0)


def test_docstring_examples_run():
    import doctest

    from normlab.reference import ghost_batch_norm
    result = doctest.testmod(ghost_batch_norm, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 3
