r"""Moments: the one statistics primitive every method is built on.

Two algorithms, both chosen for stability rather than speed:

* ``moments(x, axes)``: the two-pass algorithm. First the mean, then the mean of the squared
  deviations from it::

      mean = sum(x) / M
      var  = sum((x - mean)^2) / M            # biased (population) variance

  Unlike the one-pass ``E[x^2] - E[x]^2`` it does not cancel catastrophically when
  ``|mean| >> std`` (data with mean 1e6 and std 1 loses every digit in the one-pass formula in
  float32, and about 12 of float64's 16 digits: ``E[x^2]`` is 1e12 while the variance is 1).

* ``chan_merge(a, b)``: Chan, Golub & LeVeque (1979). Summaries ``(count, mean, M2)`` of two
  disjoint blocks, with ``M2 = sum((x - mean)^2)``, merge exactly::

      n     = n_a + n_b
      delta = mean_b - mean_a
      mean  = mean_a + delta * n_b / n
      M2    = M2_a + M2_b + delta^2 * n_a * n_b / n

  Derivation: write ``x - mean = (x - mean_a) + (mean_a - mean)`` over block a; the cross term
  sums to zero, leaving ``M2_a + n_a (mean_a - mean)^2``, and likewise for b; with
  ``mean_a - mean = -delta n_b / n`` and ``mean_b - mean = delta n_a / n`` the two squares add to
  ``delta^2 n_a n_b / n``. Merging blocks of any sizes (including empty ones) in any order gives
  the statistics of the union: streaming estimators and SyncBatchNorm rely on this.
"""

from __future__ import annotations

import numpy as np

from .. import _checks

__all__ = ["moments", "summarize", "chan_merge", "finalize", "running_stats_update"]


def moments(x, axes, *, keepdims: bool = True):
    """Two-pass mean and biased variance of ``x`` over ``axes``, in float64.

    Returns ``(mean, var)``; with ``keepdims`` the reduced axes stay as size-1 axes so that the
    results broadcast against ``x``. The variance is clamped at 0 (it is a mean of squares, so
    this only removes the sign of a rounding error, never a real value).
    """
    x = np.asarray(x, dtype=np.float64)
    axes = tuple(axes)
    mean = x.mean(axis=axes, keepdims=True)           # (..., 1, ...)   first pass
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)  # second pass over deviations
    var = np.maximum(var, 0.0)
    if not keepdims:
        mean = mean.squeeze(axis=axes)
        var = var.squeeze(axis=axes)
    return mean, var


def summarize(x, axes):
    """Summary ``(count, mean, M2)`` of ``x`` over ``axes`` (two-pass), ready for ``chan_merge``.

    ``count`` is an int, ``mean`` and ``M2`` are float64 arrays of the kept axes. An empty block
    gives ``(0, 0, 0)``.
    """
    x = np.asarray(x, dtype=np.float64)
    axes = tuple(axes)
    count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64)) if axes else 1
    kept = tuple(s for i, s in enumerate(x.shape) if i not in {a % x.ndim for a in axes})
    if count == 0:
        return 0, np.zeros(kept), np.zeros(kept)
    mean, var = moments(x, axes, keepdims=False)
    return count, mean, var * count


def chan_merge(a, b):
    """Merge two summaries ``(count, mean, M2)`` of disjoint blocks into that of their union.

    Counts may be ints or arrays (per-feature counts, e.g. when NaNs are ignored); a block with
    count 0 leaves the other unchanged.
    """
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n_a = np.asarray(n_a, dtype=np.float64)
    n_b = np.asarray(n_b, dtype=np.float64)
    mean_a = np.asarray(mean_a, dtype=np.float64)
    mean_b = np.asarray(mean_b, dtype=np.float64)
    n = n_a + n_b
    safe_n = np.where(n > 0, n, 1.0)
    delta = mean_b - mean_a                                  # (...)
    f = n_b / safe_n
    # an infinite mean on either side: the weighted sum gives the union's sum / n (inf, or NaN
    # for +inf with -inf) where ``inf + (finite - inf) * f`` would give NaN in one order only
    with np.errstate(invalid="ignore"):
        mean = np.where(np.isfinite(delta), mean_a + delta * f, mean_a * (1.0 - f) + mean_b * f)
    m2 = np.asarray(m2_a) + np.asarray(m2_b) + delta**2 * (n_a * n_b / safe_n)
    mean = np.where(n > 0, mean, 0.0)
    m2 = np.where(n > 0, m2, 0.0)
    count = n.astype(np.int64) if n.ndim else int(n)
    return count, mean, m2


def finalize(summary, *, ddof: int = 0):
    """``(count, mean, M2) -> (mean, var)`` with ``var = M2 / (count - ddof)`` (NaN where undefined)."""
    count, mean, m2 = summary
    denom = np.asarray(count, dtype=np.float64) - ddof
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(denom > 0, np.asarray(m2, dtype=np.float64) / np.where(denom > 0, denom, 1.0), np.nan)
    return np.asarray(mean, dtype=np.float64), var


def running_stats_update(running_mean, running_var, batch_mean, batch_var, count, momentum,
                         num_batches_tracked=None):
    r"""PyTorch's running-statistics rule, as a pure function (returns new arrays).

    With ``f = momentum`` (or ``f = 1 / num_batches_tracked`` when ``momentum is None``, the
    cumulative average over all batches seen; ``num_batches_tracked`` counts this batch)::

        running_mean <- (1 - f) * running_mean + f * batch_mean
        running_var  <- (1 - f) * running_var  + f * batch_var * count / (count - 1)

    ``batch_var`` is the biased variance used to normalize the batch; the running variance
    stores the unbiased estimate (Bessel's correction over the ``count`` values per channel).
    Momentum points towards the new batch: 0.1 gives the new batch a weight of 0.1.
    """
    _checks.check_momentum(momentum)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 2:
        raise ValueError(
            f"running_stats_update needs count >= 2 values per channel (the unbiased variance "
            f"divides by count - 1), got count={count!r}; skip the update for such a batch"
        )
    if momentum is None:
        if not num_batches_tracked:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked >= 1")
        f = 1.0 / float(num_batches_tracked)
    else:
        f = float(momentum)
    unbiased = np.asarray(batch_var, dtype=np.float64) * (count / (count - 1))
    new_mean = (1.0 - f) * np.asarray(running_mean, dtype=np.float64) + f * np.asarray(batch_mean, dtype=np.float64)
    new_var = (1.0 - f) * np.asarray(running_var, dtype=np.float64) + f * unbiased
    return new_mean, new_var
