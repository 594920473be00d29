r"""scikit-learn front end: ``BatchNormalizer``, Batch Normalization as a transformer.

Per feature ``j`` (a column of ``X``), with statistics estimated by ``fit`` / ``partial_fit``::

    y[:, j] = gamma[j] * (x[:, j] - mean_[j]) / sqrt(var_[j] + eps) + beta[j]

This is BatchNorm in evaluation mode over ``(n_samples, n_features)`` data: the reduction runs
over the samples, one mean and one (biased) variance per feature, followed by the per-feature
affine map. With ``gamma=1, beta=0`` and ``eps -> 0`` it is ``StandardScaler``.

Statistics policy (``momentum``):

* ``momentum=None`` (default): exact statistics of all the data seen. Every batch is summarized
  as ``(count, mean, M2)`` with the two-pass algorithm in float64 and merged into the running
  summary with the Chan/Welford rule of :func:`normlab.reference.moments.chan_merge`, so
  ``partial_fit`` over any split of the data gives the statistics of ``fit`` on all of it (to
  rounding, about 1e-15 relative).
* ``momentum=m`` in ``(0, 1]``: an exponential moving average of batch statistics, as the
  running statistics of a BatchNorm layer (``m`` is the weight of the new batch).

Both policies ignore NaN per feature (a feature's count is its number of non-NaN values) and the
transform keeps NaN in place, as ``StandardScaler`` does.

Infinity is not a missing value: a batch whose statistics are not finite (an inf in the data,
or values so large that the sum of squares overflows) is handled by normlab's non-finite
policy (``nonfinite_policy`` parameter, else ``normlab.get_nonfinite_policy()``; see
docs/reliability.md): "skip" (default) leaves the statistics as they were and warns,
"raise" raises, "propagate" folds the non-finite statistics in.
"""

from __future__ import annotations

from numbers import Real

import numpy as np
import scipy.sparse as sp
import sklearn
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin

try:  # public since scikit-learn 1.6, which also introduced __sklearn_tags__
    from sklearn.utils.validation import FLOAT_DTYPES, check_is_fitted, validate_data
except ImportError as exc:  # pragma: no cover - depends on the installed version
    raise ImportError(
        f"normlab.estimators needs scikit-learn >= 1.6 (validate_data and __sklearn_tags__), "
        f"found scikit-learn {sklearn.__version__}; upgrade with `pip install -U scikit-learn`"
    ) from exc

from ._checks import check_eps, check_nonfinite_policy, nonfinite_found, owner_policy
from . import kernels
from .reference.moments import chan_merge, finalize, summarize

__all__ = ["BatchNormalizer"]

# Rows per block when a float32/float16 input is normalized through float64 (bounds the
# temporary to a block instead of a full float64 copy of X).
_BLOCK_ROWS = 8192


# ----------------------------------------------------------------------------------------------
# argument checks (run at fit time, never in __init__: scikit-learn's convention)


def _check_momentum(momentum) -> None:
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, Real):
        raise TypeError(
            f"momentum must be None or a float in (0, 1], got {momentum!r} of type "
            f"{type(momentum).__name__}; pass e.g. momentum=0.1, or momentum=None for exact "
            f"statistics over all data seen"
        )
    if not (0.0 < float(momentum) <= 1.0):
        raise ValueError(
            f"momentum must be in (0, 1] (the weight of each new batch in the moving average "
            f"of batch statistics) or None (exact statistics over all data seen), got "
            f"momentum={momentum!r}; use e.g. momentum=0.1, or momentum=None"
        )


