"""Argument checks shared by every front end.

Each check raises ``ValueError`` (or ``TypeError``) with a message that names the bad value and
says what is expected, so that a user can fix the call without reading our source.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from numbers import Real

import numpy as np


def check_eps(eps, *, allow_none: bool = False) -> None:
    """eps must be a finite number > 0 (it keeps rsqrt(var + eps) finite for constant data)."""
    if type(eps) is float and 0.0 < eps < math.inf:      # the common case, checked fast
        return
    if eps is None and allow_none:
        return
    if isinstance(eps, bool) or not isinstance(eps, Real):
        raise TypeError(f"eps must be a positive float, got {eps!r} of type {type(eps).__name__}")
    if not (math.isfinite(float(eps)) and float(eps) > 0.0):
        raise ValueError(
            f"eps must be a finite number > 0 (it keeps 1/sqrt(var + eps) finite for constant "
            f"data), got eps={eps!r}; use a small positive value such as 1e-5"
        )


def check_momentum(momentum) -> None:
    """momentum is None (cumulative average) or a number in [0, 1]."""
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, Real):
        raise TypeError(
            f"momentum must be a float in [0, 1] or None, got {momentum!r} of type "
            f"{type(momentum).__name__}"
        )
    if not (0.0 <= float(momentum) <= 1.0):
        raise ValueError(
            f"momentum must be in [0, 1] (the weight of the new batch in the running "
            f"statistics, as in torch.nn) or None for a cumulative average, got momentum={momentum!r}"
        )


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
    return int(value)


def check_min_ndim(x, min_ndim: int, what: str, layout: str) -> None:
    if x.ndim < min_ndim:
        raise ValueError(
            f"{what} expects an input of at least {min_ndim} dimensions {layout}, got an input of "
            f"shape {tuple(x.shape)} ({x.ndim} dimensions); add the missing batch or channel axis"
        )


def check_ndim_in(x, allowed, what: str, layout: str) -> None:
    if x.ndim not in allowed:
        allowed_s = " or ".join(str(a) for a in allowed)
        raise ValueError(
            f"{what} expects a {allowed_s}-dimensional input {layout}, got an input of shape "
            f"{tuple(x.shape)} ({x.ndim} dimensions); reshape it to that layout"
        )


def channel_axis(ndim: int, channels_last: bool) -> int:
    return ndim - 1 if channels_last else 1


def check_channels(x, num_channels: int, channels_last: bool, what: str) -> None:
    axis = channel_axis(x.ndim, channels_last)
    if x.shape[axis] != num_channels:
        where = "last" if channels_last else "second (index 1)"
        raise ValueError(
            f"{what} was built for {num_channels} channels but the input of shape "
            f"{tuple(x.shape)} has {x.shape[axis]} on its {where} axis; pass an input with "
            f"{num_channels} channels"
            + ("" if channels_last else " or set channels_last=True for (N, *spatial, C) data")
        )


def check_groups(num_groups: int, num_channels: int) -> None:
    check_positive_int(num_groups, "num_groups")
    if num_channels % num_groups != 0:
        divisors = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
        raise ValueError(
            f"num_groups={num_groups} does not divide num_channels={num_channels}; "
            f"choose one of {divisors}"
        )


def check_vector(v, length: int, name: str) -> None:
    if v is None:
        return
    shape = v.shape if type(v) is np.ndarray else tuple(np.shape(v))
    if shape != (length,):
        raise ValueError(f"{name} must have shape ({length},) (one value per channel), got shape {shape}")


def check_param_shape(v, shape: tuple, name: str) -> None:
    if v is None:
        return
    got = v.shape if type(v) is np.ndarray else tuple(np.shape(v))
    if got != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got shape {got}")


def check_stats_pair(mean, var, what: str) -> None:
    """Given statistics come in pairs: both mean and var (inference), or neither (training)."""
    if (mean is None) != (var is None):
        raise ValueError(f"{what} needs both mean and var (given statistics) or neither (batch "
                         f"statistics); got mean={'None' if mean is None else 'an array'} and "
                         f"var={'None' if var is None else 'an array'}")


def check_values_per_channel(count: int, shape, what: str) -> None:
    """Batch statistics from one value are meaningless (variance 0, output all zeros)."""
    if count <= 1:
        raise ValueError(
            f"{what} in training needs more than 1 value per channel to compute batch "
            f"statistics, got an input of shape {tuple(shape)} (i.e. {count} value per channel); "
            f"use a batch of at least 2 samples, or evaluation mode with running statistics"
        )


def normalized_shape_tuple(normalized_shape) -> tuple:
    """An int or a sequence of ints, as torch accepts; no silent conversion of "32" or 2.5."""
    if type(normalized_shape) is tuple and len(normalized_shape) == 1:   # the common case, fast
        n = normalized_shape[0]
        if type(n) is int and n > 0:
            return normalized_shape

    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

    if is_int(normalized_shape):
        normalized_shape = (int(normalized_shape),)
    if isinstance(normalized_shape, (str, bytes)) or not hasattr(normalized_shape, "__iter__"):
        raise TypeError(
            f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r} "
            f"of type {type(normalized_shape).__name__}; pass e.g. normalized_shape=(32,)"
        )
    entries = tuple(normalized_shape)
    bad = [v for v in entries if not is_int(v)]
    if bad:
        raise TypeError(
            f"normalized_shape must be a sequence of ints, got {normalized_shape!r} whose entry "
            f"{bad[0]!r} is of type {type(bad[0]).__name__}; pass ints such as (3, 2)"
        )
    shape = tuple(int(s) for s in entries)
    if len(shape) == 0 or any(s <= 0 for s in shape):
        raise ValueError(
            f"normalized_shape must be a non-empty sequence of positive ints, got {normalized_shape!r}"
        )
    return shape


def check_real(value, name: str) -> float:
    """A real number (not bool, not a string); returns it as float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise TypeError(
            f"{name} must be a real number, got {name}={value!r} of type {type(value).__name__}"
        )
    return float(value)


