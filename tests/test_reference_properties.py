"""normlab.reference: numerical stability, Chan merging, properties, and bad input.

"Exact" in the stability tests means exact: every float64 value is an integer multiple of a
common power of two, so the mean and the biased variance of the data *as stored* are rationals
computed here with Python integers (no rounding anywhere), and the relative error of a float
result is evaluated in Fraction arithmetic, also without rounding.
"""

from __future__ import annotations

import re
import zlib
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normlab import reference as R

# small and derandomized: fast and reproducible in CI
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True)


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


# ---------------------------------------------------------------------------- stability


def exact_mean_var(values) -> tuple[Fraction, Fraction]:
    """Exact mean and biased variance of a 1-D float64 array, as Fractions."""
    ratios = [float(v).as_integer_ratio() for v in values.tolist()]
    denom = max(d for _, d in ratios)                  # a power of two, a multiple of every d
    ints = [n * (denom // d) for n, d in ratios]       # values * denom, exactly
    n = len(ints)
    s1 = sum(ints)
    s2 = sum(k * k for k in ints)
    mean = Fraction(s1, n * denom)
    var = Fraction(n * s2 - s1 * s1, n * n * denom * denom)
    return mean, var


def rel_err(computed, exact: Fraction) -> float:
    return float(abs(Fraction(float(computed)) - exact) / abs(exact))


def naive_var(x, axes):
    """The one-pass textbook formula E[x^2] - E[x]^2 (what moments() must NOT do)."""
    return (x * x).mean(axis=axes) - x.mean(axis=axes) ** 2


@pytest.fixture(scope="module")
def large_mean_data():
    """100 000 values with mean 1e6 and standard deviation 1."""
    return _rng("large-mean").normal(1e6, 1.0, size=100_000)


def test_exact_reference_is_exact_on_a_known_case():
    values = np.array([1e6 + 0.5, 1e6 - 0.5, 1e6 + 1.5, 1e6 - 1.5])
    assert exact_mean_var(values) == (Fraction(10**6), Fraction(5, 4))


def test_two_pass_moments_are_accurate_on_large_mean_data(large_mean_data):
    x = large_mean_data
    mean_exact, var_exact = exact_mean_var(x)
    assert abs(float(mean_exact) - 1e6) < 0.05 and abs(float(var_exact) - 1.0) < 0.05
    mean, var = R.moments(x, axes=(0,), keepdims=False)
    assert mean.shape == var.shape == ()
    assert rel_err(mean, mean_exact) <= 1e-9
    assert rel_err(var, var_exact) <= 1e-9
    # keepdims (the default) keeps the reduced axis
    mean_k, var_k = R.moments(x, axes=(0,))
    assert mean_k.shape == var_k.shape == (1,)
    assert float(var_k[0]) == float(var)


def test_naive_one_pass_variance_fails_the_same_bound(large_mean_data):
    """Why two-pass matters: E[x^2] - E[x]^2 cancels catastrophically when |mean| >> std."""
    _, var_exact = exact_mean_var(large_mean_data)
    # E[x^2] ~ 1e12 carries an absolute rounding error ~1e-4, all of it left in var ~ 1
    assert rel_err(naive_var(large_mean_data, 0), var_exact) > 1e-9


def test_two_pass_moments_per_channel_on_large_mean_data(large_mean_data):
    # (N, C, L) = (1000, 4, 25): every channel gets 25 000 values; channel c has mean 1e6 * (c + 1)
    x = large_mean_data.reshape(1000, 4, 25) * 1.0 + np.array([0.0, 1e6, 2e6, 3e6])[None, :, None]
    mean, var = R.moments(x, axes=(0, 2), keepdims=False)
    assert mean.shape == var.shape == (4,)
    naive = naive_var(x, (0, 2))
    for c in range(4):
        mean_exact, var_exact = exact_mean_var(x[:, c, :].ravel())
        assert rel_err(mean[c], mean_exact) <= 1e-9
        assert rel_err(var[c], var_exact) <= 1e-9
        assert rel_err(naive[c], var_exact) > 1e-9


def test_chan_merge_is_accurate_on_large_mean_data(large_mean_data):
    x = large_mean_data
    _, var_exact = exact_mean_var(x)
    bounds = [0, 1, 2, 10, 1000, 31_337, 31_337, 70_000, 99_999, 100_000]   # incl. empty and 1
    summary = (0, np.zeros(()), np.zeros(()))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        summary = R.chan_merge(summary, R.summarize(x[lo:hi], axes=(0,)))
    assert summary[0] == x.size
    _, var = R.finalize(summary)
    assert rel_err(var, var_exact) <= 1e-9


def test_batch_norm_statistics_are_accurate_on_large_mean_data(large_mean_data):
    x = large_mean_data.reshape(2000, 2, 25)
    y, cache = R.batch_norm_forward(x)
    for c in range(2):
        mean_exact, var_exact = exact_mean_var(x[:, c, :].ravel())
        assert rel_err(cache["mean"][c], mean_exact) <= 1e-9
        assert rel_err(cache["var"][c], var_exact) <= 1e-9
    # and the normalized output is standardized (var ~1 >> eps)
    # mean(y) = (exact mean - computed mean) * rstd: a few ulps of 1e6 (1.2e-10 each)
    np.testing.assert_allclose(y.mean(axis=(0, 2)), 0.0, atol=1e-8)
    np.testing.assert_allclose(y.var(axis=(0, 2)), 1.0, atol=2e-5)


# ---------------------------------------------------------------------------- Chan merge


def _assert_summary_equal(got, expected, rtol=1e-12):
    count, mean, m2 = got
    e_count, e_mean, e_m2 = expected
    np.testing.assert_array_equal(count, e_count)
    assert np.shape(mean) == np.shape(e_mean) and np.shape(m2) == np.shape(e_m2)
    scale_mean = max(1.0, float(np.max(np.abs(e_mean), initial=0.0)))
    scale_m2 = max(1.0, float(np.max(np.abs(e_m2), initial=0.0)))
    np.testing.assert_allclose(mean, e_mean, rtol=0, atol=rtol * scale_mean)
    np.testing.assert_allclose(m2, e_m2, rtol=0, atol=rtol * scale_m2)


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 60), n_cuts=st.integers(0, 8),
       features=st.integers(1, 4), loc=st.sampled_from([0.0, 3.0, -1e3]),
       tree=st.booleans())
