"""normlab.reference backward passes against central finite differences of the forward passes.

Every backward is checked on small random odd shapes (sizes 1, 2 and primes), channels-first
and channels-last where the method has a layout, with and without weight and bias, and for
batch norm in both modes (batch statistics and given statistics).

The loss is a random projection ``L = sum(y * dy)``: its gradient is exactly what
``<method>_backward(dy, cache)`` returns, so one central difference per input element checks
dx, dweight and dbias at once.

Tolerance. With step h = 1e-6 the central difference has truncation error ~h^2 |L'''| (about
1e-12 here) and rounding error ~eps_f64 |L| / h (about 1e-10 * |L|; |L| < 100 on these
shapes), so the difference agrees with the true gradient to ~1e-8 absolute. We assert
1e-6 relative to the gradient's magnitude: two orders of margin over that estimate, and still
far below the O(1) relative error that any wrong term in a backward formula produces.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pytest

from normlab import reference as R

FD_STEP = 1e-6
FD_RTOL = 1e-6
EPS = 1e-5

# Channels-first logical shapes (N, C, *spatial): N in {2, 3, 5}, C in {1, 3, 7}, spatial sizes
# in {1, 2, 5}, 0 to 3 spatial dims.
CHANNEL_SHAPES = [
    (5, 3), (2, 7), (3, 1),                                   # no spatial dim
    (2, 3, 5), (3, 7, 1), (5, 1, 2),                          # 1 spatial dim
    (2, 3, 5, 1), (3, 1, 2, 5), (2, 7, 1, 2),                 # 2 spatial dims
    (2, 3, 1, 2, 5), (3, 1, 5, 2, 1), (2, 7, 2, 1, 2),        # 3 spatial dims
]
# Instance norm in training needs > 1 spatial element per (sample, channel).
INSTANCE_SHAPES = [s for s in CHANNEL_SHAPES if len(s) > 2 and int(np.prod(s[2:])) > 1]
# (channels-first shape, num_groups): groups of 1, some and all channels.
GROUP_CASES = [
    ((2, 6, 5), 1), ((2, 6, 5), 2), ((2, 6, 5), 3), ((2, 6, 5), 6),
    ((5, 6), 2), ((2, 7), 7), ((3, 3, 2, 1), 3), ((2, 6, 1, 2, 2), 3), ((3, 1, 2, 2), 1),
]
# (x shape, number of trailing normalized dims) for layer norm and RMS norm.
TRAILING_CASES = [
    ((7,), 1), ((5, 7), 1), ((3, 1), 1), ((2, 3, 5), 1), ((2, 3, 5), 2), ((2, 1, 5), 2),
    ((2, 3, 2, 5), 3),
]
AFFINE = [(False, False), (True, False), (False, True), (True, True)]


@dataclass(frozen=True)
class Case:
    method: str            # bn_train, bn_eval, in_train, in_eval, gn, ln, rms, brn
    shape: tuple           # channels-first (N, C, *S) for channel methods, else the x shape
    channels_last: bool = False
    weight: bool = False
    bias: bool = False
    extra: int = 0         # num_groups (gn) or number of normalized trailing dims (ln, rms)

    def __str__(self):
        shape = "x".join(map(str, self.shape))
        layout = "cl" if self.channels_last else "cf"
        affine = ("w" if self.weight else "") + ("b" if self.bias else "") or "noaffine"
        extra = {"gn": f"-G{self.extra}", "ln": f"-k{self.extra}", "rms": f"-k{self.extra}"}
        return f"{self.method}-{shape}-{layout}{extra.get(self.method, '')}-{affine}"

    @property
    def x_shape(self):
        if self.channels_last:
            return (self.shape[0],) + self.shape[2:] + (self.shape[1],)
        return self.shape

    @property
    def param_shape(self):
        if self.method in ("ln", "rms"):
            return self.shape[len(self.shape) - self.extra:]
        return (self.shape[1],)


def _channel_cases(method, shapes, extras=None):
    extras = extras or [0] * len(shapes)
    return [Case(method, s, cl, w, b, e) for s, e in zip(shapes, extras)
            for cl in (False, True) for w, b in AFFINE]


CASES = (
    _channel_cases("bn_train", CHANNEL_SHAPES)
    + _channel_cases("bn_eval", CHANNEL_SHAPES)
    + _channel_cases("in_train", INSTANCE_SHAPES)
    + _channel_cases("in_eval", INSTANCE_SHAPES + [(3, 7, 1)])
    + _channel_cases("gn", [s for s, _ in GROUP_CASES], [g for _, g in GROUP_CASES])
    + [Case("ln", s, False, w, b, k) for s, k in TRAILING_CASES for w, b in AFFINE]
    + [Case("rms", s, False, w, False, k) for s, k in TRAILING_CASES for w in (False, True)]
)


def _rng(case) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(str(case).encode()))


def _make(case):
    """Random x, weight, bias (None when absent), statistics for the given-statistics modes, dy."""
    rng = _rng(case)
    C = case.param_shape
    x = rng.normal(0.3, 1.5, size=case.x_shape)
    w = rng.uniform(0.5, 2.0, size=C) * rng.choice([-1.0, 1.0], size=C) if case.weight else None
    b = rng.normal(size=C) if case.bias else None
    stats = dict(mean=rng.normal(size=C), var=rng.uniform(0.2, 2.0, size=C))
    dy = rng.normal(size=case.x_shape)
    return x, w, b, stats, dy


def _forward(case, x, w, b, stats):
    cl = case.channels_last
    if case.method == "bn_train":
        return R.batch_norm_forward(x, w, b, eps=EPS, channels_last=cl)
    if case.method == "bn_eval":
        return R.batch_norm_forward(x, w, b, eps=EPS, channels_last=cl, **stats)
    if case.method == "in_train":
        return R.instance_norm_forward(x, w, b, eps=EPS, channels_last=cl)
    if case.method == "in_eval":
        return R.instance_norm_forward(x, w, b, eps=EPS, channels_last=cl, **stats)
    if case.method == "gn":
        return R.group_norm_forward(x, case.extra, w, b, eps=EPS, channels_last=cl)
    if case.method == "ln":
        return R.layer_norm_forward(x, case.param_shape, w, b, eps=EPS)
    if case.method == "rms":
        return R.rms_norm_forward(x, case.param_shape, w, eps=EPS)
    raise AssertionError(case.method)


BACKWARD = dict(bn_train=R.batch_norm_backward, bn_eval=R.batch_norm_backward,
                in_train=R.instance_norm_backward, in_eval=R.instance_norm_backward,
                gn=R.group_norm_backward, ln=R.layer_norm_backward, rms=R.rms_norm_backward,
                brn=R.batch_renorm_backward)


def central_difference(loss, a, h=FD_STEP):
    """d loss / d a by central differences, perturbing ``a`` in place one element at a time."""
    flat = a.reshape(-1)                       # a view: a must be contiguous
    assert np.shares_memory(flat, a)
    grad = np.empty(a.size)
    for i in range(a.size):
        old = flat[i]
        flat[i] = old + h
        up = loss()
        flat[i] = old - h
        down = loss()
        flat[i] = old
        grad[i] = (up - down) / (2 * h)
    return grad.reshape(a.shape)


def assert_grad_close(analytic, numeric, name):
    assert analytic is not None, f"{name} is None but the parameter is present"
    assert analytic.dtype == np.float64
    assert analytic.shape == numeric.shape, (name, analytic.shape, numeric.shape)
    scale = max(1.0, float(np.max(np.abs(numeric))))
    err = float(np.max(np.abs(analytic - numeric)))
    assert err <= FD_RTOL * scale, f"{name}: max |analytic - finite difference| = {err:.3e} (scale {scale:.3g})"


def check_against_fd(loss_of, backward_grads, x, w, b):
    """``loss_of()`` reads x, w, b (perturbed in place); ``backward_grads`` = (dx, dweight, dbias)."""
    dx, dw, db = backward_grads
    assert_grad_close(dx, central_difference(loss_of, x), "dx")
    if w is None:
        assert dw is None
    else:
        assert_grad_close(dw, central_difference(loss_of, w), "dweight")
    if b is None:
        assert db is None
    else:
        assert_grad_close(db, central_difference(loss_of, b), "dbias")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_finite_differences(case):
    x, w, b, stats, dy = _make(case)
    y, cache = _forward(case, x, w, b, stats)
    assert y.shape == x.shape
    grads = BACKWARD[case.method](dy, cache)

    def loss():
        return float(np.sum(_forward(case, x, w, b, stats)[0] * dy))

    check_against_fd(loss, grads, x, w, b)


# ---------------------------------------------------------------------------------------------
# Batch Renorm: r and d are constants in the backward pass (Ioffe, 2017), but functions of x in
# the forward pass. Two checks:
#  * "frozen": central differences of the renorm formula with r and d frozen at the values the
#    reference computed (and that formula is first checked to reproduce the reference forward);
#  * "clipped": running statistics chosen so that every r and d is clipped, hence locally
#    constant, so central differences of the reference forward itself must match.
# ---------------------------------------------------------------------------------------------

BRN_CASES = [Case("brn", s, cl, w, b) for s in CHANNEL_SHAPES for cl in (False, True)
             for w, b in AFFINE]


def _to_cf(a, cl):
    return np.moveaxis(a, -1, 1) if cl else a


def _renorm_frozen(x, w, b, r, d, cl, eps=EPS):
    """Batch renorm with r, d given as constants: written independently of the reference."""
    xc = _to_cf(x, cl)
    axes = (0,) + tuple(range(2, xc.ndim))
    bshape = (1, -1) + (1,) * (xc.ndim - 2)
    mean = xc.mean(axis=axes, keepdims=True)
    var = ((xc - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (xc - mean) / np.sqrt(var + eps) * r.reshape(bshape) + d.reshape(bshape)
    if w is not None:
        y = y * w.reshape(bshape)
    if b is not None:
        y = y + b.reshape(bshape)
    return np.moveaxis(y, 1, -1) if cl else y


@pytest.mark.parametrize("case", BRN_CASES, ids=str)
def test_batch_renorm_backward_matches_finite_differences_with_r_d_frozen(case):
    x, w, b, _, dy = _make(case)
    rng = _rng(case)
    C = case.shape[1]
    # running statistics near the batch's, so that r and d are mostly NOT clipped
    running_mean = rng.normal(0.3, 0.5, size=C)
    running_var = rng.uniform(1.0, 4.0, size=C)
    y, cache = R.batch_renorm_forward(x, running_mean, running_var, w, b, r_max=3.0, d_max=5.0,
                                      eps=EPS, channels_last=case.channels_last)
    r, d = cache["r"], cache["d"]
    assert r.shape == d.shape == (C,)
    np.testing.assert_allclose(y, _renorm_frozen(x, w, b, r, d, case.channels_last),
                               rtol=1e-12, atol=1e-12)
    grads = R.batch_renorm_backward(dy, cache)

    def loss():
        return float(np.sum(_renorm_frozen(x, w, b, r, d, case.channels_last) * dy))

    check_against_fd(loss, grads, x, w, b)


BRN_CLIPPED_CASES = [c for c in BRN_CASES if c.weight == c.bias]


@pytest.mark.parametrize("case", BRN_CLIPPED_CASES, ids=str)
def test_batch_renorm_backward_matches_finite_differences_when_r_d_are_clipped(case):
    x, w, b, _, dy = _make(case)
    C = case.shape[1]
    xc = _to_cf(x, case.channels_last)
    axes = (0,) + tuple(range(2, xc.ndim))
    batch_mean, batch_var = xc.mean(axis=axes), xc.var(axis=axes)
    r_max, d_max = 2.0, 0.5
    # alternate channels between r clipped at r_max / at 1/r_max, d at +d_max / -d_max;
    # the margins (x100) keep every r, d clipped under the +-1e-6 perturbations
    hi = np.arange(C) % 2 == 0
    running_var = np.where(hi, (batch_var + EPS) / 100.0 - EPS, 100.0 * (batch_var + EPS))
    running_var = np.maximum(running_var, 0.0)
    sigma_r = np.sqrt(running_var + EPS)
    running_mean = batch_mean + np.where(hi, -1.0, 1.0) * 100.0 * d_max * sigma_r
    y, cache = R.batch_renorm_forward(x, running_mean, running_var, w, b, r_max=r_max,
                                      d_max=d_max, eps=EPS, channels_last=case.channels_last)
    np.testing.assert_array_equal(cache["r"], np.where(hi, r_max, 1.0 / r_max))
    np.testing.assert_array_equal(cache["d"], np.where(hi, d_max, -d_max))
    grads = R.batch_renorm_backward(dy, cache)

    def loss():
        return float(np.sum(R.batch_renorm_forward(
            x, running_mean, running_var, w, b, r_max=r_max, d_max=d_max, eps=EPS,
            channels_last=case.channels_last)[0] * dy))

    check_against_fd(loss, grads, x, w, b)


def test_finite_difference_check_detects_a_wrong_backward():
    """The FD harness itself can fail: the inference-mode formula is wrong for training mode."""
    case = Case("bn_train", (3, 2, 5), weight=True, bias=True)
    x, w, b, stats, dy = _make(case)
    _, cache = _forward(case, x, w, b, stats)
    cache = dict(cache, training=False)       # dx = g * rstd: drops the statistics' paths
    grads = R.batch_norm_backward(dy, cache)

    def loss():
        return float(np.sum(_forward(case, x, w, b, stats)[0] * dy))

    with pytest.raises(AssertionError, match="dx"):
        check_against_fd(loss, grads, x, w, b)
