"""Checks that only the NumPy layers need (the shared ones live in ``normlab._checks``).

Same rule as there: every error names the bad value and says what to do instead.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np


def param_dtype(dtype) -> np.dtype:
    """The dtype of parameters and running statistics: a NumPy floating dtype."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(
            f"dtype must be a NumPy floating dtype such as np.float32, got dtype={dtype!r}") from None
    if not np.issubdtype(dt, np.floating):
        raise TypeError(
            f"dtype must be a floating dtype (np.float16, np.float32 or np.float64) for the parameters "
            f"and running statistics, got dtype={dt.name}"
        )
    return dt


def float_array(x, what: str, name: str = "x") -> np.ndarray:
    """``np.asarray(x)``, refusing non-floating data instead of silently promoting it."""
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(
            f"{what} expects a floating-point {name} (float16, float32 or float64), got dtype "
            f"{arr.dtype.name}; convert it first, e.g. {name}.astype(np.float32)"
        )
    return arr


def check_flag(value, name: str, what: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what}: {name} must be True or False, got {name}={value!r}")


def check_same_shape(dy, shape, what: str) -> None:
    if tuple(dy.shape) != tuple(shape):
        raise ValueError(
            f"{what}.backward expects dy of the shape of the last forward output {tuple(shape)}, "
            f"got dy of shape {tuple(dy.shape)}"
        )


def check_spatial_size(x, channels_last: bool, what: str) -> None:
    """Instance statistics need more than one spatial value per (sample, channel)."""
    spatial = x.shape[1:-1] if channels_last else x.shape[2:]
    count = int(np.prod(spatial, dtype=np.int64))
    if count <= 1:
        raise ValueError(
            f"{what} with instance statistics needs more than 1 spatial value per (sample, channel), "
            f"got an input of shape {tuple(x.shape)} ({count} spatial value); the normalized output "
            f"of a single value is always 0: use LayerNorm or BatchNorm for such data, or pass "
            f"training=False to a layer built with track_running_stats=True"
        )


def nonfinite_channels(mean, var) -> list:
    """Channel indices (last axis) whose batch mean or variance is not finite; [] when all are."""
    bad = ~(np.isfinite(mean) & np.isfinite(var))
    if not np.any(bad):
        return []
    return np.unique(np.nonzero(bad)[-1]).tolist()


def check_renorm_limits(r_max, d_max) -> None:
    for name, value, low, what in (("r_max", r_max, 1.0, "r is clipped to [1/r_max, r_max]"),
                                   ("d_max", d_max, 0.0, "d is clipped to [-d_max, d_max]")):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(
                f"{name} must be a float, got {name}={value!r} of type {type(value).__name__}")
        if not (math.isfinite(float(value)) and float(value) >= low):
            raise ValueError(
                f"{name} must be a finite number >= {low:g} ({what}), got {name}={value!r}; "
                f"r_max=1, d_max=0 is plain batch norm"
            )


def state_value(value) -> np.ndarray:
    """A state-dict entry as a NumPy array; torch tensors (even with grad) are detached first."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        try:
            return np.asarray(value)
        except TypeError:  # e.g. bfloat16, which NumPy has no dtype for
            return np.asarray(value.double())
    return np.asarray(value)


def check_state_entry(owner: str, key: str, value: np.ndarray, shape: tuple, integer: bool) -> None:
    got = tuple(value.shape)
    if got != tuple(shape):
        raise ValueError(
            f"{owner}.load_state_dict: {key!r} has shape {got}, expected shape {tuple(shape)}; "
            f"the checkpoint belongs to a layer of another size (nothing was loaded)"
        )
    if integer:
        if not np.issubdtype(value.dtype, np.integer) or np.any(value < 0):
            raise ValueError(
                f"{owner}.load_state_dict: {key!r} must be a non-negative integer count, got "
                f"{value!r} (nothing was loaded)"
            )
        return
    if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
        raise ValueError(
            f"{owner}.load_state_dict: {key!r} must hold real numbers, got dtype {value.dtype} "
            f"(nothing was loaded)"
        )
    if key == "running_var" and np.any(value < 0):
        raise ValueError(
            f"{owner}.load_state_dict: 'running_var' has negative entries (min {value.min()!r}); a "
            f"variance is >= 0, so the checkpoint is corrupted (nothing was loaded)"
        )


def backend_name(backend):
    """None (the registry chooses) or the name of a registered kernel backend."""
    if backend is None:
        return None
    from ..kernels import available_backends

    names = sorted(available_backends())
    if not isinstance(backend, str) or backend not in names:
        raise ValueError(f"backend must be None (automatic) or one of {names}, got backend={backend!r}")
    return backend
