"""What every NumPy layer shares: parameters, buffers, dtypes, forward/backward plumbing, state_dict.

A subclass says only what differs: the shapes of its parameters and buffers (through
``__init__``), how the input is checked (``_check_input``), and which method of ``_ops`` runs
with which options (``_op``). Statistics policy that differs (Instance Norm's running update)
overrides ``_update_running_stats``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _checks, reference
from . import _ops, _validate

__all__ = ["NormLayer", "LoadResult"]

_STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class LoadResult(NamedTuple):
    """What ``load_state_dict(strict=False)`` skipped (torch.nn's ``_IncompatibleKeys``)."""

    missing_keys: list
    unexpected_keys: list


class NormLayer:
    """Base class of the NumPy normalization layers (not instantiated directly).

    Attributes shared by every layer: ``weight``, ``bias`` (parameters, None when absent),
    ``running_mean``, ``running_var``, ``num_batches_tracked`` (buffers, None when not
    tracked), ``dweight``, ``dbias`` (gradients of the last ``backward``, None when the
    parameter is absent or before any backward), ``dtype`` (of parameters and running
    statistics), ``eps``, ``momentum``, ``backend`` (the kernel backend name every layer's
    constructor takes as ``backend=``: None for the registry's choice, i.e. ``NORMLAB_BACKEND``,
    then numba on CPU, then the float64 NumPy fallback; ``"numba"`` or ``"numpy"`` to insist).
    """

    _repr_fields: tuple = ()
    #: what a training batch with non-finite statistics does to the running statistics: None
    #: (the context's or process default, ``normlab.get_nonfinite_policy()``), "skip",
    #: "propagate" or "raise" (docs/reliability.md); set it on an instance
    nonfinite_policy = None

    def __init__(self, *, param_shape: tuple, weight: bool, bias: bool, stats_shape: tuple | None,
                 eps, momentum, dtype, backend=None):
        self.dtype = _validate.param_dtype(dtype)
        self.backend = _validate.backend_name(backend)
        self.eps = eps
        self.momentum = momentum
        self._param_shape = tuple(param_shape)
        self._stats_shape = None if stats_shape is None else tuple(stats_shape)
        self.weight = np.ones(self._param_shape, self.dtype) if weight else None
        self.bias = np.zeros(self._param_shape, self.dtype) if bias else None
        self.running_mean = self.running_var = self.num_batches_tracked = None
        if self._stats_shape is not None:
            self.running_mean = np.zeros(self._stats_shape, self.dtype)
            self.running_var = np.ones(self._stats_shape, self.dtype)
            self.num_batches_tracked = np.zeros((), np.int64)
        self.dweight = self.dbias = None
        self._ctx = None          # what the last forward left for backward
        self._y_shape = None

    @property
    def track_running_stats(self) -> bool:
        return self._stats_shape is not None

    # -- what subclasses define -----------------------------------------------------------
    def _check_input(self, x: np.ndarray, batch_stats: bool) -> None:
        raise NotImplementedError

    def _op(self, training: bool, batch_stats: bool) -> tuple[str, dict]:
        """``(method, options)`` for ``_ops.forward``."""
        raise NotImplementedError

    def _uses_batch_stats(self, training: bool) -> bool:
        # torch.nn: batch statistics in training, and in eval when there are no running ones
        return training or not self.track_running_stats

    # -- forward / backward ---------------------------------------------------------------
    def forward(self, x, training: bool = True, *, nonfinite=None):
        """Normalize ``x``; returns ``y`` of ``x``'s dtype and shape. See the class docstring.

        ``training=True`` uses batch statistics and updates the running statistics when they
        are tracked. A batch whose statistics are not finite (NaN or inf in the input) is
        handled by the non-finite policy: ``nonfinite`` for this call, else the layer's
        ``nonfinite_policy``, else ``normlab.get_nonfinite_policy()`` -- "skip" (default:
        running statistics and ``num_batches_tracked`` unchanged, ``NonFiniteWarning``),
        "raise" (``NonFiniteError``, a ValueError, nothing written) or "propagate" (folded in,
        as torch.nn). ``training=False`` uses the running statistics when they are tracked.
        """
        name = type(self).__name__
        self._ctx = None          # a failed forward must not leave an older one to backward
        _validate.check_flag(training, "training", name)
        _checks.check_nonfinite_policy(nonfinite, allow_none=True)
        x = _validate.float_array(x, name)
        batch_stats = self._uses_batch_stats(training)
        self._check_input(x, batch_stats)
        method, options = self._op(training, batch_stats)
        # copies: the backward pass must see the weight of this forward even if an optimizer
        # updates self.weight in place before backward is called (they are only C values)
        weight = None if self.weight is None else self.weight.copy()
        bias = None if self.bias is None else self.bias.copy()
        y, ctx, stats = _ops.forward(method, x, weight, bias, backend=self.backend, **options)
        if training and self.track_running_stats:
            policy = _checks.owner_policy(self, nonfinite)
            bad = None if policy == "propagate" else _validate.nonfinite_channels(stats.mean, stats.var)
            if bad:
                _checks.nonfinite_found(self, policy, bad)      # warns ("skip") or raises
            else:
                self._update_running_stats(stats)
        self._ctx, self._y_shape = ctx, y.shape
        return y

    __call__ = forward

    def backward(self, dy):
        """Gradient of the loss w.r.t. the last forward's input, given ``dy`` = dL/dy.

        Returns ``dx`` (the input's dtype) and stores ``dweight``, ``dbias`` (parameter dtype,
        None where the parameter is absent); they are overwritten, not accumulated.
        """
        name = type(self).__name__
        if self._ctx is None:
            raise RuntimeError(f"{name}.backward was called before forward (or after a forward that "
                               f"failed); call forward(x) first, then backward(dy) with dy of the "
                               f"output's shape")
        dy = _validate.float_array(dy, f"{name}.backward", "dy")
        _validate.check_same_shape(dy, self._y_shape, name)
        dx, dweight, dbias = _ops.backward(self._ctx, dy)
        self.dweight = None if dweight is None else dweight.astype(self.dtype)
        self.dbias = None if dbias is None else dbias.astype(self.dtype)
        return dx

    # -- running statistics ---------------------------------------------------------------
    def _update_running_stats(self, stats: _ops.Stats) -> None:
        self.num_batches_tracked += 1
        self._fold_into_running(stats.mean, stats.var, stats.count, self.momentum)

    def _fold_into_running(self, mean, var, count: int, momentum) -> None:
        # reference.running_stats_update works in float64; storing rounds once, to self.dtype
        new_mean, new_var = reference.running_stats_update(
            self.running_mean, self.running_var, mean, var, count, momentum,
            num_batches_tracked=int(self.num_batches_tracked))
        self.running_mean[...] = new_mean
        self.running_var[...] = new_var

    def reset_running_stats(self) -> None:
        """running_mean = 0, running_var = 1, num_batches_tracked = 0 (no-op when not tracked)."""
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def reset_parameters(self) -> None:
        """weight = 1, bias = 0, and the running statistics reset."""
        self.reset_running_stats()
        if self.weight is not None:
            self.weight[...] = 1
        if self.bias is not None:
            self.bias[...] = 0

    # -- state dict ---------------------------------------------------------------------
    def _state_spec(self) -> dict:
        """key -> (shape, is_integer) for every entry this layer's state_dict has."""
        spec = {}
        if self.weight is not None:
            spec["weight"] = (self._param_shape, False)
        if self.bias is not None:
            spec["bias"] = (self._param_shape, False)
        if self.track_running_stats:
            spec["running_mean"] = (self._stats_shape, False)
            spec["running_var"] = (self._stats_shape, False)
            spec["num_batches_tracked"] = ((), True)
        return spec

    def state_dict(self) -> dict:
        """Copies of the parameters and buffers under torch.nn's key names."""
        return {key: np.array(getattr(self, key), copy=True) for key in self._state_spec()}

    def load_state_dict(self, state_dict, strict: bool = True) -> LoadResult:
        """Load parameters and buffers from ``state_dict`` (NumPy arrays or torch tensors).

        Everything is validated before anything is written, so a failed load leaves the layer
        unchanged. ``num_batches_tracked`` may be missing (checkpoints from before torch 0.4.1):
        it then keeps its current value, as in torch.nn. With ``strict=False`` missing and
        unexpected keys are skipped and reported; a shape mismatch is an error either way.
        """
        name = type(self).__name__
        spec = self._state_spec()
        missing = [k for k in spec if k not in state_dict and k != "num_batches_tracked"]
        unexpected = [k for k in state_dict if k not in spec]
        if strict and (missing or unexpected):
            hint = ""
            if not self.track_running_stats and any(k in _STATE_KEYS[2:] for k in unexpected):
                hint = " (this layer was built with track_running_stats=False)"
            if any(k in ("weight", "bias") for k in unexpected) and "weight" not in spec:
                hint += " (this layer was built without an affine transform)"
            raise ValueError(
                f"{name}.load_state_dict: missing keys {missing}, unexpected keys {unexpected}"
                f"{hint}; this layer expects exactly {sorted(spec)}. Build the layer with the "
                f"checkpoint's configuration, or pass strict=False to skip them (nothing was loaded)"
            )
        new = {}
        for key, (shape, integer) in spec.items():
            if key not in state_dict:
                continue
            value = _validate.state_value(state_dict[key])
            _validate.check_state_entry(name, key, value, shape, integer)
            new[key] = value.astype(np.int64 if integer else self.dtype, copy=True)
        for key, value in new.items():
            current = getattr(self, key)
            if isinstance(current, np.ndarray) and current.shape == value.shape:
                current[...] = value       # in place: references held elsewhere stay valid
            else:
                setattr(self, key, value)
        return LoadResult(missing, unexpected)

    # -- helpers for channel layers --------------------------------------------------------
    def _check_channel_input(self, x, min_ndim: int, num_channels: int) -> None:
        name = type(self).__name__
        layout = "(N, *spatial, C)" if self.channels_last else "(N, C, *spatial)"
        _checks.check_min_ndim(x, min_ndim, name, layout)
        _checks.check_channels(x, num_channels, self.channels_last, name)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._repr_fields)
        return f"{type(self).__name__}({fields}, dtype={self.dtype.name})"
