"""normlab.estimators.BatchNormalizer: the scikit-learn transformer.

Sections: scikit-learn conformance (``parametrize_with_checks``); parity with StandardScaler
(eps accounted for, NaN included); exact streaming (random chunks == one fit, mean 1e6 / std 1
against exact rational arithmetic); the momentum moving average against a hand-written loop;
dtype policy; constant and all-NaN features; inverse_transform; Pipeline and pandas output;
errors; the docstring example.
"""

from __future__ import annotations

import contextlib
import doctest
import warnings
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import get_tags
from sklearn.utils.estimator_checks import parametrize_with_checks

import normlab.estimators
from normlab.estimators import BatchNormalizer

F16, F32, F64 = np.float16, np.float32, np.float64


def _data(seed=0, n=300, nan_fraction=0.0):
    """Features on very different scales and offsets, optionally with NaNs sprinkled in."""
    rng = np.random.default_rng(seed)
    loc = np.array([0.0, 5.0, -3.0, 100.0, 1e3])
    scale = np.array([1.0, 0.01, 10.0, 3.0, 0.5])
    X = rng.normal(loc, scale, size=(n, loc.size))
    if nan_fraction:
        X[rng.random(X.shape) < nan_fraction] = np.nan
    return X


def _eps_factor(var, eps):
    """StandardScaler divides by sqrt(var), BatchNormalizer by sqrt(var + eps): their ratio."""
    return np.sqrt(var / (var + eps))