def check_normalized_shape(x, normalized_shape: tuple, what: str) -> None:
    k = len(normalized_shape)
    if x.ndim < k or x.shape[x.ndim - k :] != tuple(normalized_shape):
        raise ValueError(
            f"{what} normalizes over the trailing dimensions {tuple(normalized_shape)}, but the "
            f"input has shape {tuple(x.shape)}; the input's last {k} dimension(s) must equal "
            f"normalized_shape"
        )


# ---------------------------------------------------------------------------------------------
# Non-finite training batches (see docs/reliability.md)
# ---------------------------------------------------------------------------------------------
#
# One policy decides what a module with running statistics does with a training batch whose
# statistics are not finite (the batch holds NaN or inf, or overflowed):
#
#   "skip"       (default) normalize the batch as usual (NaN/inf in, NaN out: IEEE), but leave
#                running_mean, running_var and num_batches_tracked exactly as they were, and
#                warn (NonFiniteWarning, a RuntimeWarning) naming the layer and the channels;
#   "propagate"  torch.nn's behaviour: the non-finite statistics are folded in (and poison the
#                running statistics for good); no check is made at all;
#   "raise"      raise NonFiniteError (a ValueError) before anything is written.
#
# Which policy applies, most specific first: the ``nonfinite=`` argument of a call, the
# ``nonfinite_policy`` attribute of a module/layer/estimator (None = not set), the innermost
# ``with normlab.nonfinite_policy(...)`` block (context-local: threads and asyncio tasks do not
# see each other's), the process default (``normlab.set_nonfinite_policy``, initially "skip").

NONFINITE_POLICIES = ("skip", "propagate", "raise")

_default_policy = "skip"
_context_policy: contextvars.ContextVar = contextvars.ContextVar("normlab_nonfinite_policy",
                                                                 default=None)


class NonFiniteWarning(RuntimeWarning):
    """A training batch with non-finite statistics was skipped (running statistics unchanged).

    ``owner`` is the module, layer or estimator that skipped it (find its name in a model with
    ``[n for n, m in model.named_modules() if m is w.owner]``); ``channels`` the offending
    channel (or feature) indices.
    """

    def __init__(self, message, owner=None, channels=()):
        super().__init__(message)
        self.owner, self.channels = owner, list(channels)