def test_chan_merge_of_random_splits_equals_summary_of_the_whole(seed, n, n_cuts, features, loc,
                                                                  tree):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc, rng.uniform(0.1, 10.0), size=(n, features))
    # cut points with repeats (empty blocks) and neighbours (blocks of one value)
    cuts = np.sort(rng.integers(0, n + 1, size=n_cuts))
    blocks = np.split(x, cuts, axis=0)
    summaries = [R.summarize(blk, axes=(0,)) for blk in blocks]
    rng.shuffle(summaries)                                 # any order
    while len(summaries) > 1:
        if tree:      # pairwise, as an all-reduce would
            summaries = [R.chan_merge(*summaries[i:i + 2]) if i + 1 < len(summaries)
                         else summaries[i] for i in range(0, len(summaries), 2)]
        else:         # a running fold, as a streaming estimator would
            summaries = [R.chan_merge(summaries[0], summaries[1])] + summaries[2:]
    merged = summaries[0]
    whole = R.summarize(x, axes=(0,))
    _assert_summary_equal(merged, whole)
    assert isinstance(merged[0], int) and merged[0] == n
    assert np.all(merged[2] >= 0)


def test_chan_merge_of_an_infinite_block_gives_the_wholes_mean_in_either_order():
    x = np.ones((10, 3))
    x[7, 0], x[2, 1], x[8, 1] = np.inf, np.inf, -np.inf     # feature 1: +inf and -inf
    a, b = R.summarize(x[:5], axes=(0,)), R.summarize(x[5:], axes=(0,))
    whole = R.summarize(x, axes=(0,))
    for merged in (R.chan_merge(a, b), R.chan_merge(b, a)):
        np.testing.assert_array_equal(merged[1], whole[1])   # inf, NaN, 1
        assert np.isnan(merged[2][:2]).all() and merged[2][2] == 0.0


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), n_blocks=st.integers(1, 6), features=st.integers(1, 5))
def test_chan_merge_with_per_feature_counts(seed, n_blocks, features):
    """Blocks with a different number of valid values per feature (e.g. missing values)."""
    rng = np.random.default_rng(seed)
    blocks, masks = [], []
    for _ in range(n_blocks):
        rows = int(rng.integers(0, 6))
        blocks.append(rng.normal(2.0, 3.0, size=(rows, features)))
        masks.append(rng.random((rows, features)) < 0.7)

    def per_feature_summary(blk, mask):
        parts = [R.summarize(blk[mask[:, f], f], axes=(0,)) for f in range(features)]
        return (np.array([p[0] for p in parts], dtype=np.int64),
                np.array([p[1] for p in parts]), np.array([p[2] for p in parts]))

    merged = per_feature_summary(blocks[0], masks[0])
    for blk, mask in zip(blocks[1:], masks[1:]):
        merged = R.chan_merge(merged, per_feature_summary(blk, mask))
    whole = np.concatenate(blocks)
    whole_mask = np.concatenate(masks)
    expected = per_feature_summary(whole, whole_mask)
    _assert_summary_equal(merged, expected)
    assert np.asarray(merged[0]).dtype == np.int64