@contextlib.contextmanager
def _no_warnings():
    """A context in which any warning (RuntimeWarning from 0/0, nanmean, ...) is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ----------------------------------------------------------------------------------------------
# scikit-learn conformance


@parametrize_with_checks([BatchNormalizer(), BatchNormalizer(momentum=0.3, gamma=2.0, beta=-1.0)])
def test_sklearn_estimator_checks(estimator, check, monkeypatch):
    # check_array_api_input (numpy namespace) skips itself unless SCIPY_ARRAY_API is set in
    # the environment; setting it here makes that check run instead of being skipped.
    monkeypatch.setenv("SCIPY_ARRAY_API", "1")
    check(estimator)


def test_tags_declare_nan_support_and_float32_preservation():
    # the estimator checks test NaN handling and dtype preservation according to these tags
    tags = get_tags(BatchNormalizer())
    assert tags.input_tags.allow_nan
    assert not tags.input_tags.sparse
    assert tags.transformer_tags.preserves_dtype == ["float64", "float32"]


# ----------------------------------------------------------------------------------------------
# parity with StandardScaler


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 1e-14])
def test_matches_standard_scaler_with_eps_accounted_for(eps):
    X = _data(seed=1)
    bn = BatchNormalizer(eps=eps).fit(X)
    ss = StandardScaler().fit(X)
    assert_allclose(bn.mean_, ss.mean_, rtol=1e-14)
    assert_allclose(bn.var_, ss.var_, rtol=1e-12)
    assert bn.n_samples_seen_ == ss.n_samples_seen_ == X.shape[0]
    assert_allclose(bn.scale_, np.sqrt(ss.var_ + eps), rtol=1e-13)
    # feature 1 has var 1e-4: eps=1e-3 changes its output by a factor ~0.3, so this comparison
    # only holds with eps in the right place. atol: the two means of feature 4 (offset 1e3,
    # std 0.5) may differ by an ulp of 1e3 (~1e-13; ours is the exact mean here, NumPy's sum is
    # off by 5.7e-13), i.e. ~2e-12 in the output
    assert_allclose(bn.transform(X), ss.transform(X) * _eps_factor(ss.var_, eps),
                    rtol=1e-11, atol=1e-11)


def test_tiny_eps_equals_standard_scaler():
    X = _data(seed=2)
    assert_allclose(BatchNormalizer(eps=1e-14).fit_transform(X),
                    StandardScaler().fit_transform(X), rtol=1e-8, atol=1e-9)


def test_nan_ignored_in_fit_and_kept_in_transform_like_standard_scaler():
    X = _data(seed=3, nan_fraction=0.15)
    X[:, 0] = _data(seed=4)[:, 0]  # a column without NaN next to columns with NaN
    eps = 1e-5
    bn = BatchNormalizer(eps=eps).fit(X)
    ss = StandardScaler().fit(X)
    assert_allclose(bn.mean_, ss.mean_, rtol=1e-14)
    assert_allclose(bn.var_, ss.var_, rtol=1e-12)
    assert_allclose(bn.mean_, np.nanmean(X, axis=0), rtol=1e-14)
    assert_allclose(bn.var_, np.nanvar(X, axis=0), rtol=1e-12)
    assert bn.n_samples_seen_.dtype == np.int64
    assert_array_equal(bn.n_samples_seen_, ss.n_samples_seen_)
    assert_array_equal(bn.n_samples_seen_, np.sum(~np.isnan(X), axis=0))

    Y = bn.transform(X)
    assert_array_equal(np.isnan(Y), np.isnan(X))
    assert_allclose(Y, ss.transform(X) * _eps_factor(ss.var_, eps), rtol=1e-11, atol=1e-12,
                    equal_nan=True)

    # and streamed, batch by batch, against StandardScaler streamed the same way
    bn_stream, ss_stream = BatchNormalizer(eps=eps), StandardScaler()
    for chunk in np.array_split(X, [40, 41, 170]):
        bn_stream.partial_fit(chunk)
        ss_stream.partial_fit(chunk)
    assert_allclose(bn_stream.mean_, ss_stream.mean_, rtol=1e-13)
    assert_allclose(bn_stream.var_, ss_stream.var_, rtol=1e-11)
    assert_array_equal(bn_stream.n_samples_seen_, ss_stream.n_samples_seen_)


def test_n_samples_seen_is_int_unless_nan_makes_counts_differ():
    X = _data(seed=5, n=20)
    assert type(BatchNormalizer().fit(X).n_samples_seen_) is int
    X[3, :] = np.nan  # a whole row missing: every feature still has the same count
    assert BatchNormalizer().fit(X).n_samples_seen_ == 19
    X[4, 2] = np.nan
    counts = BatchNormalizer().fit(X).n_samples_seen_
    assert isinstance(counts, np.ndarray) and counts.dtype == np.int64
    assert_array_equal(counts, [19, 19, 18, 19, 19])


# ----------------------------------------------------------------------------------------------
# exact streaming statistics


def _assert_same_statistics(a, b):
    assert_allclose(a.mean_, b.mean_, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert_allclose(a.var_, b.var_, rtol=1e-12, atol=1e-14, equal_nan=True)
    assert_array_equal(np.asarray(a.n_samples_seen_), np.asarray(b.n_samples_seen_))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16),
       cuts=st.lists(st.integers(1, 299), max_size=12, unique=True),
       nan_fraction=st.sampled_from([0.0, 0.1, 0.5]))
def test_partial_fit_in_random_chunks_equals_fit(seed, cuts, nan_fraction):
    X = _data(seed=seed, nan_fraction=nan_fraction)
    full = BatchNormalizer().fit(X)
    stream = BatchNormalizer()
    for chunk in np.split(X, sorted(cuts)):
        stream.partial_fit(chunk)
    _assert_same_statistics(stream, full)
    assert_allclose(stream.transform(X), full.transform(X), rtol=1e-10, atol=1e-10,
                    equal_nan=True)


def test_fit_after_partial_fit_starts_afresh():
    X, other = _data(seed=6), _data(seed=7) + 50.0
    bn = BatchNormalizer().partial_fit(other).partial_fit(other)
    _assert_same_statistics(bn.fit(X), BatchNormalizer().fit(X))


def _exact_var(column):
    """Population variance computed in exact rational arithmetic (floats are exact rationals)."""
    xs = [Fraction(float(v)) for v in column]
    mean = sum(xs) / len(xs)
    return float(sum((x - mean) ** 2 for x in xs) / len(xs))


def test_mean_1e6_std_1_variance_within_1e9_relative():
    rng = np.random.default_rng(8)
    X = 1e6 + rng.normal(size=(2000, 3)) * [1.0, 0.5, 2.0]
    exact = np.array([_exact_var(X[:, j]) for j in range(X.shape[1])])

    # the tolerance is tight enough to reject the one-pass formula E[x^2] - E[x]^2
    one_pass = (X**2).mean(axis=0) - X.mean(axis=0) ** 2
    assert np.max(np.abs(one_pass - exact) / exact) > 1e-9

    assert_allclose(BatchNormalizer().fit(X).var_, exact, rtol=1e-9, atol=0)
    stream = BatchNormalizer()
    for chunk in np.array_split(X, [1, 2, 300, 301, 1500]):
        stream.partial_fit(chunk)
    assert_allclose(stream.var_, exact, rtol=1e-9, atol=0)


# ----------------------------------------------------------------------------------------------
# momentum: exponential moving average of batch statistics


def _batches(seed=9):
    rng = np.random.default_rng(seed)
    return [rng.normal(loc=3.0 * i, scale=1.0 + i, size=(n, 4)) for i, n in
            enumerate([7, 1, 20, 3, 50])]


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0])
def test_momentum_matches_hand_written_ema(momentum):
    batches = _batches()
    mean = var = None
    for b in batches:
        bm, bv = b.mean(axis=0), b.var(axis=0)
        if mean is None:
            mean, var = bm, bv
        else:
            mean = (1 - momentum) * mean + momentum * bm
            var = (1 - momentum) * var + momentum * bv
    bn = BatchNormalizer(momentum=momentum)
    for b in batches:
        bn.partial_fit(b)
    assert_allclose(bn.mean_, mean, rtol=1e-13, atol=1e-13)
    assert_allclose(bn.var_, var, rtol=1e-13)
    assert bn.n_samples_seen_ == sum(len(b) for b in batches)
    X = np.vstack(batches)
    assert_allclose(bn.transform(X), (X - mean) / np.sqrt(var + bn.eps), rtol=1e-12, atol=1e-12)
    # and it is not the exact statistics of all the rows (the policy actually changed)
    assert not np.allclose(bn.mean_, X.mean(axis=0))


def test_momentum_ema_with_nan_skips_missing_features_and_initializes_late_ones():
    batches = _batches(seed=10)
    batches[0][:, 2] = np.nan        # feature 2 is first seen in batch 1: initialized there
    batches[2][:, 1] = np.nan        # feature 1 is absent from batch 2: left unchanged
    batches[3][0, 0] = np.nan        # feature 0 partly missing from batch 3
    m = 0.25
    mean = np.full(4, np.nan)
    var = np.full(4, np.nan)
    for b in batches:
        for j in range(4):
            col = b[:, j][~np.isnan(b[:, j])]
            if col.size == 0:
                continue
            if np.isnan(mean[j]):
                mean[j], var[j] = col.mean(), col.var()
            else:
                mean[j] = (1 - m) * mean[j] + m * col.mean()
                var[j] = (1 - m) * var[j] + m * col.var()
    bn = BatchNormalizer(momentum=m)
    with _no_warnings():
        for b in batches:
            bn.partial_fit(b)
    assert_allclose(bn.mean_, mean, rtol=1e-13)
    assert_allclose(bn.var_, var, rtol=1e-13)
    assert_array_equal(bn.n_samples_seen_, np.sum([np.sum(~np.isnan(b), axis=0) for b in batches],
                                                  axis=0))


def test_fit_is_one_batch_so_momentum_does_not_change_it():
    X = _data(seed=11, nan_fraction=0.1)
    _assert_same_statistics(BatchNormalizer(momentum=0.1).fit(X), BatchNormalizer().fit(X))


# ----------------------------------------------------------------------------------------------
# dtype policy


def test_float32_in_float32_out_with_float64_statistics():
    X32 = _data(seed=12).astype(F32)
    X64 = X32.astype(F64)                     # the same values, exactly
    bn32, bn64 = BatchNormalizer().fit(X32), BatchNormalizer().fit(X64)
    for name in ("mean_", "var_", "scale_"):
        assert getattr(bn32, name).dtype == F64
        assert_array_equal(getattr(bn32, name), getattr(bn64, name))
    Y = bn32.transform(X32)
    assert Y.dtype == F32
    assert bn32.fit_transform(X32).dtype == F32
    assert bn32.inverse_transform(Y).dtype == F32
    # the fused kernel: within about one float32 ulp of float64 arithmetic rounded once
    exact = bn64.transform(X64).astype(F32)
    ulp = np.spacing(np.abs(exact))
    assert np.all(np.abs(Y - exact) <= 2 * ulp), np.max(np.abs(Y - exact) / ulp)


def test_float32_with_large_mean_keeps_the_digits_of_the_deviation():
    rng = np.random.default_rng(13)
    X32 = (1e6 + 0.03 + rng.normal(size=(500, 2))).astype(F32)
    bn = BatchNormalizer().fit(X32)
    reference = BatchNormalizer().fit(X32.astype(F64)).transform(X32.astype(F64))
    Y = bn.transform(X32)
    assert_allclose(Y, reference, rtol=1e-6, atol=1e-6)
    # subtracting a mean rounded to float32 (spacing 0.0625 near 1e6) would miss by ~0.03
    naive = (X32 - bn.mean_.astype(F32)) / bn.scale_.astype(F32)
    assert np.max(np.abs(naive - reference)) > 1e-3


def test_float32_block_by_block_path_covers_every_row(monkeypatch):
    # float32 rows are upcast in blocks of _BLOCK_ROWS; use a block size that does not divide n
    X32 = _data(seed=24, nan_fraction=0.05).astype(F32)
    expected = BatchNormalizer().fit(X32).transform(X32)
    monkeypatch.setattr(normlab.estimators, "_BLOCK_ROWS", 7)
    bn = BatchNormalizer().fit(X32)
    assert_array_equal(bn.transform(X32), expected)
    assert_allclose(bn.inverse_transform(expected), X32, rtol=1e-5, atol=1e-3, equal_nan=True)


@pytest.mark.parametrize("dtype", [np.int8, np.int64, np.uint16, bool])
def test_integer_input_becomes_float64(dtype):
    X = (np.arange(24).reshape(8, 3) % 5).astype(dtype)
    Y = BatchNormalizer().fit_transform(X)
    assert Y.dtype == F64
    assert_allclose(Y, BatchNormalizer().fit_transform(X.astype(F64)))


def test_float16_is_kept_too():
    X = _data(seed=14)[:, :3].astype(F16)
    Y = BatchNormalizer().fit_transform(X)
    assert Y.dtype == F16
    # computed in float64 and rounded once to float16 (spacing 2**-10 near 1)
    assert_allclose(Y, BatchNormalizer().fit_transform(X.astype(F64)), rtol=2**-10, atol=2**-12)


# ----------------------------------------------------------------------------------------------
# constant and all-NaN features


def test_constant_features_map_to_beta_without_nan_or_warnings():
    rng = np.random.default_rng(15)
    X = np.column_stack([np.full(1000, 0.1), rng.normal(size=1000), np.full(1000, -3.0),
                         np.full(1000, 7.25), np.zeros(1000)])
    bn = BatchNormalizer(gamma=2.0, beta=0.5)
    with _no_warnings():
        Y = bn.fit_transform(X)
        Xr = bn.inverse_transform(Y)
    assert np.all(np.isfinite(Y))
    const = [0, 2, 3, 4]
    # the mean of n copies of c is c to a few ulps, so var_ is 0 or a square of such ulps
    assert np.all(bn.var_[const] <= (1e-13 * np.maximum(np.abs(X[0, const]), 1.0)) ** 2)
    assert_allclose(bn.scale_[[2, 3, 4]], np.sqrt(bn.eps))  # var exactly 0: sqrt(eps)
    assert_allclose(Y[:, const], 0.5, atol=1e-9)
    assert_allclose(Xr, X, rtol=1e-12, atol=1e-12)
    # a single sample is a constant feature too
    with _no_warnings():
        assert_allclose(BatchNormalizer().fit_transform(X[:1]), 0.0, atol=1e-9)


def test_all_nan_feature_is_handled_without_warnings():
    X = _data(seed=16, nan_fraction=0.1)
    X[:, 1] = np.nan
    bn = BatchNormalizer()
    with _no_warnings():
        bn.fit(X)
        Y = bn.transform(X)
        Xr = bn.inverse_transform(Y)
    assert np.isnan(bn.mean_[1]) and np.isnan(bn.var_[1]) and bn.n_samples_seen_[1] == 0
    assert np.all(np.isnan(Y[:, 1])) and np.all(np.isnan(Xr[:, 1]))
    keep = [0, 2, 3, 4]
    alone = BatchNormalizer().fit(X[:, keep])
    assert_allclose(bn.mean_[keep], alone.mean_, rtol=1e-13)
    assert_allclose(Y[:, keep], alone.transform(X[:, keep]), rtol=1e-12, atol=1e-12,
                    equal_nan=True)

    # once values arrive, the feature's statistics are those of these values alone
    later = _data(seed=17, n=50)
    with _no_warnings():
        bn.partial_fit(later)
    assert_allclose(bn.mean_[1], later[:, 1].mean(), rtol=1e-14)
    assert_allclose(bn.var_[1], later[:, 1].var(), rtol=1e-12)
    assert bn.n_samples_seen_[1] == 50


# ----------------------------------------------------------------------------------------------
# inverse_transform


@pytest.mark.parametrize("dtype, rtol", [(F64, 1e-12), (F32, 1e-5)])
@pytest.mark.parametrize("momentum", [None, 0.3])
def test_inverse_transform_round_trip(dtype, rtol, momentum):
    X = _data(seed=18, nan_fraction=0.05).astype(dtype)
    bn = BatchNormalizer(momentum=momentum, gamma=[2.0, -0.5, 1.0, 3.0, 0.1],
                         beta=[0.0, 1.0, -2.0, 10.0, 0.5])
    for chunk in np.array_split(X, 3):
        bn.partial_fit(chunk)
    Z = bn.transform(X)
    Xr = bn.inverse_transform(Z)
    assert Xr.dtype == dtype
    assert_array_equal(np.isnan(Xr), np.isnan(X))
    # error relative to each feature's magnitude (feature 4 sits at 1e3 with std 0.5)
    bound = rtol * (np.abs(X) + np.nanmax(np.abs(X), axis=0))
    assert np.all((np.abs(Xr - X) <= bound) | np.isnan(X))
    # the forward map really applies gamma and beta
    assert_allclose(Z, bn.gamma_ * (X - bn.mean_) / bn.scale_ + bn.beta_, rtol=10 * rtol,
                    atol=10 * rtol, equal_nan=True)


def test_inverse_transform_with_zero_gamma_raises():
    X = _data(seed=19)
    bn = BatchNormalizer(gamma=[1.0, 0.0, 2.0, 0.0, 1.0], beta=4.0).fit(X)
    Z = bn.transform(X)
    assert_allclose(Z[:, [1, 3]], 4.0)
    with pytest.raises(ValueError, match=r"gamma is 0 for feature\(s\) \[1, 3\].*non-zero gamma"):
        bn.inverse_transform(Z)


# ----------------------------------------------------------------------------------------------
# copy


def test_copy_false_works_in_place_and_copy_true_does_not():
    X = _data(seed=20)
    X_before = X.copy()
    bn = BatchNormalizer().fit(X)
    Y = bn.transform(X)
    assert_array_equal(X, X_before) and not np.shares_memory(X, Y)
    assert_array_equal(bn.transform(X, copy=False), Y)
    assert_array_equal(X, Y)                      # the call above overwrote X

    X = X_before.copy()
    bn_inplace = BatchNormalizer(copy=False).fit(X)
    Y2 = bn_inplace.transform(X)
    assert np.shares_memory(X, Y2)
    assert_array_equal(bn_inplace.inverse_transform(Y2, copy=True), bn.inverse_transform(Y))
    Y2.flags.writeable = False                    # read-only input: a copy instead of an error
    assert not np.shares_memory(bn_inplace.inverse_transform(Y2), Y2)


# ----------------------------------------------------------------------------------------------
# Pipeline and pandas


def test_pipeline_with_logistic_regression_matches_standard_scaler():
    X, y = load_digits(return_X_y=True)          # 64 pixels, some of them constant 0
    X_train, X_test, y_train, y_test = train_test_split(X, y, random_state=0, stratify=y)
    ours = make_pipeline(BatchNormalizer(eps=1e-12), LogisticRegression(max_iter=2000))
    theirs = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    ours.fit(X_train, y_train)
    theirs.fit(X_train, y_train)
    assert ours.score(X_test, y_test) > 0.93
    assert np.mean(ours.predict(X_test) == theirs.predict(X_test)) > 0.99
    # pixels constant in the training set: StandardScaler divides by 1, we by sqrt(eps)
    varying = ours[0].var_ > 0
    assert_allclose(ours[0].transform(X_test)[:, varying], theirs[0].transform(X_test)[:, varying],
                    rtol=1e-9, atol=1e-9)


def test_set_output_pandas_keeps_column_names_and_index():
    X = _data(seed=21, n=40, nan_fraction=0.1)
    cols = ["a", "b", "c", "d", "e"]
    df = pd.DataFrame(X, columns=cols, index=pd.RangeIndex(100, 140))
    bn = BatchNormalizer(gamma=2.0).set_output(transform="pandas")
    out = bn.fit_transform(df)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == cols and out.index.equals(df.index)
    assert_allclose(out.to_numpy(), BatchNormalizer(gamma=2.0).fit_transform(X), equal_nan=True)
    assert_array_equal(bn.feature_names_in_, cols)
    assert_array_equal(bn.get_feature_names_out(), cols)
    assert isinstance(bn.transform(df), pd.DataFrame)
    with pytest.raises(ValueError, match="feature names"):
        bn.transform(df[cols[::-1]])

    plain = BatchNormalizer().fit(X)
    assert not hasattr(plain, "feature_names_in_")
    assert_array_equal(plain.get_feature_names_out(), ["x0", "x1", "x2", "x3", "x4"])


def test_pandas_output_inside_a_pipeline():
    X, y = load_digits(return_X_y=True)
    df = pd.DataFrame(X[:300], columns=[f"px{i}" for i in range(64)])
    pipe = make_pipeline(BatchNormalizer(), BatchNormalizer(gamma=3.0)).set_output(transform="pandas")
    out = pipe.fit_transform(df)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == list(df.columns)
    assert_allclose(out.to_numpy().std(axis=0)[X[:300].std(axis=0) > 0.5], 3.0, rtol=1e-3)


# ----------------------------------------------------------------------------------------------
# errors


X_ERR = _data(seed=22, n=10)[:, :3]


@pytest.mark.parametrize("params, exc, match", [
    (dict(eps=0.0), ValueError, r"eps must be a finite number > 0.*eps=0\.0.*1e-5"),
    (dict(eps=-1e-5), ValueError, r"eps must be a finite number > 0.*eps=-1e-05"),
    (dict(eps=float("nan")), ValueError, r"eps=nan"),
    (dict(eps="small"), TypeError, r"eps must be a positive float, got 'small'"),
    (dict(momentum=0.0), ValueError, r"momentum must be in \(0, 1\].*momentum=0\.0.*momentum=None"),
    (dict(momentum=1.5), ValueError, r"momentum must be in \(0, 1\].*momentum=1\.5"),
    (dict(momentum=-0.1), ValueError, r"momentum=-0\.1"),
    (dict(momentum="0.1"), TypeError, r"momentum must be None or a float in \(0, 1\], got '0\.1'"),
    (dict(momentum=True), TypeError, r"got True of type bool"),
    (dict(gamma=[1.0, 2.0]), ValueError,
     r"gamma must be a scalar or an array of shape \(3,\).*got gamma of shape \(2,\)"),
    (dict(beta=np.zeros((3, 1))), ValueError, r"beta must be a scalar.*shape \(3, 1\)"),
    (dict(gamma=[1.0, np.inf, 1.0]), ValueError, r"gamma must be finite.*feature\(s\) \[1\]"),
    (dict(beta=[0.0, 0.0, np.nan]), ValueError, r"beta must be finite.*\[2\]"),
    (dict(gamma="big"), TypeError, r"gamma must be a number or an array of 3 numbers"),
])
def test_bad_hyperparameters_raise_at_fit_not_init(params, exc, match):
    est = BatchNormalizer(**params)                 # storing is not validating
    BatchNormalizer().set_params(**params)
    for method in (est.fit, est.partial_fit, est.fit_transform):
        with pytest.raises(exc, match=match):
            method(X_ERR)
        assert not hasattr(est, "n_features_in_")  # a failed first fit leaves it unfitted
        with pytest.raises(NotFittedError):
            est.transform(X_ERR)


def test_failed_partial_fit_leaves_statistics_unchanged():
    bn = BatchNormalizer().fit(X_ERR)
    before = {k: np.copy(getattr(bn, k)) for k in ("mean_", "var_", "scale_", "n_samples_seen_")}
    bad_inf = X_ERR.copy()
    bad_inf[0, 0] = np.inf
    attempts = [
        (dict(gamma=[1.0, 2.0]), X_ERR),
        (dict(momentum=2.0), X_ERR),
        (dict(nonfinite_policy="raise"), bad_inf),   # docs/reliability.md
        ({}, _data(seed=23, n=5)),                 # 5 features instead of 3
    ]
    for params, X in attempts:
        bn.set_params(**params)
        with pytest.raises(ValueError):
            bn.partial_fit(X)
        bn.set_params(gamma=1.0, momentum=None, nonfinite_policy=None)
        for k, v in before.items():
            assert_array_equal(getattr(bn, k), v)


def test_infinite_input_raises_like_sklearn_validation():
    X = X_ERR.copy()
    X[2, 1] = -np.inf
    # fit has no earlier statistics to keep: NonFiniteError (a ValueError) under every policy
    # but "propagate" (docs/reliability.md); transform refuses infinity like sklearn
    with pytest.raises(ValueError, match=r"feature\(s\) \[1\] are not finite"):
        BatchNormalizer().fit(X)
    bn = BatchNormalizer().fit(X_ERR)
    for method in (bn.transform, bn.inverse_transform):
        with pytest.raises(ValueError, match="Input X contains infinity"):
            method(X)


@pytest.mark.parametrize("make_sparse", [sp.csr_matrix, sp.csc_array, sp.coo_matrix])
def test_sparse_input_raises_type_error_saying_to_densify(make_sparse):
    Xs = make_sparse(X_ERR)
    match = r"does not accept sparse input \(got \w+\).*densify first with X\.toarray\(\)"
    with pytest.raises(TypeError, match=match):
        BatchNormalizer().fit(Xs)
    bn = BatchNormalizer().fit(X_ERR)
    for method in (bn.partial_fit, bn.transform, bn.inverse_transform):
        with pytest.raises(TypeError, match=match):
            method(Xs)


# ----------------------------------------------------------------------------------------------
# documentation


def test_docstring_example_runs():
    result = doctest.testmod(normlab.estimators, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 4 and result.failed == 0


def test_statistics_come_from_the_kernel_backend_and_equal_the_numpy_path(monkeypatch):
    """float32/float64 batches without NaN take the numba backend's column statistics (one
    parallel read); NaN sends a batch to the NumPy path; both give the same statistics to
    rounding, and NORMLAB_BACKEND=numpy (no column_moments) keeps the NumPy path."""
    from normlab.kernels import numba_cpu

    calls = []
    real = numba_cpu.column_moments
    monkeypatch.setattr(numba_cpu, "column_moments", lambda x: calls.append(x.dtype) or real(x))
    X = _data(seed=31, n=3000)
    fast = BatchNormalizer().fit(X)
    assert calls == [np.dtype(F64)]
    monkeypatch.setenv("NORMLAB_BACKEND", "numpy")
    slow = BatchNormalizer().fit(X)
    assert calls == [np.dtype(F64)]                        # not called again
    assert_allclose(fast.mean_, slow.mean_, rtol=1e-14)
    assert_allclose(fast.var_, slow.var_, rtol=1e-12)
    monkeypatch.delenv("NORMLAB_BACKEND")
    Xn = X.copy()
    Xn[5, 2] = np.nan
    with_nan = BatchNormalizer().fit(Xn)                   # kernel tried, NaN: NumPy path
    assert len(calls) == 2 and with_nan.n_samples_seen_[2] == X.shape[0] - 1
    assert_allclose(with_nan.mean_[2], np.nanmean(Xn[:, 2]), rtol=1e-14)