class NonFiniteError(ValueError):
    """A training batch with non-finite statistics under the "raise" policy (nothing written)."""

    def __init__(self, message, owner=None, channels=()):
        super().__init__(message)
        self.owner, self.channels = owner, list(channels)


def check_nonfinite_policy(policy, *, allow_none: bool = False, name: str = "nonfinite"):
    """``policy`` if it is one of NONFINITE_POLICIES (or None when allowed), else ValueError."""
    if policy is None and allow_none:
        return None
    if not isinstance(policy, str) or policy not in NONFINITE_POLICIES:
        extra = " or None (use the context/default policy)" if allow_none else ""
        raise ValueError(
            f"{name} must be one of {list(NONFINITE_POLICIES)}{extra}, got {name}={policy!r}; "
            f"'skip' leaves the running statistics unchanged for a batch with NaN/inf, "
            f"'propagate' folds it in (torch.nn), 'raise' raises")
    return policy


def set_nonfinite_policy(policy: str) -> str:
    """Set the process-wide default policy; returns the previous default."""
    global _default_policy
    check_nonfinite_policy(policy, name="policy")
    previous, _default_policy = _default_policy, policy
    return previous


def get_nonfinite_policy(override=None) -> str:
    """The policy in force: ``override`` if not None, else the innermost context, else the default."""
    if override is not None:
        return check_nonfinite_policy(override)
    ctx = _context_policy.get()
    return ctx if ctx is not None else _default_policy


@contextlib.contextmanager
def nonfinite_policy(policy: str):
    """``with normlab.nonfinite_policy("raise"): ...`` -- the policy inside the block.

    A per-call ``nonfinite=`` argument or a module's ``nonfinite_policy`` attribute still wins.
    """
    check_nonfinite_policy(policy, name="policy")
    token = _context_policy.set(policy)
    try:
        yield policy
    finally:
        _context_policy.reset(token)


def owner_policy(owner, override=None) -> str:
    """The policy for ``owner``: the call's override, its ``nonfinite_policy`` attribute, then
    the context and default."""
    if override is None and owner is not None:
        attr = getattr(owner, "nonfinite_policy", None)
        if attr is not None:
            override = check_nonfinite_policy(attr, name=f"{type(owner).__name__}.nonfinite_policy")
    return get_nonfinite_policy(override)


def describe_owner(owner) -> str:
    if owner is None:
        return "batch_norm"
    if isinstance(owner, str):
        return owner
    try:
        text = repr(owner)
    except Exception:  # pragma: no cover - a broken repr must not hide the real problem
        text = type(owner).__name__
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def nonfinite_found(owner, policy: str, channels, *, what: str = "channel(s)",
                    state: str = "running_mean, running_var and num_batches_tracked",
                    fix: str = "torch.nan_to_num or np.nan_to_num") -> None:
    """Report a non-finite training batch under ``policy`` ("skip": warn; "raise": raise).

    Called only once the caller has decided not to write the running statistics.
    """
    channels = [int(c) for c in channels]
    shown = channels[:10] + (["..."] if len(channels) > 10 else [])
    who = describe_owner(owner)
    head = (f"{who}: the batch statistics of {what} {shown} are not finite (the training batch "
            f"contains NaN or inf there, or overflowed)")
    if policy == "raise":
        raise NonFiniteError(
            f"{head}; the running statistics ({state}) were left unchanged. Clean the input "
            f"(e.g. {fix}), or choose "
            f"nonfinite_policy 'skip' (keep them, warn) or 'propagate' (fold it in, as torch.nn)",
            owner if not isinstance(owner, str) else None, channels)
    warnings.warn(NonFiniteWarning(
        f"{head}; this batch was not folded into the running statistics ({state} unchanged). "
        f"Clean the input (e.g. {fix}), or set nonfinite_policy='raise' to stop here, or "
        f"'propagate' to fold it in (torch.nn's behaviour)", owner if not isinstance(owner, str) else None, channels),
        stacklevel=3)