def test_chan_merge_edge_cases():
    a = R.summarize(np.array([1.0, 2.0, 4.0]), axes=(0,))
    empty = R.summarize(np.zeros((0,)), axes=(0,))
    assert empty[0] == 0 and float(empty[1]) == 0.0 and float(empty[2]) == 0.0
    _assert_summary_equal(R.chan_merge(a, empty), a, rtol=0)
    _assert_summary_equal(R.chan_merge(empty, a), a, rtol=0)
    _assert_summary_equal(R.chan_merge(empty, empty), empty, rtol=0)
    one = R.summarize(np.array([7.0]), axes=(0,))
    assert one[0] == 1 and float(one[1]) == 7.0 and float(one[2]) == 0.0
    # [1, 2, 4] + [7]: mean 3.5, M2 = 6.25 + 2.25 + 0.25 + 12.25 = 21
    _assert_summary_equal(R.chan_merge(a, one), (4, np.float64(3.5), np.float64(21.0)), rtol=1e-15)


@pytest.mark.parametrize("ddof", [0, 1])
def test_finalize_matches_numpy_variance(ddof):
    x = _rng("finalize", ddof).normal(3.0, 2.0, size=(17, 3))
    mean, var = R.finalize(R.summarize(x, axes=(0,)), ddof=ddof)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(var, x.var(axis=0, ddof=ddof), rtol=1e-13)


def test_finalize_is_nan_where_the_variance_is_undefined():
    _, var = R.finalize(R.summarize(np.array([[5.0, 6.0]]), axes=(0,)), ddof=1)
    assert np.all(np.isnan(var))
    _, var = R.finalize(R.summarize(np.zeros((0, 2)), axes=(0,)))
    assert np.all(np.isnan(var))


def test_summarize_with_negative_and_multiple_axes():
    x = _rng("summarize").normal(size=(3, 4, 5))
    count, mean, m2 = R.summarize(x, axes=(0, -1))
    assert count == 15 and mean.shape == m2.shape == (4,)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2)), rtol=1e-14)
    np.testing.assert_allclose(m2, x.var(axis=(0, 2)) * 15, rtol=1e-13)


# ---------------------------------------------------------------------------- properties

def _forward(method, x, eps, cl, groups=1):
    if method == "bn":
        return R.batch_norm_forward(x, eps=eps, channels_last=cl)
    if method == "in":
        return R.instance_norm_forward(x, eps=eps, channels_last=cl)
    if method == "gn":
        return R.group_norm_forward(x, groups, eps=eps, channels_last=cl)
    if method == "ln":
        return R.layer_norm_forward(x, x.shape[1:], eps=eps)
    if method == "rms":
        return R.rms_norm_forward(x, x.shape[1:], eps=eps)
    raise AssertionError(method)


def _groups_view(method, a, cl, groups):
    """Rearrange ``a`` to (rows, M): one row per reduction group, its M elements along axis 1."""
    ac = np.moveaxis(a, -1, 1) if cl and method in ("bn", "in", "gn") else a
    N, C = ac.shape[:2]
    if method == "bn":
        return np.moveaxis(ac, 1, 0).reshape(C, -1)
    if method == "in":
        return ac.reshape(N * C, -1)
    if method == "gn":
        return ac.reshape(N * groups, -1)
    return ac.reshape(N, -1)


shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).flatmap(
    lambda spatial: st.tuples(st.integers(2, 5), st.sampled_from([1, 2, 3, 6]),
                              st.just(tuple(spatial))))


@PROPERTY
@given(method=st.sampled_from(["bn", "in", "gn", "ln", "rms"]), shape=shapes,
       cl=st.booleans(), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), loc=st.sampled_from([0.0, 1.0, -50.0]),
       eps=st.sampled_from([1e-5, 1e-3, 0.1]))