def _check_affine(value, name: str, n_features: int) -> np.ndarray:
    """``gamma`` / ``beta`` as a float64 array of shape ``(n_features,)``."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a number or an array of {n_features} numbers (one per feature), "
            f"got {value!r}"
        ) from None
    if arr.ndim == 0:
        arr = np.full(n_features, float(arr))
    elif arr.shape != (n_features,):
        raise ValueError(
            f"{name} must be a scalar or an array of shape ({n_features},) (one value per "
            f"feature of X, which has {n_features} features), got {name} of shape {arr.shape}; "
            f"pass {n_features} values or a single number used for every feature"
        )
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(
            f"{name} must be finite, got non-finite {name} for feature(s) {bad[:10].tolist()} "
            f"({name}[{bad[0]}]={arr[bad[0]]!r}); replace them with finite numbers"
        )
    return arr


def _reject_sparse(X) -> None:
    if sp.issparse(X):
        raise TypeError(
            f"BatchNormalizer does not accept sparse input (got {type(X).__name__}): centering "
            f"x - mean_ turns the zeros into non-zeros, so the output would be dense anyway; "
            f"densify first with X.toarray(), or use StandardScaler(with_mean=False) to scale "
            f"sparse data without centering"
        )


# ----------------------------------------------------------------------------------------------
# statistics


def _nan_summary(X: np.ndarray):
    """Per-feature ``(count, mean, M2)`` of a 2-D batch over its rows, NaN ignored, in float64.

    float32/float64 batches without NaN or inf take the kernel backend's ``column_moments``
    when it has one (the numba backend: one parallel read, blockwise float64 moments merged
    with Chan's formula); everything else, and any batch where that gives a non-finite value,
    the two-pass NumPy code below.

    Returns ``count`` as an int64 array of shape ``(n_features,)``; features without any value
    get ``(0, 0, 0)``, the neutral element of ``chan_merge``.
    """
    if X.dtype in (np.float32, np.float64) and X.shape[0]:
        # the backend's column statistics where it has them (numba: one parallel read of X);
        # a column with NaN or inf comes out non-finite and takes the NumPy path below
        try:
            impl = kernels.get_backend(None, device="cpu", dtype=X.dtype).impl
        except ValueError:       # a $NORMLAB_BACKEND that cannot run here: transform will say so
            impl = None
        moments = getattr(impl, "column_moments", None)
        if moments is not None:
            mean, m2 = moments(X)
            if np.isfinite(mean).all() and np.isfinite(m2).all():
                return np.full(X.shape[1], X.shape[0], dtype=np.int64), mean, m2
    nan = np.isnan(X)                                       # (n, d)
    if not nan.any():
        count, mean, m2 = summarize(X, axes=(0,))           # two-pass, float64
        return np.full(X.shape[1], count, dtype=np.int64), mean, m2
    valid = ~nan
    x = np.asarray(X, dtype=np.float64)                     # (n, d)
    count = valid.sum(axis=0, dtype=np.int64)               # (d,)
    # Two-pass over the valid entries only; dividing by max(count, 1) keeps all-NaN features
    # at 0 without a 0/0 warning.
    mean = np.where(valid, x, 0.0).sum(axis=0) / np.maximum(count, 1)   # (d,)
    dev = np.where(valid, x - mean, 0.0)                    # (n, d)   NaN - mean is silent
    m2 = np.einsum("ij,ij->j", dev, dev)                    # (d,)
    return count, mean, m2


def _affine(X: np.ndarray, shift, mult, add) -> np.ndarray:
    """``X <- (X - shift) * mult + add`` in place, per column; computed in float64.

    float64 input is updated in place with no temporary. Narrower floats are upcast block by
    block and rounded once: subtracting a float64 mean from the float32 values keeps the digits
    that subtracting a mean rounded to float32 would lose when ``|mean| >> std``.
    """
    if X.dtype == np.float64:
        X -= shift
        X *= mult
        X += add
        return X
    for start in range(0, X.shape[0], _BLOCK_ROWS):
        block = X[start : start + _BLOCK_ROWS].astype(np.float64)
        block -= shift
        block *= mult
        block += add
        X[start : start + _BLOCK_ROWS] = block
    return X


# ----------------------------------------------------------------------------------------------


class BatchNormalizer(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    r"""Batch Normalization of tabular data as a scikit-learn transformer.

    For each feature ``j``::

        y[:, j] = gamma[j] * (x[:, j] - mean_[j]) / sqrt(var_[j] + eps) + beta[j]
        scale_[j] = sqrt(var_[j] + eps)

    where ``mean_`` and ``var_`` (biased, population variance) are estimated from the data
    passed to :meth:`fit` / :meth:`partial_fit`. NaN is ignored when estimating and kept by
    :meth:`transform`.

    **Exact streaming statistics** (``momentum=None``). Each batch ``b`` is summarized per
    feature by its count of non-NaN values ``n_b``, mean ``mu_b`` and ``M2_b = sum((x - mu_b)^2)``
    (two passes, float64), and merged into the running summary ``(n, mu, M2)`` with Chan et
    al.'s rule::

        delta = mu_b - mu
        n'    = n + n_b
        mu'   = mu + delta * n_b / n'
        M2'   = M2 + M2_b + delta^2 * n * n_b / n'
        mean_ = mu',   var_ = M2' / n'

    so any sequence of ``partial_fit`` calls gives the statistics of one ``fit`` on all the
    rows (to rounding).

    **Moving average** (``momentum=m``, ``0 < m <= 1``). With the batch's mean ``mu_b`` and
    biased variance ``var_b``::

        mean_ <- (1 - m) * mean_ + m * mu_b
        var_  <- (1 - m) * var_  + m * var_b

    The first batch that has values for a feature initializes it (``mean_ = mu_b``,
    ``var_ = var_b``); a batch with no value for a feature leaves it unchanged. ``m`` is the
    weight of the new batch, as in ``torch.nn.BatchNorm`` (the opposite of the Keras
    convention), and ``var_`` stays biased (no Bessel correction: it is what the transform
    divides by). :meth:`fit` is one batch, so it gives the same statistics under both policies.

    Shapes: ``X`` is ``(n_samples, n_features)``; every fitted array is ``(n_features,)``.

    Parameters
    ----------
    eps : float, default=1e-5
        Added to the variance before the square root (> 0). A constant feature (``var_ = 0``)
        maps to ``beta`` instead of dividing by zero.
    momentum : float in (0, 1] or None, default=None
        None for exact statistics of all the data seen, otherwise the weight of each new batch
        in an exponential moving average of batch statistics.
    gamma : float or array-like of shape (n_features,), default=1.0
        Per-feature scale applied after standardizing.
    beta : float or array-like of shape (n_features,), default=0.0
        Per-feature shift applied after scaling.
    copy : bool, default=True
        If False, ``transform`` and ``inverse_transform`` work in place when the input is
        already a writeable float array of the right layout (a copy is still made otherwise).
    nonfinite_policy : {"skip", "propagate", "raise"} or None, default=None
        What a batch with non-finite statistics (inf in ``X``, or overflow; NaN is missing data,
        not this) does: "skip" leaves the statistics unchanged and warns
        (``normlab.NonFiniteWarning``); "raise" raises ``normlab.NonFiniteError`` (a
        ValueError) and changes nothing; "propagate" folds it in (``mean_``/``var_`` become
        inf or NaN). None uses ``normlab.get_nonfinite_policy()`` ("skip" unless changed).
        :meth:`fit` has no earlier statistics to keep, so under "skip" it raises too.

    Attributes
    ----------
    mean_ : ndarray of shape (n_features,), float64
        Per-feature mean; NaN for a feature with no non-NaN value seen yet.
    var_ : ndarray of shape (n_features,), float64
        Per-feature biased variance (>= 0); NaN for a feature with no value seen yet.
    scale_ : ndarray of shape (n_features,), float64
        ``sqrt(var_ + eps)``, what the transform divides by.
    gamma_, beta_ : ndarray of shape (n_features,), float64
        ``gamma`` and ``beta`` as validated by the last ``fit`` / ``partial_fit``, broadcast to
        one value per feature. The transform uses these.
    n_samples_seen_ : int or ndarray of shape (n_features,), int64
        Number of values seen per feature: an int when every feature has the same count, an
        array when NaNs made the counts differ (as in ``StandardScaler``).
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Column names, when fitted on a DataFrame with string column names.

    References
    ----------
    Ioffe & Szegedy, "Batch Normalization", ICML 2015. Chan, Golub & LeVeque, "Updating formulae
    and a pairwise algorithm for computing sample variances", 1979.

    Examples
    --------
    >>> import numpy as np
    >>> from normlab.estimators import BatchNormalizer
    >>> X = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, np.nan]])
    >>> bn = BatchNormalizer(gamma=2.0, beta=1.0).fit(X)
    >>> bn.mean_, bn.var_, bn.n_samples_seen_
    (array([ 3., 10.]), array([2.66666667, 0.        ]), array([3, 2]))
    >>> bn.transform(X).round(4)
    array([[-1.4495,  1.    ],
           [ 1.    ,  1.    ],
           [ 3.4495,     nan]])
    >>> np.allclose(bn.inverse_transform(bn.transform(X)), X, equal_nan=True)
    True
    """

    def __init__(self, *, eps=1e-5, momentum=None, gamma=1.0, beta=0.0, copy=True,
                 nonfinite_policy=None):
        self.eps = eps
        self.momentum = momentum
        self.gamma = gamma
        self.beta = beta
        self.copy = copy
        self.nonfinite_policy = nonfinite_policy

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.input_tags.sparse = False
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # -- fitting ---------------------------------------------------------------------------

    def _reset(self) -> None:
        """Forget every fitted attribute (the state ``fit`` starts from)."""
        for name in ("mean_", "var_", "scale_", "gamma_", "beta_", "n_samples_seen_",
                     "n_features_in_", "feature_names_in_"):
            if hasattr(self, name):
                delattr(self, name)

    def fit(self, X, y=None):
        """Estimate ``mean_`` and ``var_`` from ``X`` (a fresh start: ``_reset`` + ``partial_fit``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data; NaN is ignored per feature; infinity (non-finite statistics) raises
            ``normlab.NonFiniteError`` unless ``nonfinite_policy="propagate"``.
        y : None
            Ignored.

        Returns
        -------
        self : BatchNormalizer
        """
        self._reset()
        return self._partial_fit(X, fresh=True)

    def partial_fit(self, X, y=None):
        """Update the statistics with one batch ``X`` (see the class docstring for the rules).

        The statistics are only written once the batch and every hyperparameter have been
        validated, so a call that raises leaves the estimator as it was.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            One batch; NaN is ignored per feature; a batch with infinity (non-finite
            statistics) is handled by the non-finite policy (see ``nonfinite_policy``).
        y : None
            Ignored.

        Returns
        -------
        self : BatchNormalizer
        """
        return self._partial_fit(X, fresh=False)

    def _partial_fit(self, X, fresh):
        check_eps(self.eps)
        _check_momentum(self.momentum)
        check_nonfinite_policy(self.nonfinite_policy, allow_none=True, name="nonfinite_policy")
        policy = owner_policy(self)
        first = not hasattr(self, "n_samples_seen_")
        _reject_sparse(X)
        X = validate_data(self, X, reset=first, dtype=FLOAT_DTYPES, ensure_all_finite=False)
        try:
            gamma = _check_affine(self.gamma, "gamma", X.shape[1])
            beta = _check_affine(self.beta, "beta", X.shape[1])
        except (TypeError, ValueError):
            if first:  # validate_data already recorded n_features_in_: undo it
                self._reset()
            raise

        with np.errstate(over="ignore", invalid="ignore"):   # inf/overflow: judged just below
            n_b, mu_b, m2_b = _nan_summary(X)
        if policy != "propagate":
            bad = np.flatnonzero(~(np.isfinite(mu_b) & np.isfinite(m2_b)))
            if bad.size:
                if first:  # validate_data already recorded n_features_in_: undo it
                    self._reset()
                # fit has nothing earlier to keep: skipping would leave it unfitted, so it raises
                nonfinite_found(self, "raise" if fresh else policy, bad, what="feature(s)",
                                state="mean_, var_ and n_samples_seen_", fix="np.nan_to_num")
                return self
        d = X.shape[1]
        if first:
            n, mu, m2 = np.zeros(d, dtype=np.int64), np.zeros(d), np.zeros(d)
            var = np.zeros(d)
        else:
            n = np.broadcast_to(np.asarray(self.n_samples_seen_, dtype=np.int64), (d,))
            seen = n > 0
            # unseen features hold NaN statistics; the merge needs its neutral (0, 0, 0)
            mu = np.where(seen, self.mean_, 0.0)
            var = np.where(seen, self.var_, 0.0)
            m2 = var * n

        with np.errstate(over="ignore", invalid="ignore"):  # only "propagate" gets here with inf
            if self.momentum is None:
                n_new, mean, m2_new = chan_merge((n, mu, m2), (n_b, mu_b, m2_b))
                mean, var_new = finalize((n_new, mean, m2_new))
            else:
                f = float(self.momentum)
                var_b = m2_b / np.maximum(n_b, 1)
                in_batch = n_b > 0
                init = in_batch & (n == 0)
                mean = np.where(init, mu_b, np.where(in_batch, (1.0 - f) * mu + f * mu_b, mu))
                var_new = np.where(init, var_b, np.where(in_batch, (1.0 - f) * var + f * var_b, var))
                n_new = n + n_b

        n_new = np.asarray(n_new, dtype=np.int64)
        observed = n_new > 0
        self.mean_ = np.where(observed, mean, np.nan)
        # M2 is a sum of squares, so only a rounding error could make this negative
        self.var_ = np.where(observed, np.maximum(var_new, 0.0), np.nan)
        self.scale_ = np.sqrt(self.var_ + float(self.eps))
        self.gamma_ = gamma
        self.beta_ = beta
        self.n_samples_seen_ = int(n_new[0]) if np.all(n_new == n_new[0]) else n_new
        return self

    # -- transforming ----------------------------------------------------------------------

    def _validate_for_transform(self, X, copy):
        check_is_fitted(self)
        copy = self.copy if copy is None else copy
        _reject_sparse(X)
        return validate_data(self, X, reset=False, dtype=FLOAT_DTYPES, copy=copy,
                             force_writeable=True, ensure_all_finite="allow-nan")

    def transform(self, X, copy=None):
        """``y = gamma_ * (X - mean_) / scale_ + beta_``, NaN kept, dtype kept (float32/float64).

        Integer input becomes float64. float32 and float64 input go through one pass of the
        fused eval kernel (``normlab.kernels``; within about one float32 ulp of float64
        arithmetic rounded once); other floats through float64 arithmetic.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        copy : bool or None, default=None
            Overrides ``self.copy`` for this call.

        Returns
        -------
        X_tr : ndarray of shape (n_samples, n_features)
        """
        copy = self.copy if copy is None else copy
        X = self._validate_for_transform(X, False)      # no copy yet: the kernel writes a new y
        if X.dtype in (np.float32, np.float64) and X.shape[0]:
            # one pass of the fused eval kernel (batch norm with given statistics: float64
            # parameters, x - mean taken without cancellation, one rounding to X's dtype)
            be = kernels.get_backend(None, device="cpu", dtype=X.dtype)
            y, *_ = be.batch_norm_forward(X, self.gamma_, self.beta_, float(self.eps),
                                          mean=self.mean_, var=self.var_)
            if not copy and X.flags.writeable:
                X[...] = y                       # copy=False: in place, as asked
                return X
            return y
        if copy:
            X = X.copy()
        return _affine(X, self.mean_, self.gamma_ / self.scale_, self.beta_)

    def inverse_transform(self, X, copy=None):
        """``x = (X - beta_) * scale_ / gamma_ + mean_``, the inverse of :meth:`transform`.

        Raises ``ValueError`` if some ``gamma_`` is 0 (the transform then maps every value of
        that feature to ``beta_`` and cannot be undone).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        copy : bool or None, default=None
            Overrides ``self.copy`` for this call.

        Returns
        -------
        X_original : ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        zero = np.flatnonzero(self.gamma_ == 0.0)
        if zero.size:
            raise ValueError(
                f"inverse_transform needs gamma != 0 for every feature, but gamma is 0 for "
                f"feature(s) {zero[:10].tolist()}: the transform mapped all their values to beta "
                f"and cannot be inverted; refit with non-zero gamma to be able to invert"
            )
        X = self._validate_for_transform(X, copy)
        return _affine(X, self.beta_, self.scale_ / self.gamma_, self.mean_)