def test_standardized_output_per_reduction_group(method, shape, cl, seed, scale, loc, eps):
    """Without affine: each group has mean 0 and variance var / (var + eps) (mean square, for RMS)."""
    N, C, spatial = shape
    if method == "in" and int(np.prod(spatial)) == 1:
        spatial = spatial + (2,)
    groups = {1: 1, 2: 2, 3: 3, 6: 3}[C]
    if method not in ("bn", "in", "gn"):
        cl = False
    full = (N, C) + spatial
    rng = np.random.default_rng(seed)
    x = rng.normal(loc, scale, size=(N,) + spatial + (C,) if cl else full)
    y, cache = _forward(method, x, eps, cl, groups)
    assert y.shape == x.shape and y.dtype == np.float64
    yg, xg = _groups_view(method, y, cl, groups), _groups_view(method, x, cl, groups)
    if method == "rms":
        ms = (xg * xg).mean(axis=1)
        np.testing.assert_allclose((yg * yg).mean(axis=1), ms / (ms + eps), rtol=1e-12, atol=1e-15)
    else:
        var = xg.var(axis=1)
        # the mean is ~0 up to the rounding of the computed mean (a few ulps of max|x|), times rstd
        rstd = 1.0 / np.sqrt(var + eps)
        bound = 64 * np.finfo(np.float64).eps * np.max(np.abs(xg), axis=1) * rstd + 1e-15
        assert np.all(np.abs(yg.mean(axis=1)) <= bound)
        np.testing.assert_allclose(yg.var(axis=1), var / (var + eps), rtol=1e-10, atol=1e-13)
        # and the variance is close to 1 exactly when the data's variance dominates eps
        assert np.all(np.abs(yg.var(axis=1) - 1.0) <= eps / np.maximum(var, 1e-300) + 1e-12)


@PROPERTY
@given(method=st.sampled_from(["bn", "in", "gn", "ln", "rms", "brn"]), shape=shapes,
       cl=st.booleans(), seed=st.integers(0, 2**32 - 1),
       a=st.floats(0.1, 100.0), b=st.floats(-100.0, 100.0))
def test_invariance_to_affine_changes_of_the_input(method, shape, cl, seed, a, b):
    """y(a x + b; eps a^2) == y(x; eps) for centered methods; y(a x; eps a^2) == y(x; eps) for RMS.

    Scaling eps with a^2 makes this an identity in exact arithmetic for every eps, so the
    only differences are rounding: the deviations x - mean carry an absolute error ~ulp(|b| +
    a |x|) <= 3e-14, divided by a * sqrt(var + eps) >= 0.1 * sqrt(1e-3): below 1e-11.
    """
    N, C, spatial = shape
    if method == "in" and int(np.prod(spatial)) == 1:
        spatial = spatial + (3,)
    if method == "rms":
        b = 0.0
    groups = {1: 1, 2: 2, 3: 3, 6: 3}[C]
    if method in ("ln", "rms"):
        cl = False
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, size=(N,) + spatial + (C,) if cl else (N, C) + spatial)
    eps = 1e-3
    if method == "brn":
        rm, rv = rng.normal(size=C), rng.uniform(0.5, 2.0, size=C)
        y0, c0 = R.batch_renorm_forward(x, rm, rv, eps=eps, channels_last=cl)
        y1, c1 = R.batch_renorm_forward(a * x + b, a * rm + b, a * a * rv, eps=eps * a * a,
                                        channels_last=cl)
        np.testing.assert_allclose(c1["r"], c0["r"], rtol=1e-9)
        np.testing.assert_allclose(c1["d"], c0["d"], rtol=1e-9, atol=1e-9)
    else:
        y0, _ = _forward(method, x, eps, cl, groups)
        y1, _ = _forward(method, a * x + b, eps * a * a, cl, groups)
    np.testing.assert_allclose(y1, y0, rtol=0, atol=1e-9)


@PROPERTY
@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40),
       repeat_constant=st.booleans(), offset=st.sampled_from([0.0, 1e6, -3e7, 0.1]))
def test_variance_is_never_negative(values, repeat_constant, offset):
    x = np.array(values) + offset
    if repeat_constant:          # constant data: var must be exactly 0 or a tiny positive value
        x = np.full(len(values) + 1, x[0])
    _, var = R.moments(x, axes=(0,))
    assert np.all(var >= 0)
    assert np.all(R.summarize(x, axes=(0,))[2] >= 0)
    if repeat_constant:
        # two-pass leaves only the rounding of the mean: (a few ulps)^2
        assert float(var[0]) <= (len(x) * np.spacing(abs(x[0]))) ** 2
    x2 = np.stack([x, x[::-1]], axis=1)          # (n, 2): two "channels"
    if x2.shape[0] > 1:
        _, cache = R.batch_norm_forward(x2)
        assert np.all(cache["var"] >= 0)
    halves = (x[: len(x) // 2], x[len(x) // 2:])          # the first may be empty
    assert np.all(R.chan_merge(*(R.summarize(h, (0,)) for h in halves))[2] >= 0)
    assert np.all(R.finalize(R.chan_merge(*(R.summarize(h, (0,)) for h in halves)))[1] >= 0)


DTYPES = [np.float16, np.float32, np.float64, np.int32, np.int64]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("method", ["bn_train", "bn_eval", "in", "gn", "ln", "rms", "brn"])
def test_outputs_and_gradients_are_float64_whatever_the_input_dtype(method, dtype):
    rng = _rng("dtype", method, np.dtype(dtype).name)
    x = (rng.normal(size=(3, 4, 5)) * 10).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    w, b = np.ones(4, dtype=dtype), np.zeros(4, dtype=dtype)
    wl, bl = np.ones(5, dtype=dtype), np.zeros(5, dtype=dtype)
    stats = dict(mean=np.zeros(4, dtype=dtype), var=np.ones(4, dtype=dtype))
    run = {
        "bn_train": lambda: (R.batch_norm_forward(x, w, b), R.batch_norm_backward),
        "bn_eval": lambda: (R.batch_norm_forward(x, w, b, **stats), R.batch_norm_backward),
        "in": lambda: (R.instance_norm_forward(x, w, b), R.instance_norm_backward),
        "gn": lambda: (R.group_norm_forward(x, 2, w, b), R.group_norm_backward),
        "ln": lambda: (R.layer_norm_forward(x, 5, wl, bl), R.layer_norm_backward),
        "rms": lambda: (R.rms_norm_forward(x, 5, wl), R.rms_norm_backward),
        "brn": lambda: (R.batch_renorm_forward(x, stats["mean"], stats["var"], w, b),
                        R.batch_renorm_backward),
    }
    (y, cache), backward = run[method]()
    assert y.dtype == np.float64
    grads = backward(dy, cache)
    assert [g is None for g in grads] == [False, False, method == "rms"]
    for g in grads:
        if g is not None:
            assert g.dtype == np.float64


def test_moments_and_summaries_are_float64():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    mean, var = R.moments(x, axes=(0,))
    assert mean.dtype == var.dtype == np.float64
    count, mean, m2 = R.summarize(x, axes=(0,))
    assert isinstance(count, int) and mean.dtype == m2.dtype == np.float64
    new_mean, new_var = R.running_stats_update(np.zeros(4, np.float32), np.ones(4, np.float32),
                                               mean, m2 / count, count, 0.1)
    assert new_mean.dtype == new_var.dtype == np.float64


def test_inference_modes_accept_a_single_value_per_channel():
    """Given statistics do not need a batch: (1, C) is valid for inference (as in torch)."""
    x = np.array([[1.0, 2.0, 3.0]])
    y, _ = R.batch_norm_forward(x, mean=np.array([1.0, 0.0, 3.0]), var=np.array([4.0, 1.0, 1.0]),
                                eps=1e-12)
    np.testing.assert_allclose(y, [[0.0, 2.0, 0.0]], atol=1e-9)
    y, _ = R.instance_norm_forward(x[..., None], mean=np.zeros(3), var=np.ones(3), eps=1e-12)
    np.testing.assert_allclose(y[..., 0], x, rtol=1e-9)


# ---------------------------------------------------------------------------- bad input


def _msg(*parts):
    """A regex matching a message that contains every part, in this order."""
    return ".*".join(re.escape(p) for p in parts)


X4 = _rng("bad").normal(size=(4, 3, 5))       # (N, C, L) = (4, 3, 5)
X2 = _rng("bad2").normal(size=(4, 3))

ALL_EPS_CALLS = {
    "batch_norm": lambda eps: R.batch_norm_forward(X4, eps=eps),
    "batch_norm_eval": lambda eps: R.batch_norm_forward(X4, mean=np.zeros(3), var=np.ones(3), eps=eps),
    "instance_norm": lambda eps: R.instance_norm_forward(X4, eps=eps),
    "instance_norm_eval": lambda eps: R.instance_norm_forward(X4, mean=np.zeros(3), var=np.ones(3), eps=eps),
    "group_norm": lambda eps: R.group_norm_forward(X4, 3, eps=eps),
    "layer_norm": lambda eps: R.layer_norm_forward(X4, 5, eps=eps),
    "rms_norm": lambda eps: R.rms_norm_forward(X4, 5, eps=eps),
    "batch_renorm": lambda eps: R.batch_renorm_forward(X4, np.zeros(3), np.ones(3), eps=eps),
}


@pytest.mark.parametrize("eps,shown", [(0, "eps=0"), (0.0, "eps=0.0"), (-1, "eps=-1"),
                                       (-1e-5, "eps=-1e-05"), (float("nan"), "eps=nan"),
                                       (float("inf"), "eps=inf")],
                         ids=["0", "0.0", "-1", "-1e-5", "nan", "inf"])
@pytest.mark.parametrize("method", list(ALL_EPS_CALLS))
def test_eps_must_be_positive_and_finite(method, eps, shown):
    with pytest.raises(ValueError, match=_msg(shown)) as info:
        ALL_EPS_CALLS[method](eps)
    assert "> 0" in str(info.value)


@pytest.mark.parametrize("eps", ["1e-5", True, [1e-5]], ids=["str", "bool", "list"])
@pytest.mark.parametrize("method", list(ALL_EPS_CALLS))
def test_eps_of_the_wrong_type_is_a_type_error(method, eps):
    with pytest.raises(TypeError, match=_msg("eps", repr(eps))):
        ALL_EPS_CALLS[method](eps)


@pytest.mark.parametrize("call,parts", [
    (lambda: R.batch_norm_forward(np.zeros(5)), ("batch_norm", "at least 2 dimensions", "(5,)")),
    (lambda: R.batch_norm_forward(np.float64(3.0)), ("batch_norm", "at least 2 dimensions", "()")),
    (lambda: R.batch_renorm_forward(np.zeros(5), np.zeros(5), np.ones(5)),
     ("batch_renorm", "at least 2 dimensions", "(5,)")),
    (lambda: R.group_norm_forward(np.zeros(6), 2), ("group_norm", "at least 2 dimensions", "(6,)")),
    (lambda: R.instance_norm_forward(X2), ("instance_norm", "at least 3 dimensions", "(4, 3)")),
    (lambda: R.instance_norm_forward(X2, mean=np.zeros(3), var=np.ones(3)),
     ("instance_norm", "at least 3 dimensions", "(4, 3)")),
], ids=["bn-1d", "bn-0d", "brn-1d", "gn-1d", "in-2d", "in-2d-given-stats"])
def test_wrong_number_of_dimensions(call, parts):
    with pytest.raises(ValueError, match=_msg(*parts)):
        call()


@pytest.mark.parametrize("call,parts", [
    (lambda: R.batch_norm_forward(X4, np.ones(4)), ("weight", "(3,)", "(4,)")),
    (lambda: R.batch_norm_forward(X4, None, np.ones(2)), ("bias", "(3,)", "(2,)")),
    (lambda: R.batch_norm_forward(X4, np.ones((3, 1))), ("weight", "(3,)", "(3, 1)")),
    (lambda: R.batch_norm_forward(X4, mean=np.zeros(5), var=np.ones(3)), ("mean", "(3,)", "(5,)")),
    (lambda: R.batch_norm_forward(X4, mean=np.zeros(3), var=np.ones(1)), ("var", "(3,)", "(1,)")),
    (lambda: R.batch_norm_forward(X4, np.ones(3), channels_last=True), ("weight", "(5,)", "(3,)")),
    (lambda: R.instance_norm_forward(X4, np.ones(5)), ("weight", "(3,)", "(5,)")),
    (lambda: R.instance_norm_forward(X4, None, np.ones(4)), ("bias", "(3,)", "(4,)")),
    (lambda: R.group_norm_forward(X4, 3, np.ones(4)), ("weight", "(3,)", "(4,)")),
    (lambda: R.group_norm_forward(X4, 1, None, np.ones(5)), ("bias", "(3,)", "(5,)")),
    (lambda: R.batch_renorm_forward(X4, np.zeros(3), np.ones(3), np.ones(4)), ("weight", "(3,)", "(4,)")),
    (lambda: R.batch_renorm_forward(X4, np.zeros(2), np.ones(3)), ("running_mean", "(3,)", "(2,)")),
    (lambda: R.batch_renorm_forward(X4, np.zeros(3), np.ones(7)), ("running_var", "(3,)", "(7,)")),
    (lambda: R.layer_norm_forward(X4, 5, np.ones(4)), ("weight", "(5,)", "(4,)")),
    (lambda: R.layer_norm_forward(X4, (3, 5), None, np.ones(5)), ("bias", "(3, 5)", "(5,)")),
    (lambda: R.rms_norm_forward(X4, 5, np.ones((1, 5))), ("weight", "(5,)", "(1, 5)")),
], ids=["bn-weight", "bn-bias", "bn-weight-2d", "bn-mean", "bn-var", "bn-cl-weight",
        "in-weight", "in-bias", "gn-weight", "gn-bias", "brn-weight", "brn-running-mean",
        "brn-running-var", "ln-weight", "ln-bias", "rms-weight"])
def test_parameter_of_the_wrong_shape(call, parts):
    with pytest.raises(ValueError, match=_msg(*parts)):
        call()


@pytest.mark.parametrize("groups,parts", [
    (4, ("num_groups=4", "num_channels=6", "[1, 2, 3, 6]")),
    (5, ("num_groups=5", "num_channels=6", "[1, 2, 3, 6]")),
    (12, ("num_groups=12", "num_channels=6", "[1, 2, 3, 6]")),
    (0, ("num_groups", "positive integer", "num_groups=0")),
    (-2, ("num_groups", "positive integer", "num_groups=-2")),
])
def test_group_count_must_divide_channels(groups, parts):
    x = np.zeros((2, 6, 3))
    with pytest.raises(ValueError, match=_msg(*parts)):
        R.group_norm_forward(x, groups)
    with pytest.raises(ValueError, match=_msg(*parts)):
        R.group_norm_forward(np.moveaxis(x, 1, -1), groups, channels_last=True)


@pytest.mark.parametrize("groups", [2.0, "2", None], ids=["float", "str", "None"])
def test_group_count_of_the_wrong_type(groups):
    with pytest.raises((TypeError, ValueError), match=_msg("num_groups", repr(groups))):
        R.group_norm_forward(np.zeros((2, 6, 3)), groups)


@pytest.mark.parametrize("call,parts", [
    (lambda: R.batch_norm_forward(np.ones((1, 3))),
     ("batch_norm", "more than 1 value per channel", "(1, 3)")),
    (lambda: R.batch_norm_forward(np.ones((1, 3, 1, 1))),
     ("batch_norm", "more than 1 value per channel", "(1, 3, 1, 1)")),
    (lambda: R.batch_norm_forward(np.ones((1, 1, 3)), channels_last=True),
     ("batch_norm", "more than 1 value per channel", "(1, 1, 3)")),
    (lambda: R.batch_renorm_forward(np.ones((1, 3)), np.zeros(3), np.ones(3)),
     ("batch_renorm", "more than 1 value per channel", "(1, 3)")),
    (lambda: R.instance_norm_forward(np.ones((2, 3, 1))),
     ("instance_norm", "more than 1 spatial element", "(2, 3, 1)")),
    (lambda: R.instance_norm_forward(np.ones((4, 1, 1, 3)), channels_last=True),
     ("instance_norm", "more than 1 spatial element", "(4, 1, 1, 3)")),
], ids=["bn-1x3", "bn-1x3x1x1", "bn-cl-1x1x3", "brn-1x3", "in-2x3x1", "in-cl-4x1x1x3"])
def test_training_needs_more_than_one_value_per_statistic(call, parts):
    with pytest.raises(ValueError, match=_msg(*parts)):
        call()


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("x_shape,ns,parts", [
    ((4, 3, 5), 4, ("(4,)", "(4, 3, 5)", "must equal")),
    ((4, 3, 5), (5, 3), ("(5, 3)", "(4, 3, 5)", "must equal")),
    ((3, 5), (2, 3, 5), ("(2, 3, 5)", "(3, 5)", "must equal")),
], ids=["4-vs-435", "53-vs-435", "too-many-dims"])
def test_normalized_shape_mismatch(fn, x_shape, ns, parts):
    with pytest.raises(ValueError, match=_msg(*parts)):
        getattr(R, f"{fn}_forward")(np.zeros(x_shape), ns)


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("ns,error", [((), ValueError), ((5, 0), ValueError), (-5, ValueError),
                                      (None, TypeError), (5.0, TypeError)],
                         ids=["empty", "zero", "negative", "None", "float"])
def test_normalized_shape_must_be_positive_ints(fn, ns, error):
    with pytest.raises(error, match=_msg("normalized_shape", repr(ns))):
        getattr(R, f"{fn}_forward")(np.zeros((2, 5)), ns)


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("ns", [(2.5,), "32", ("3", "2")], ids=["float-entry", "str", "str-entries"])
def test_normalized_shape_entries_must_be_ints_not_silently_converted(fn, ns):
    """(2.5,) must not be truncated to (2,), nor "32" read as (3, 2): reject them like torch."""
    x = np.zeros((4, 3, 2))
    with pytest.raises(TypeError, match="normalized_shape"):
        getattr(R, f"{fn}_forward")(x, ns)


@pytest.mark.parametrize("kwargs,parts", [
    (dict(r_max=0.5), (">= 1", "r_max=0.5")),
    (dict(r_max=0.0), (">= 1", "r_max=0.0")),
    (dict(r_max=float("nan")), (">= 1", "r_max=nan")),
    (dict(r_max=float("inf")), (">= 1", "r_max=inf")),
    (dict(d_max=-1.0), (">= 0", "d_max=-1.0")),
    (dict(d_max=-1e-9), (">= 0", "d_max=-1e-09")),
    (dict(d_max=float("nan")), (">= 0", "d_max=nan")),
], ids=["r0.5", "r0", "rnan", "rinf", "d-1", "d-tiny", "dnan"])
def test_batch_renorm_clipping_limits(kwargs, parts):
    with pytest.raises(ValueError, match=_msg(*parts)):
        R.batch_renorm_forward(X4, np.zeros(3), np.ones(3), **kwargs)


@pytest.mark.parametrize("kwargs", [dict(r_max="3"), dict(d_max=None)], ids=["r_max-str", "d_max-None"])
def test_batch_renorm_clipping_limits_of_the_wrong_type(kwargs):
    (name, value), = kwargs.items()
    with pytest.raises(TypeError, match=_msg(name, repr(value))):
        R.batch_renorm_forward(X4, np.zeros(3), np.ones(3), **kwargs)


def test_batch_renorm_needs_running_statistics():
    with pytest.raises(ValueError, match=_msg("running_mean", "running_var", "(C,)")):
        R.batch_renorm_forward(X4, None, np.ones(3))
    with pytest.raises(ValueError, match=_msg("running_var", "negative")):
        R.batch_renorm_forward(X4, np.zeros(3), np.array([1.0, -0.5, 1.0]))


def test_batch_norm_given_statistics_come_in_pairs_and_var_is_not_negative():
    with pytest.raises(ValueError, match=_msg("both mean and var", "mean=an array", "var=None")):
        R.batch_norm_forward(X4, mean=np.zeros(3))
    with pytest.raises(ValueError, match=_msg("both mean and var", "mean=None", "var=an array")):
        R.instance_norm_forward(X4, var=np.ones(3))
    with pytest.raises(ValueError, match=_msg("var", "negative", ">= 0")):
        R.batch_norm_forward(X4, mean=np.zeros(3), var=np.array([1.0, -1e-3, 1.0]))


@pytest.mark.parametrize("momentum", [1.5, -0.1, float("nan")], ids=["1.5", "-0.1", "nan"])
def test_running_stats_update_rejects_momentum_outside_0_1(momentum):
    """A momentum outside [0, 1] extrapolates: the running statistics would be silently corrupt."""
    with pytest.raises(ValueError, match=_msg("momentum", f"momentum={momentum!r}")):
        R.running_stats_update(np.zeros(3), np.ones(3), np.ones(3), np.ones(3), 8, momentum)


@pytest.mark.parametrize("nbt", [None, 0], ids=["None", "0"])
def test_running_stats_cumulative_average_needs_a_batch_count(nbt):
    with pytest.raises(ValueError, match=_msg("momentum=None", "num_batches_tracked")):
        R.running_stats_update(np.zeros(3), np.ones(3), np.ones(3), np.ones(3), 8, None,
                               num_batches_tracked=nbt)


@pytest.mark.parametrize("count", [1, 0], ids=["1", "0"])
def test_running_stats_update_rejects_a_count_without_an_unbiased_variance(count):
    """count <= 1 has no unbiased variance; the update would pull running_var towards 0."""
    with pytest.raises(ValueError, match=_msg("count", str(count))):
        R.running_stats_update(np.zeros(3), np.ones(3), np.ones(3), np.zeros(3), count, 0.1)
